"""plexilab.proc with real child processes: groups, terminate-then-kill, pidfiles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plexilab import proc

# A child that ignores SIGTERM and says so once the handler is in place.
STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)
# A child that starts a grandchild in its group, prints both pids, then sleeps.
PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Children of a test; whatever is left is SIGKILLed (by group) and reaped."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        if child.poll() is None:
            proc.signal_group(child.pid, signal.SIGKILL)
        child.wait(10)


def start(
    children: list[subprocess.Popen[bytes]], code: str
) -> subprocess.Popen[bytes]:
    child = proc.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    children.append(child)
    return child


def test_spawn_starts_a_new_process_group(children) -> None:
    child = start(children, "import time; time.sleep(120)")
    assert os.getpgid(child.pid) == child.pid
    assert os.getpgid(child.pid) != os.getpgid(0)
    assert os.getsid(child.pid) == child.pid


def test_terminate_stops_a_cooperative_child_with_sigterm(children) -> None:
    child = start(children, "import time; time.sleep(120)")
    t0 = time.monotonic()
    assert proc.terminate(child, grace=10) == -signal.SIGTERM
    assert time.monotonic() - t0 < 5  # no grace period spent


def test_a_child_ignoring_sigterm_is_sigkilled(children) -> None:
    child = start(children, STUBBORN)
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    t0 = time.monotonic()
    code = proc.terminate(child, grace=0.5, kill_grace=10)
    assert code == -signal.SIGKILL
    assert time.monotonic() - t0 >= 0.5  # SIGTERM was tried first
    assert proc.proc_starttime(child.pid) is None  # reaped


def test_terminate_reaches_the_whole_group(children) -> None:
    child = start(children, PARENT)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    start_time = proc.proc_starttime(grandchild)
    assert proc.alive(grandchild, start_time)
    proc.terminate(child, grace=5)
    # the grandchild is not ours to reap: it goes to init, which reaps it
    assert proc.wait_until(lambda: not proc.alive(grandchild, start_time), 10)


def test_terminate_of_an_exited_child_only_reaps_it(children) -> None:
    child = start(children, "raise SystemExit(3)")
    assert proc.wait_until(lambda: proc.proc_starttime(child.pid) is None, 10)
    assert proc.terminate(child) == 3


def test_pidfile_records_pid_group_and_start_time(tmp_path: Path, children) -> None:
    child = start(children, "import time; time.sleep(120)")
    rec = proc.write_pidfile(tmp_path / "child.pid", child.pid, "sleeper")
    data = json.loads((tmp_path / "child.pid").read_text())
    assert data == {
        "pid": child.pid,
        "pgid": child.pid,
        "starttime": proc.proc_starttime(child.pid),
        "kind": "sleeper",
    }
    assert proc.read_pidfile(tmp_path / "child.pid") == rec
    assert rec.alive()
    assert not list(tmp_path.glob("*.tmp"))


def test_read_pidfile_of_garbage_is_none(tmp_path: Path) -> None:
    assert proc.read_pidfile(tmp_path / "missing.pid") is None
    (tmp_path / "bad.pid").write_text("{not json")
    assert proc.read_pidfile(tmp_path / "bad.pid") is None
    (tmp_path / "nopid.pid").write_text('{"kind": "x"}')
    assert proc.read_pidfile(tmp_path / "nopid.pid") is None


def test_kill_recorded_terminates_then_kills(tmp_path: Path, children) -> None:
    child = start(children, STUBBORN)
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    pidfile = tmp_path / "stubborn.pid"
    proc.write_pidfile(pidfile, child.pid, "stubborn")
    assert proc.kill_recorded(pidfile, grace=0.3) == f"stubborn pid {child.pid}"
    assert child.wait(10) == -signal.SIGKILL


def test_a_recycled_pid_is_never_killed(tmp_path: Path, children) -> None:
    child = start(children, "import time; time.sleep(120)")
    pidfile = tmp_path / "old.pid"
    rec = proc.write_pidfile(pidfile, child.pid, "old")
    assert rec.starttime is not None
    # the recorded process is gone and its pid now names another process:
    # same pid, another start time
    data = json.loads(pidfile.read_text())
    data["starttime"] = rec.starttime - 1
    pidfile.write_text(json.dumps(data))
    assert not proc.alive(child.pid, data["starttime"])
    assert proc.kill_recorded(pidfile, grace=0.1) is None
    assert proc.terminate_pid(child.pid, data["starttime"], grace=0.1) is False
    time.sleep(0.2)
    assert child.poll() is None  # untouched


def test_kill_recorded_of_a_gone_process_is_none(tmp_path: Path, children) -> None:
    child = start(children, "pass")
    pidfile = tmp_path / "gone.pid"
    proc.write_pidfile(pidfile, child.pid, "gone")
    child.wait(10)
    assert proc.kill_recorded(pidfile) is None


def test_a_zombie_counts_as_gone(children) -> None:
    child = start(children, "pass")
    assert proc.wait_until(lambda: proc.proc_starttime(child.pid) is None, 10)
    assert os.path.exists(f"/proc/{child.pid}")  # not reaped yet: a zombie
    assert not proc.alive(child.pid, None)


def test_wait_until_times_out() -> None:
    calls = []

    def never() -> bool:
        calls.append(time.monotonic())
        return False

    t0 = time.monotonic()
    assert proc.wait_until(never, 0.3, interval=0.05) is False
    took = time.monotonic() - t0
    assert 0.3 <= took < 2.0
    assert len(calls) >= 3
    assert calls[-1] - t0 >= 0.3  # checked once more at the deadline


def test_wait_until_returns_as_soon_as_the_predicate_holds() -> None:
    t0 = time.monotonic()
    ready_at = t0 + 0.2
    assert proc.wait_until(lambda: time.monotonic() >= ready_at, 10, interval=0.02)
    assert time.monotonic() - t0 < 2.0


def test_wait_until_with_zero_timeout_checks_once() -> None:
    assert proc.wait_until(lambda: True, 0)
    assert not proc.wait_until(lambda: False, 0)


def test_deadline() -> None:
    deadline = proc.Deadline(0.2)
    assert not deadline.expired()
    assert 0 < deadline.remaining() <= 0.2
    deadline.sleep(5)  # bounded by the deadline
    assert deadline.expired()
    assert deadline.remaining() == 0.0
    assert "0.2 s" in repr(deadline)
