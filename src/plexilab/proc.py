"""Processes the lab starts: process groups, terminate-then-kill, pidfiles, waiting.

Every long-lived process of the lab (QEMU, relays, nodes, ``dockerd``, load
generators) follows the same rules, kept here once:

* :func:`spawn` starts it in a new session, so it leads its own process
  group and one signal reaches it and all its children.
* :func:`terminate` (a ``Popen`` child) and :func:`terminate_pid` (any
  process, e.g. one recorded by an earlier lab) send SIGTERM, wait a grace
  period, then SIGKILL; a child is reaped.
* A pidfile (:func:`write_pidfile`) records pid, process group and the
  start time from ``/proc/<pid>/stat``.  It outlives the lab, and
  :func:`kill_recorded` acts on it only while that pid still runs the same
  process (same start time): a recycled pid is never signalled.  Nothing is
  ever killed by name.
* :func:`wait_until` and :class:`Deadline` replace hand-written
  ``deadline = time.monotonic() + timeout`` polling loops.

This module is the base layer: it imports only the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "Deadline",
    "PidRecord",
    "alive",
    "kill_recorded",
    "pgid_of",
    "proc_starttime",
    "read_pidfile",
    "signal_group",
    "signal_process",
    "spawn",
    "terminate",
    "terminate_pid",
    "wait_until",
    "write_pidfile",
]

File = int | IO[Any] | None  # what subprocess accepts for stdin/stdout/stderr


# --------------------------------------------------------------------------
# Deadlines and polling
# --------------------------------------------------------------------------
class Deadline:
    """A point in time ``timeout`` seconds from now (``time.monotonic``).

    ``Deadline(10).remaining()`` is the time left (never negative),
    ``expired()`` tells whether it has passed, and ``sleep(interval)`` sleeps
    at most until the deadline.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.at = time.monotonic() + timeout

    def remaining(self) -> float:
        """Seconds left, 0.0 once the deadline has passed."""
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return time.monotonic() >= self.at

    def sleep(self, interval: float) -> None:
        """Sleep *interval* seconds, or less when the deadline comes first."""
        time.sleep(min(interval, self.remaining()))

    def __repr__(self) -> str:
        return f"Deadline({self.timeout:g} s, {self.remaining():.2f} s left)"


def wait_until(
    predicate: Callable[[], object], timeout: float, interval: float = 0.05
) -> bool:
    """Poll *predicate* every *interval* seconds until it is true or *timeout* passes.

    The predicate is always evaluated at least once, and once more after the
    last sleep, so a zero timeout still checks.  Returns True when it became
    true, False on timeout.
    """
    deadline = Deadline(timeout)
    while True:
        if predicate():
            return True
        if deadline.expired():
            return False
        deadline.sleep(interval)


# --------------------------------------------------------------------------
# /proc: start times (a pid together with its start time names one process)
# --------------------------------------------------------------------------
def proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of *pid*, or None when gone.

    A zombie counts as gone: it can no longer do anything, only be reaped.
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def alive(pid: int, starttime: int | None) -> bool:
    """True when *pid* runs and is the process that was recorded.

    With *starttime* None any live process with that pid counts.
    """
    now = proc_starttime(pid)
    return now is not None and (starttime is None or now == starttime)


def pgid_of(pid: int) -> int | None:
    """The process group of *pid*, or None when it is gone."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# --------------------------------------------------------------------------
# Spawning and signals
# --------------------------------------------------------------------------
def spawn(
    argv: Sequence[str],
    *,
    stdin: File = subprocess.DEVNULL,
    stdout: File = None,
    stderr: File = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    preexec_fn: Callable[[], Any] | None = None,
) -> subprocess.Popen[bytes]:
    """Start *argv* in a new session: it leads its own process group.

    Signals sent with :func:`signal_group` / :func:`terminate` then reach
    the program and everything it starts.  *preexec_fn* runs in the child
    before ``exec`` (e.g. to set a parent-death signal).
    """
    return subprocess.Popen(
        list(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )


def signal_group(pgid: int, signum: int) -> bool:
    """Send *signum* to process group *pgid*; False when there is none."""
    try:
        os.killpg(pgid, signum)
    except OSError:
        return False
    return True


def signal_process(pid: int, signum: int) -> bool:
    """Send *signum* to process *pid*; False when it is gone."""
    try:
        os.kill(pid, signum)
    except OSError:
        return False
    return True


def terminate(
    proc: subprocess.Popen[Any],
    *,
    grace: float = 3.0,
    kill_grace: float = 5.0,
    group: bool = True,
) -> int | None:
    """SIGTERM a child (its process group with *group*), then SIGKILL; reap it.

    Waits *grace* seconds after SIGTERM and *kill_grace* after SIGKILL.
    Returns the exit status, or None if even SIGKILL did not end it within
    *kill_grace* (a process stuck in the kernel).  A child that already
    exited is only reaped.
    """
    if proc.poll() is not None:
        return proc.returncode
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_grace)):
        if group:
            signal_group(proc.pid, signum)
        else:
            signal_process(proc.pid, signum)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return None


def terminate_pid(
    pid: int,
    starttime: int | None,
    *,
    grace: float = 3.0,
    group: bool = False,
    kill_grace: float = 1.0,
    interval: float = 0.05,
) -> bool:
    """SIGTERM, wait up to *grace* s, then SIGKILL a process that is not our child.

    Acts only while *pid* is the recorded process (same *starttime*; None
    accepts any process with that pid), so a recycled pid is left alone.
    With *group* the signals go to the process group led by *pid*.  Returns
    True when a signal was sent.  (A process that is not our child cannot be
    reaped here; its parent or init does that.)
    """
    if not alive(pid, starttime):
        return False

    def send(signum: int) -> None:
        if not (group and signal_group(pid, signum)):
            signal_process(pid, signum)

    send(signal.SIGTERM)
    if not wait_until(lambda: not alive(pid, starttime), grace, interval):
        send(signal.SIGKILL)
        wait_until(lambda: not alive(pid, starttime), kill_grace, interval)
    return True


# --------------------------------------------------------------------------
# Pidfiles
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class PidRecord:
    """One pidfile: which process, in which group, started when, and what it is."""

    pid: int
    pgid: int | None
    starttime: int | None
    kind: str

    def alive(self) -> bool:
        """True while the recorded process still runs (same start time)."""
        return alive(self.pid, self.starttime)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "pgid": self.pgid,
            "starttime": self.starttime,
            "kind": self.kind,
        }


def write_pidfile(path: Path, pid: int, kind: str) -> PidRecord:
    """Record *pid* (with its group and start time) in *path*, atomically.

    The JSON keys are ``pid``, ``pgid``, ``starttime`` and ``kind``.
    """
    rec = PidRecord(pid, pgid_of(pid), proc_starttime(pid), kind)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec.as_dict()))
    tmp.replace(path)
    return rec


def read_pidfile(path: Path) -> PidRecord | None:
    """The record of *path*, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
        return PidRecord(
            pid=int(data["pid"]),
            pgid=data.get("pgid"),
            starttime=data.get("starttime"),
            kind=str(data.get("kind", "?")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kill_recorded(pidfile: Path, grace: float = 3.0) -> str | None:
    """Terminate-then-kill the process of *pidfile* if it is still the same one.

    Its whole group is signalled when it leads one.  Returns a description
    (``"<kind> pid <pid>"``) of a process that was signalled, else None.  The
    pidfile itself is left for the caller.
    """
    rec = read_pidfile(pidfile)
    if rec is None:
        return None
    with contextlib.suppress(OSError):
        if terminate_pid(
            rec.pid, rec.starttime, grace=grace, group=rec.pgid == rec.pid
        ):
            return f"{rec.kind} pid {rec.pid}"
    return None
