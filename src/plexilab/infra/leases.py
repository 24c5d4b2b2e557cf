"""Leases: remote nodes die with the lab (hosts with ``lease_nodes``, the inventory).

There is no parent-death signal across SSH, so the lab's hold on its nodes
on a host is one SSH session, its *lease*:

* Before its first node starts on a host, the lab opens one session running
  a small watchdog (``LEASE_WATCHDOG``, POSIX sh) in a lease directory
  ``<workdir>/leases/<name>/`` and keeps that session open.  The watchdog
  records itself (``watchdog.pid``: pid and start time) and blocks reading
  the session's stdin.  When the lab goes -- it exits, it is SIGKILLed, or
  its SSH connection closes for any other reason -- sshd closes the
  session and the watchdog reads EOF: it SIGKILLs the process group of every
  node recorded in ``nodes/`` and removes the lease directory.  A clean
  :meth:`plexilab.infra.ssh.SSHHost.close` ends the lease the same way.
* Every node is recorded (``nodes/<pid>.pid``: pid and start time, read
  from ``/proc``) by its spawn wrapper (``SPAWN_WRAPPER``), which removes the
  record when the node has exited.  A wrapper that finds the lease already
  ended kills its node at once, so a node started while the lab dies is not
  missed.
* The lab writes a heartbeat line to the session every ``LEASE_HEARTBEAT``
  seconds; the watchdog touches ``alive`` on each.  The next lab to lease on
  that host (or :meth:`plexilab.infra.ssh.SSHHost.reap_leftovers`) reaps
  every other lease whose watchdog is gone or whose heartbeat is older than
  ``LEASE_STALE`` seconds (a connection that vanished without a close -- the
  lab host lost power or network -- can keep a watchdog waiting until sshd's
  keepalives give up): it kills the recorded nodes and the watchdog, after
  checking each start time, never by name, and removes the directory.

One session per host (not one per node) keeps within sshd's ``MaxSessions``.
The price of tying nodes to the connection: if the lab's SSH connection to
a host breaks, that host's nodes are killed (the next spawn opens a new
lease).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import select
import shlex
import socket
import threading

import paramiko

from plexilab import proc
from plexilab.host import HostError
from plexilab.infra.sshclient import SSHClient

LEASE_HEARTBEAT = 5.0  # seconds between the lab's heartbeat lines to a watchdog
LEASE_STALE = 60.0  # a lease whose heartbeat is older than this is a dead lab's

log = logging.getLogger(__name__)


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
            deadline = proc.Deadline(timeout)
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
                elif deadline.expired():
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
                deadline = proc.Deadline(timeout)
                while not chan.exit_status_ready() and not deadline.expired():
                    select.select([chan], [], [], 0.1)
                    while chan.recv_ready():
                        chan.recv(65536)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            chan.close()
        if self._thread is not None:
            self._thread.join(5.0)
