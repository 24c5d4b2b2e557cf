"""SSH client to guests and real hosts: paramiko with a lab key and pinned host keys.

* The lab key (ed25519) is generated once and cached (``lab_key()``).
* Guest host keys are generated on the lab host per node (``HostKeyPair``),
  handed to the guest in its seed and pinned; any other key is rejected
  (``RejectPolicy``), as is any unknown host.
* ``SSHClient.connect`` waits for the ``SSH-`` banner (peeked, not consumed:
  QEMU's user network accepts connections before sshd listens and then resets
  them) and retries just-booted errors with exponential backoff.
* ``SSHClient.run`` drains stdout and stderr while the command runs (no
  deadlock on large output) and bounds every command by a timeout.

:class:`plexilab.infra.ssh.SSHHost` is the :class:`plexilab.host.Host` over
one client; :mod:`plexilab.infra.leases` ties remote nodes to the lab.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
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

from plexilab import proc
from plexilab.host import CommandResult, HostError
from plexilab.infra.buildsteps import cache_root

TRANSIENT = (OSError, EOFError, paramiko.SSHException)
FATAL = (paramiko.BadHostKeyException, paramiko.AuthenticationException)


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
        deadline = proc.Deadline(timeout)
        while True:
            sock.settimeout(max(0.01, deadline.remaining()))
            data = sock.recv(64, socket.MSG_PEEK)
            if not data:
                raise ConnectionResetError(f"{host}:{port} closed before the banner")
            if len(data) >= 4 or b"\n" in data:
                if data.startswith(b"SSH-"):
                    sock.settimeout(None)
                    return sock
                raise ConnectionError(f"{host}:{port} sent {data[:32]!r}, not SSH-")
            if deadline.expired():
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
            deadline = proc.Deadline(timeout)
            delay = backoff_delays(first=0.05, cap=0.5)
            last: BaseException | None = None
            while True:
                remaining = deadline.remaining()
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
                    deadline.sleep(delay())
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
        deadline = proc.Deadline(timeout)
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


def drain(chan: paramiko.Channel, deadline: proc.Deadline) -> tuple[bytes, bytes]:
    """Read stdout and stderr of *chan* until EOF and exit status, or *deadline*.

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
        remaining = deadline.remaining()
        if remaining <= 0:
            raise CommandTimeout("deadline passed")
        if not progressed:
            select.select([chan], [], [], min(remaining, 0.2))
