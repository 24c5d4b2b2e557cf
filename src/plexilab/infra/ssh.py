"""SSH to guests and real hosts: paramiko with a lab key and pinned host keys.

* The lab key (ed25519) is generated once and cached (``lab_key()``).
* Guest host keys are generated on the lab host per node (``HostKeyPair``),
  handed to the guest in its seed and pinned; any other key is rejected
  (``RejectPolicy``), as is any unknown host.
* ``SSHClient.connect`` waits for the ``SSH-`` banner (peeked, not consumed:
  QEMU's user network accepts connections before sshd listens and then resets
  them) and retries just-booted errors with exponential backoff.
* ``SSHClient.run`` drains stdout and stderr while the command runs (no
  deadlock on large output) and bounds every command by a timeout.
* ``SSHHost`` implements :class:`plexilab.host.Host` over one client;
  the QEMU and inventory providers subclass it for their endpoints.

Remote nodes die with the lab (hosts with ``lease_nodes``, the inventory):
there is no parent-death signal across SSH, so the lab's hold on its nodes
on a host is one SSH session, its *lease*:

* Before its first node starts on a host, the lab opens one session running
  a small watchdog (``LEASE_WATCHDOG``, POSIX sh) in a lease directory
  ``<workdir>/leases/<name>/`` and keeps that session open.  The watchdog
  records itself (``watchdog.pid``: pid and start time) and blocks reading
  the session's stdin.  When the lab goes -- it exits, it is SIGKILLed, or
  its SSH connection closes for any other reason -- sshd closes the
  session and the watchdog reads EOF: it SIGKILLs the process group of every
  node recorded in ``nodes/`` and removes the lease directory.  A clean
  :meth:`SSHHost.close` ends the lease the same way.
* Every node is recorded (``nodes/<pid>.pid``: pid and start time, read
  from ``/proc``) by its spawn wrapper, which removes the record when the
  node has exited.  A wrapper that finds the lease already ended kills its
  node at once, so a node started while the lab dies is not missed.
* The lab writes a heartbeat line to the session every ``LEASE_HEARTBEAT``
  seconds; the watchdog touches ``alive`` on each.  The next lab to lease on
  that host (or :meth:`SSHHost.reap_leftovers`) reaps every other lease
  whose watchdog is gone or whose heartbeat is older than ``LEASE_STALE``
  seconds (a connection that vanished without a close -- the lab host lost
  power or network -- can keep a watchdog waiting until sshd's keepalives
  give up): it kills the recorded nodes and the watchdog, after checking
  each start time, never by name, and removes the directory.

One session per host (not one per node) keeps within sshd's ``MaxSessions``.
The price of tying nodes to the connection: if the lab's SSH connection to
a host breaks, that host's nodes are killed (the next spawn opens a new
lease).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import posixpath
import re
import secrets
import select
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plexilab.host import CommandResult, Host, HostError, Process
from plexilab.infra.images import cache_root
from plexilab.infra.wheels import GUEST_INSTALLER

TRANSIENT = (OSError, EOFError, paramiko.SSHException)
FATAL = (paramiko.BadHostKeyException, paramiko.AuthenticationException)
LEASE_HEARTBEAT = 5.0  # seconds between the lab's heartbeat lines to a watchdog
LEASE_STALE = 60.0  # a lease whose heartbeat is older than this is a dead lab's

log = logging.getLogger(__name__)


class CommandTimeout(HostError):
    """A remote command did not finish within its timeout."""


class ConnectError(HostError):
    """SSH could not connect before the deadline."""


@dataclass(frozen=True)
class HostKeyPair:
    """An ed25519 key pair in OpenSSH formats."""

    private_openssh: bytes
    public_line: str  # "ssh-ed25519 AAAA..."

    @classmethod
    def generate(cls) -> HostKeyPair:
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        return cls(private, public.decode())

    def pkey(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key(
            io.StringIO(self.private_openssh.decode())
        )

    def public_pkey(self) -> paramiko.PKey:
        return public_key(self.public_line)


def public_key(line: str) -> paramiko.PKey:
    """Parse ``"ssh-ed25519 AAAA... [comment]"`` into a paramiko key."""
    kind, b64, *_ = line.split()
    return paramiko.PKey.from_type_string(kind, base64.b64decode(b64))


def lab_key_path() -> Path:
    return cache_root() / "ssh" / "lab_ed25519"


def lab_key(path: Path | None = None) -> tuple[Path, paramiko.PKey, str]:
    """The lab's client key (created on first use): (path, key, public line)."""
    path = path or lab_key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        pair = HostKeyPair.generate()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pair.private_openssh)
        tmp.with_suffix(".pub").write_text(pair.public_line + " plexilab\n")
        tmp.with_suffix(".pub").replace(path.with_suffix(".pub"))
        tmp.replace(path)
    key = paramiko.Ed25519Key.from_private_key_file(str(path))
    public = f"{key.get_name()} {key.get_base64()}"
    return path, key, public


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def backoff_delays(
    first: float = 0.1, factor: float = 2.0, cap: float = 2.0
) -> Callable[[], float]:
    """A generator of retry delays: first, first*factor, ... capped."""
    state = {"next": first}

    def step() -> float:
        delay = state["next"]
        state["next"] = min(cap, delay * factor)
        return delay

    return step


def wait_for_banner(host: str, port: int, timeout: float) -> socket.socket:
    """A connected socket whose peer has sent ``SSH-`` (peeked, not consumed).

    Raises ``OSError`` when this attempt fails (reset, closed, no banner).
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(64, socket.MSG_PEEK)
            if not data:
                raise ConnectionResetError(f"{host}:{port} closed before the banner")
            if len(data) >= 4 or b"\n" in data:
                if data.startswith(b"SSH-"):
                    sock.settimeout(None)
                    return sock
                raise ConnectionError(f"{host}:{port} sent {data[:32]!r}, not SSH-")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{host}:{port}: no complete banner")
            time.sleep(0.01)
    except BaseException:
        sock.close()
        raise


class SSHClient:
    """One SSH connection (reconnects on demand) to a guest or host."""

    def __init__(
        self,
        host: str,
        port: int = 22,
        *,
        user: str = "root",
        key: paramiko.PKey | None = None,
        host_key: paramiko.PKey | None = None,
        known_hosts: Path | None = None,
        name: str | None = None,
        disabled_algorithms: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if host_key is None and known_hosts is None:
            raise ValueError("pin the host: pass host_key or known_hosts")
        self.host = host
        self.port = port
        self.user = user
        self.key = key if key is not None else lab_key()[1]
        self.host_key = host_key
        self.known_hosts = known_hosts
        self.name = name or f"{user}@{host}:{port}"
        self.disabled_algorithms = dict(disabled_algorithms or {})
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        self.connect_attempts = 0

    # -- connection -------------------------------------------------------
    def new_paramiko_client(self) -> paramiko.SSHClient:
        """An unconnected paramiko client that trusts only this client's host keys.

        For other libraries that drive paramiko themselves (the Docker SDK's
        ``ssh://`` adapter): no system or user known_hosts, ``RejectPolicy``.
        """
        return self._new_client()

    def connect_kwargs(self, timeout: float = 30.0) -> dict[str, Any]:
        """``paramiko.SSHClient.connect`` arguments: lab key only, no agent/keys."""
        return {
            "hostname": self.host,
            "port": self.port,
            "username": self.user,
            "pkey": self.key,
            "timeout": timeout,
            "banner_timeout": timeout,
            "auth_timeout": timeout,
            "allow_agent": False,
            "look_for_keys": False,
            "disabled_algorithms": self.disabled_algorithms or None,
        }

    def _new_client(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if self.known_hosts is not None:
            client.load_host_keys(str(self.known_hosts))
        if self.host_key is not None:
            client.get_host_keys().add(
                known_hosts_name(self.host, self.port),
                self.host_key.get_name(),
                self.host_key,
            )
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        return client

    def connect(self, timeout: float = 60.0) -> SSHClient:
        """Connect (banner wait + retries with backoff) within *timeout* seconds."""
        with self._lock:
            if self._client is not None and self._alive(self._client):
                return self
            self._close_locked()
            deadline = time.monotonic() + timeout
            delay = backoff_delays(first=0.05, cap=0.5)
            last: BaseException | None = None
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectError(
                        f"{self.name}: no SSH after {timeout:.0f} s "
                        f"({self.connect_attempts} attempts; last error: {last!r})"
                    )
                self.connect_attempts += 1
                client = self._new_client()
                try:
                    sock = wait_for_banner(self.host, self.port, min(remaining, 10.0))
                    client.connect(
                        self.host,
                        self.port,
                        username=self.user,
                        pkey=self.key,
                        sock=sock,
                        timeout=min(remaining, 30.0),
                        banner_timeout=min(remaining, 30.0),
                        auth_timeout=min(remaining, 30.0),
                        allow_agent=False,
                        look_for_keys=False,
                        disabled_algorithms=self.disabled_algorithms or None,
                    )
                except FATAL:
                    client.close()
                    raise
                except TRANSIENT as exc:
                    client.close()
                    last = exc
                    time.sleep(min(delay(), max(0.0, deadline - time.monotonic())))
                    continue
                transport = client.get_transport()
                assert transport is not None
                transport.set_keepalive(15)
                self._client = client
                return self

    @staticmethod
    def _alive(client: paramiko.SSHClient) -> bool:
        transport = client.get_transport()
        return transport is not None and transport.is_active()

    def _transport(self) -> paramiko.Transport:
        if self._client is None or not self._alive(self._client):
            self.connect()
        assert self._client is not None
        transport = self._client.get_transport()
        assert transport is not None
        return transport

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                self._sftp.close()
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- commands ---------------------------------------------------------
    @staticmethod
    def command_line(
        argv: Sequence[str] | str, env: Mapping[str, str] | None = None
    ) -> str:
        """A shell command line: *argv* quoted, *env* passed through ``env``."""
        cmd = argv if isinstance(argv, str) else shlex.join(argv)
        if env:
            assigns = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
            cmd = (
                f"env {assigns} {cmd}"
                if not isinstance(argv, str)
                else (f"export {assigns}; {cmd}")
            )
        return cmd

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        input: bytes | None = None,
    ) -> CommandResult:
        """Run a command (argv, or a shell string) to completion within *timeout*."""
        cmd = self.command_line(argv, env)
        shown = tuple(argv) if not isinstance(argv, str) else ("sh", "-c", argv)
        start = time.monotonic()
        deadline = start + timeout
        chan = self._transport().open_session(timeout=timeout)
        try:
            chan.exec_command(cmd)
            if input:
                chan.sendall(input)
            chan.shutdown_write()
            out, err = drain(chan, deadline)
            code = chan.recv_exit_status()
        except CommandTimeout:
            raise CommandTimeout(
                f"{self.name}: {cmd!r} did not finish within {timeout:.1f} s"
            ) from None
        finally:
            chan.close()
        result = CommandResult(
            argv=shown,
            returncode=code,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            seconds=time.monotonic() - start,
        )
        return result.check() if check else result

    # -- files ------------------------------------------------------------
    def sftp(self) -> paramiko.SFTPClient:
        if (
            self._sftp is None
            or self._sftp.get_channel() is None
            or (
                self._sftp.get_channel().closed  # type: ignore[union-attr]
            )
        ):
            self._sftp = paramiko.SFTPClient.from_transport(
                self._transport(), window_size=8 << 20, max_packet_size=32768
            )
            assert self._sftp is not None
        return self._sftp

    def put(self, local: Path, remote: str, mode: int | None = None) -> None:
        sftp = self.sftp()
        sftp.put(str(local), remote, confirm=True)
        sftp.chmod(
            remote, mode if mode is not None else stat.S_IMODE(local.stat().st_mode)
        )

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.sftp().get(remote, str(local))


def drain(chan: paramiko.Channel, deadline: float) -> tuple[bytes, bytes]:
    """Read stdout and stderr of *chan* until EOF and exit status, or the deadline.

    Both streams are consumed as they arrive, so a command writing more than
    the SSH window to one stream never blocks waiting for the other.
    """
    out = bytearray()
    err = bytearray()
    while True:
        progressed = False
        while chan.recv_ready():
            out += chan.recv(1 << 16)
            progressed = True
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(1 << 16)
            progressed = True
        if (
            chan.exit_status_ready()
            and chan.eof_received
            and not chan.recv_ready()
            and not chan.recv_stderr_ready()
        ):
            return bytes(out), bytes(err)
        if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
            return bytes(out), bytes(err)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CommandTimeout("deadline passed")
        if not progressed:
            select.select([chan], [], [], min(remaining, 0.2))


# Shell functions of the remote lease scripts.  st PID: start time of PID
# (clock ticks since boot, field 22 of /proc/PID/stat, after the command name);
# same PID START: PID is still the process recorded with START (with no START
# recorded: PID exists); reap_rec FILE: SIGKILL the process group of a
# recorded process if it is still the same one, print it, drop the record.
_SH_LIB = (
    "st() { sed 's/.*) //' \"/proc/$1/stat\" 2>/dev/null | cut -d' ' -f20; }; "
    'same() { if [ -n "$2" ]; then [ "$(st "$1")" = "$2" ]; '
    'else kill -0 "$1" 2>/dev/null; fi; }; '
    'reap_rec() { if read -r rp rs <"$1" 2>/dev/null && [ -n "$rp" ] '
    '&& same "$rp" "$rs"; then kill -9 -"$rp" 2>/dev/null || kill -9 "$rp"; '
    'echo "node pid $rp ($1)"; fi; rm -f "$1"; }; '
)

# Remote wrapper of Host.spawn: the program runs in its own session (so a signal
# reaches its whole group); the wrapper records its pid and, later, its exit code.
# With a lease directory ($2, may be empty) the node is also recorded there for
# the lease's watchdog and the reaper; a lease already ended kills it at once.
SPAWN_WRAPPER = _SH_LIB + (
    'log=$1; lease=$2; shift 2; rm -f "$log.rc"; '
    'setsid "$@" >"$log" 2>&1 </dev/null & '
    "pid=$!; "
    'if [ -n "$lease" ]; then '
    'rec="$lease/nodes/$pid.pid"; '
    'echo "$pid $(st $pid)" >"$rec.tmp" && mv "$rec.tmp" "$rec"; '
    'if [ -e "$lease/dead" ] || [ ! -e "$rec" ]; then '
    "kill -9 -$pid 2>/dev/null || kill -9 $pid; fi; "
    "fi; "
    'echo $pid >"$log.pid.tmp"; mv "$log.pid.tmp" "$log.pid"; '
    "wait $pid; rc=$?; "
    '[ -n "$lease" ] && rm -f "$rec"; '
    'echo $rc >"$log.rc.tmp"; mv "$log.rc.tmp" "$log.rc"'
)

# The lease watchdog ($1: the lease directory).  Its stdin is the lab's session:
# each heartbeat line touches "alive"; EOF (the lab or its connection is gone)
# kills every recorded node.  HUP and PIPE are ignored so that only EOF ends it.
LEASE_WATCHDOG = _SH_LIB + (
    "d=$1; trap '' HUP PIPE; mkdir -p \"$d\" || exit 1; "
    'echo "$$ $(st $$)" >"$d/watchdog.tmp" && mv "$d/watchdog.tmp" "$d/watchdog.pid"; '
    'mkdir -p "$d/nodes" && touch "$d/alive" || exit 1; '
    "echo ready; exec >/dev/null 2>&1; "
    'while IFS= read -r _; do touch "$d/alive"; done; '
    ': >"$d/dead"; '
    'for f in "$d"/nodes/*.pid; do [ -e "$f" ] && reap_rec "$f"; done; '
    'rm -rf "$d"'
)

# The reaper ($1: the leases directory, $2: a lease to keep, $3: LEASE_STALE):
# every other lease whose watchdog is gone, ended or silent for longer than
# LEASE_STALE loses its recorded nodes and watchdog; one line per node killed.
# A lease directory without a watchdog record is being set up: left alone
# until it is LEASE_STALE old.
LEASE_REAPER = _SH_LIB + (
    "root=$1; keep=$2; stale=$3; now=$(date +%s); "
    'for d in "$root"/*; do '
    '[ -d "$d" ] && [ "${d##*/}" != "$keep" ] || continue; '
    'if read -r wp ws <"$d/watchdog.pid" 2>/dev/null; then '
    'a=$(stat -c %Y "$d/alive" 2>/dev/null || echo 0); '
    'if same "$wp" "$ws" && [ ! -e "$d/dead" ] && [ $((now - a)) -le "$stale" ]; '
    "then continue; fi; "
    "else "
    'a=$(stat -c %Y "$d" 2>/dev/null || echo 0); '
    '[ $((now - a)) -le "$stale" ] && continue; wp=; '
    "fi; "
    'for f in "$d"/nodes/*.pid; do [ -e "$f" ] && reap_rec "$f"; done; '
    'if [ -n "$wp" ] && same "$wp" "$ws"; then kill -9 "$wp" 2>/dev/null; fi; '
    'rm -rf "$d"; '
    "done; true"
)


def lease_name() -> str:
    """A lease directory name unique to this lab process: host-pid-random."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:40] or "lab"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def reap_leases(
    ssh: SSHClient, root: str, *, keep: str = "", stale: float = LEASE_STALE
) -> list[str]:
    """Kill the nodes of dead labs' leases under *root* on the host of *ssh*.

    Returns one description per node killed (see ``LEASE_REAPER``).
    """
    res = ssh.run(
        ["sh", "-c", LEASE_REAPER, "sh", root, keep, str(int(stale))], timeout=60
    )
    killed = [line for line in res.stdout.splitlines() if line.strip()]
    for line in killed:
        log.warning("%s: reaped a leftover %s", ssh.name, line)
    return killed


class RemoteLease:
    """The lab's hold on its nodes on one SSH host (see the module docstring)."""

    def __init__(
        self,
        ssh: SSHClient,
        root: str,
        *,
        heartbeat: float = LEASE_HEARTBEAT,
        name: str | None = None,
    ) -> None:
        self.ssh = ssh
        self.root = root
        self.name = name or lease_name()
        self.dir = f"{root}/{self.name}"
        self.heartbeat = heartbeat
        self.reaped: list[str] = []
        self._chan: paramiko.Channel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self, timeout: float = 30.0) -> RemoteLease:
        """Reap dead labs' leftovers, then start the watchdog and the heartbeat."""
        self.reaped = reap_leases(self.ssh, self.root, keep=self.name)
        chan = self.ssh._transport().open_session(timeout=timeout)
        try:
            chan.settimeout(timeout)
            chan.exec_command(shlex.join(["sh", "-c", LEASE_WATCHDOG, "sh", self.dir]))
            deadline = time.monotonic() + timeout
            seen = b""
            while b"ready\n" not in seen:
                if chan.recv_ready():
                    seen += chan.recv(1024)
                elif chan.exit_status_ready() or chan.closed:
                    err = chan.recv_stderr(65536) if chan.recv_stderr_ready() else b""
                    code = chan.recv_exit_status()
                    raise HostError(
                        f"{self.ssh.name}: lease watchdog did not start (exit "
                        f"{code}): {err.decode(errors='replace')}"
                    )
                elif time.monotonic() > deadline:
                    raise HostError(f"{self.ssh.name}: lease watchdog did not start")
                else:
                    select.select([chan], [], [], 0.1)
        except BaseException:
            chan.close()
            raise
        self._chan = chan
        self._thread = threading.Thread(
            target=self._beat, args=(chan,), name=f"lease-{self.ssh.name}", daemon=True
        )
        self._thread.start()
        return self

    def _beat(self, chan: paramiko.Channel) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                chan.sendall(b"\n")
            except (OSError, EOFError, paramiko.SSHException):
                return

    def active(self) -> bool:
        """True while the watchdog session is open (the nodes are held)."""
        chan = self._chan
        return (
            chan is not None
            and not chan.closed
            and not chan.exit_status_ready()
            and chan.get_transport().is_active()
        )

    def close(self, timeout: float = 15.0) -> None:
        """End the lease: the watchdog kills the nodes still recorded, then exits."""
        self._stop.set()
        chan, self._chan = self._chan, None
        if chan is None:
            return
        try:
            if not chan.closed:
                chan.shutdown_write()
                deadline = time.monotonic() + timeout
                while not chan.exit_status_ready() and time.monotonic() < deadline:
                    select.select([chan], [], [], 0.1)
                    while chan.recv_ready():
                        chan.recv(65536)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            chan.close()
        if self._thread is not None:
            self._thread.join(5.0)


class SSHProcess(Process):
    """A program started by :meth:`SSHHost.spawn` (pid = its process group)."""

    def __init__(self, ssh: SSHClient, pid: int, log_path: str) -> None:
        self.ssh = ssh
        self._pid = pid
        self.log_path = log_path
        self._code: int | None = None

    @property
    def pid(self) -> int:
        return self._pid

    def _rc(self) -> str:
        return shlex.quote(self.log_path + ".rc")

    def alive(self) -> bool:
        if self._code is not None:
            return False
        res = self.ssh.run(
            f"test ! -e {self._rc()} && kill -0 {self._pid}", timeout=30, check=False
        )
        return res.returncode == 0

    def send_signal(self, signum: int) -> None:
        self.ssh.run(f"kill -{int(signum)} -{self._pid}", timeout=30, check=False)

    def wait(self, timeout: float) -> int | None:
        if self._code is not None:
            return self._code
        ticks = max(0, int(timeout * 10))
        script = (
            f"n={ticks}; while [ ! -e {self._rc()} ] && [ $n -gt 0 ]; do "
            f"sleep 0.1; n=$((n-1)); done; cat {self._rc()} 2>/dev/null || true"
        )
        res = self.ssh.run(script, timeout=timeout + 30, check=False)
        text = res.stdout.strip()
        if text:
            self._code = int(text)
        return self._code


@dataclass(frozen=True)
class InstallReport:
    """Timings of :meth:`SSHHost.install`."""

    bytes_sent: int
    push_seconds: float
    install_seconds: float
    output: str

    @property
    def seconds(self) -> float:
        return self.push_seconds + self.install_seconds


class SSHHost(Host):
    """A :class:`Host` reached over SSH (endpoints are left to subclasses).

    With ``lease_nodes`` (the inventory's real machines) the nodes it spawns
    are held by a :class:`RemoteLease` and die with the lab; see the module
    docstring.
    """

    lease_nodes: bool = False

    def __init__(
        self,
        name: str,
        arch: str,
        ssh: SSHClient,
        *,
        python: str = "/opt/plexichat/bin/python",
        workdir: str = "/root/plexilab",
        deps: str | None = None,
    ) -> None:
        self.name = name
        self.deps = deps  # directory whose site-packages already holds the deps
        self.arch = arch
        self.ssh = ssh
        self._python = python
        self._workdir = workdir
        self._lease: RemoteLease | None = None
        self._lease_lock = threading.Lock()

    def leases_dir(self) -> str:
        """Where the leases of the labs holding nodes on this host live."""
        return f"{self._workdir}/leases"

    def lease(self) -> RemoteLease:
        """This lab's open lease on the host (opened, or opened again, on demand)."""
        with self._lease_lock:
            if self._lease is None or not self._lease.active():
                if self._lease is not None:
                    self._lease.close(timeout=1.0)
                self._lease = RemoteLease(self.ssh, self.leases_dir()).open()
            return self._lease

    def reap_leftovers(self, *, stale: float = LEASE_STALE) -> list[str]:
        """Kill the nodes that dead labs left on this host (one line per node)."""
        keep = self._lease.name if self._lease is not None else ""
        return reap_leases(self.ssh, self.leases_dir(), keep=keep, stale=stale)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> CommandResult:
        return self.ssh.run(argv, timeout=timeout, env=env, check=check)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: str,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        program = list(argv)
        if env:
            program = ["env", *(f"{k}={v}" for k, v in env.items()), *program]
        pidfile = shlex.quote(log_path + ".pid")
        lease = self.lease().dir if self.lease_nodes else ""
        wrapper = shlex.join(
            ["sh", "-c", SPAWN_WRAPPER, "sh", log_path, lease, *program]
        )
        script = (
            f"rm -f {pidfile}; ({wrapper} >/dev/null 2>&1 </dev/null &); "
            f"n=300; while [ ! -s {pidfile} ] && [ $n -gt 0 ]; do sleep 0.05; "
            f"n=$((n-1)); done; cat {pidfile}"
        )
        res = self.ssh.run(script, timeout=60)
        try:
            pid = int(res.stdout.strip())
        except ValueError:
            raise HostError(
                f"{self.name}: spawn of {program} gave {res.stdout!r}"
            ) from None
        return SSHProcess(self.ssh, pid, log_path)

    def put(self, local: Path, remote: str) -> None:
        self.ssh.put(local, remote)

    def get(self, remote: str, local: Path) -> None:
        self.ssh.get(remote, local)

    def install(
        self,
        wheel: Path,
        wheelhouse: Path | None,
        *,
        deps: str | None = None,
        timeout: float = 600.0,
    ) -> InstallReport:
        """Push *wheel* (and *wheelhouse*) over SFTP; install offline into the venv.

        The venv is ``dirname(dirname(self.python()))``, created with the host's
        ``python3 -m venv --without-pip`` when missing; wheels are installed by
        ``installer`` (imported from its wheel) without bytecode compilation.
        Files already on the host with the same size are not sent again (the
        plexichat wheel always is); distributions already installed at the
        same version are skipped.  *deps* names a directory whose
        ``site-packages`` already holds the dependencies (the guests' deps
        disk): it is added to the venv with a ``.pth`` file and what it
        provides is not installed again.
        """
        deps = deps if deps is not None else self.deps
        if deps is not None:
            wheelhouse = None  # the deps are on the host already
        venv = posixpath.dirname(posixpath.dirname(self._python))
        remote = f"{self._workdir}/wheels"
        start = time.monotonic()
        listing = self.ssh.run(
            f"mkdir -p {shlex.quote(remote)} && cd {shlex.quote(remote)} && "
            'for f in *.whl; do [ -e "$f" ] && stat -c \'%s %n\' "$f"; done; true',
            timeout=60,
        ).stdout
        have = {}
        for line in listing.splitlines():
            size, _, name = line.partition(" ")
            have[name] = int(size)
        sent = 0
        files = [wheel, *(sorted(wheelhouse.glob("*.whl")) if wheelhouse else [])]
        for path in files:
            if path != wheel and have.get(path.name) == path.stat().st_size:
                continue
            self.ssh.put(path, f"{remote}/{path.name}")
            sent += path.stat().st_size
        pushed = time.monotonic()
        script = f"{self._workdir}/install-wheels.py"
        q = shlex.quote
        cmd = (
            f"cat > {q(script)} && "
            f"{{ test -x {q(self._python)} || "
            f"python3 -m venv --without-pip {q(venv)}; }} && "
            f"{q(self._python)} {q(script)} {q(venv)} {q(remote)} "
            f"{q(deps or '-')} plexichat"
        )
        res = self.ssh.run(cmd, timeout=timeout, input=GUEST_INSTALLER.encode())
        done = time.monotonic()
        return InstallReport(
            bytes_sent=sent,
            push_seconds=pushed - start,
            install_seconds=done - pushed,
            output=res.stdout.strip(),
        )

    def python(self) -> str:
        return self._python

    def workdir(self) -> str:
        return self._workdir

    def close(self) -> None:
        """End the lease (its watchdog kills nodes still running), then disconnect."""
        with self._lease_lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            lease.close()
        self.ssh.close()
