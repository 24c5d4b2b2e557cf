"""The lab's dockerd as a process, with a fake dockerd: start, give up, stop.

No engine runs: ``dockerd`` is a script and "the engine answers" is a file it
creates, so these run anywhere and never touch a real Docker engine.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plexilab import proc
from plexilab.infra import engine

FAKE_DOCKERD = r"""
import os, signal, sys, time
mode = os.environ.get("FAKE_DOCKERD_MODE", "ok")
print("fake dockerd", " ".join(sys.argv[1:]), flush=True)
if mode == "crash":
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "ok":
    open(os.environ["FAKE_DOCKERD_READY"], "w").close()
time.sleep(120)
"""


@pytest.fixture
def fake_dockerd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PLEXILAB_CACHE", str(tmp_path / "cache"))
    ready = tmp_path / "ready"
    monkeypatch.setenv("FAKE_DOCKERD_READY", str(ready))
    script = tmp_path / "dockerd"
    script.write_text(f"#!{sys.executable}\n{FAKE_DOCKERD}")
    script.chmod(0o755)
    monkeypatch.setattr(
        engine.shutil, "which", lambda name: str(script) if name == "dockerd" else None
    )
    monkeypatch.setattr(engine, "engine_running", ready.exists)
    return script


def _stop(pid: int) -> None:
    proc.signal_group(pid, signal.SIGKILL)
    proc.wait_until(lambda: proc.proc_starttime(pid) is None, 10)


def test_start_engine_returns_once_the_engine_answers(fake_dockerd: Path) -> None:
    pid = engine.start_engine(timeout=20)
    try:
        assert proc.alive(pid, None)
        assert proc.pgid_of(pid) == pid  # its own process group
        log = (engine.run_dir() / "dockerd.log").read_text()
        assert "--bridge=none" in log
    finally:
        _stop(pid)


def test_start_engine_reports_a_crash_with_the_log(
    fake_dockerd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOCKERD_MODE", "crash")
    with pytest.raises(engine.ContainerError, match="dockerd exited 3") as err:
        engine.start_engine(timeout=20)
    assert "fake dockerd" in str(err.value)


@pytest.mark.slow  # the 10 s grace period of a dockerd that ignores SIGTERM
def test_start_engine_gives_up_and_leaves_no_dockerd(
    fake_dockerd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOCKERD_MODE", "stubborn")  # never answers, no SIGTERM
    seen: list[subprocess.Popen[bytes]] = []
    spawn = proc.spawn
    monkeypatch.setattr(
        proc, "spawn", lambda *a, **kw: seen.append(spawn(*a, **kw)) or seen[-1]
    )
    t0 = time.monotonic()
    with pytest.raises(engine.ContainerError, match=r"did not answer within 0\.5s"):
        engine.start_engine(timeout=0.5)
    assert time.monotonic() - t0 < 30
    (dockerd,) = seen
    assert dockerd.returncode == -signal.SIGKILL  # terminated, then killed: reaped


def test_stop_engine_stops_the_recorded_dockerd(fake_dockerd: Path) -> None:
    assert engine.stop_engine() is False  # no pidfile: nothing of ours runs
    child = proc.spawn([str(fake_dockerd)], stdout=subprocess.DEVNULL)
    try:
        (engine.run_dir() / "dockerd.pid").write_text(f"{child.pid}\n")
        assert engine.stop_engine(timeout=5) is True
        assert child.wait(10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            _stop(child.pid)
            child.wait(10)
