"""guestfwd relay: bridge stdin/stdout (the guest connection) to 127.0.0.1:PORT.

Usage: ``python3 -S -E relay.py PORT PIDDIR QEMU_PIDFILE``.

slirp starts one relay per guest connection (GLib double-forks it, so its
parent is not QEMU): the relay watches QEMU's pidfile and exits when QEMU is
gone; it records itself in PIDDIR for the reaper.  Fault injection: while
PORT is listed in the file "blocked" next to PIDDIR, the relay refuses to
connect and cuts a live connection (a network partition between guests).

The lab copies this file into each guest's run directory
(``plexilab.infra.machine``): it runs with the standard library only and
imports nothing from plexilab.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sys
import time
from collections.abc import Sequence


def starttime(pid: int) -> int | None:
    """Start time of *pid* from ``/proc`` (None when gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


class Blocked:
    """Whether *port* is listed in the "blocked" file (re-read when it changes)."""

    def __init__(self, path: str, port: int) -> None:
        self.path = path
        self.port = port
        self._stamp: int | None = None
        self._blocked = False

    def __call__(self) -> bool:
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            return False
        if stamp != self._stamp:
            try:
                with open(self.path) as fh:
                    self._blocked = str(self.port) in fh.read().split()
            except OSError:
                return False
            self._stamp = stamp
        return self._blocked


def qemu_alive(qemu_pidfile: str) -> bool:
    """True while the process recorded in *qemu_pidfile* runs (same start time)."""
    try:
        with open(qemu_pidfile) as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return False
    return bool(starttime(rec["pid"]) == rec["starttime"])


def record_self(piddir: str) -> str | None:
    """Write this relay's pidfile into *piddir*; its path, or None on failure."""
    me = os.getpid()
    pidfile = os.path.join(piddir, f"relay-{me}.pid")
    try:
        with open(pidfile + ".tmp", "w") as fh:
            json.dump(
                {
                    "pid": me,
                    "pgid": os.getpgid(0),
                    "starttime": starttime(me),
                    "kind": "relay",
                },
                fh,
            )
        os.replace(pidfile + ".tmp", pidfile)
    except OSError:
        return None
    return pidfile


def bridge(
    port: int, blocked: Blocked, qemu_pidfile: str, check_every: float = 2.0
) -> None:
    """Copy bytes between fd 0/1 (the guest) and 127.0.0.1:*port* until both close.

    Half-closes are passed on.  Ends early when *port* gets blocked or QEMU
    is gone (checked when idle for *check_every* seconds).
    """
    up = socket.create_connection(("127.0.0.1", port), timeout=10)
    up.settimeout(None)
    down: socket.socket | None
    try:
        down = socket.socket(fileno=os.dup(0))
        down_r = down_w = down.fileno()
    except OSError:
        down = None
        down_r, down_w = 0, 1
    open_in, open_out = True, True  # guest->lab, lab->guest
    checked = time.monotonic()
    while open_in or open_out:
        watch = ([down_r] if open_in else []) + ([up.fileno()] if open_out else [])
        ready, _, _ = select.select(watch, [], [], 0.25)
        if blocked():
            break
        if not ready and time.monotonic() - checked > check_every:
            if not qemu_alive(qemu_pidfile):
                break
            checked = time.monotonic()
        for fd in ready:
            if fd == down_r:
                data = os.read(down_r, 65536)
                if data:
                    up.sendall(data)
                else:
                    open_in = False
                    up.shutdown(socket.SHUT_WR)
            else:
                data = up.recv(65536)
                if data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(down_w, view) :]
                else:
                    open_out = False
                    if down is not None:
                        down.shutdown(socket.SHUT_WR)
                    else:
                        os.close(down_w)


def main(argv: Sequence[str]) -> int:
    """Run one relay (``argv``: PORT PIDDIR QEMU_PIDFILE); exit 1 when refused."""
    port, piddir, qemu_pidfile = int(argv[0]), argv[1], argv[2]
    blocked = Blocked(os.path.join(os.path.dirname(piddir), "blocked"), port)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 2)  # stderr is the guest's connection: never write to it
    pidfile = record_self(piddir)
    try:
        if not qemu_alive(qemu_pidfile) or blocked():
            return 1
        bridge(port, blocked, qemu_pidfile)
    except OSError:
        pass
    finally:
        if pidfile:
            with contextlib.suppress(OSError):
                os.unlink(pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
