"""No stray nodes: a lab that dies, even by SIGKILL, takes its nodes with it.

Local nodes: the parent-death signal (forked from the launcher thread, so a
node started from a worker thread that has ended still lives while the lab
does) and a pidfile in the lab's run directory that ``rundir.reap`` uses
when the signal could not fire.

Inventory nodes (real machines over SSH; here the fake sshd of
``tests/lab/test_ssh.py`` on 127.0.0.1, which runs commands on this machine): the
lease watchdog kills them when the lab's SSH session ends, and the next lab
to connect reaps what a failed watchdog or a silent lab left behind.

Every "lab" is a ``python -c`` subprocess with its own ``PLEXILAB_RUN_ROOT``
under ``tmp_path``; every process a test starts (directly or through a lab)
is killed by PID (after checking its start time) when the test ends.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import paramiko
import pytest

from plexilab.infra import rundir
from plexilab.infra.sshclient import lab_key
from plexilab.proc import alive, proc_starttime, wait_until
from plexilab.providers.inventory import (
    InventoryEntry,
    InventoryHost,
    entries_toml,
    inventory_hosts,
)
from plexilab.providers.local import LocalHost

pytestmark = [pytest.mark.timeout(30)]

SRC = Path(__file__).resolve().parents[2] / "src"
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _fake_sshd_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "plexilab_tests_fake_sshd", Path(__file__).with_name("test_ssh.py")
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FakeSSHD = _fake_sshd_module().FakeSSHD

# A lab: spawns one node on a LocalHost from a worker thread that then ends
# (as the fault injector restarts nodes), prints its pid, and waits to die.
LOCAL_LAB = r"""
import sys, threading, time
from pathlib import Path
from plexilab.providers.local import LocalHost
workdir, die = Path(sys.argv[1]), sys.argv[2] == "1"
try:
    host = LocalHost(workdir=workdir, ports=1, die_with_lab=die)
except TypeError:  # a LocalHost without the option
    host = LocalHost(workdir=workdir, ports=1)
out = []
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
spawn = lambda: out.append(host.spawn(sleeper, log_path=str(workdir / "node.log")))
worker = threading.Thread(target=spawn)
worker.start()
worker.join()
print(out[0].pid, flush=True)
time.sleep(120)
"""

# A lab: spawns one node on an inventory host, prints its pid, waits to die.
INVENTORY_LAB = r"""
import json, sys, time
from plexilab.providers.inventory import InventoryEntry, InventoryHost
entry = InventoryEntry.from_dict(json.loads(sys.argv[1]))
host = InventoryHost(entry)
host.ssh.connect(timeout=20)
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
print(host.spawn(sleeper, log_path=entry.workdir + "/node.log").pid, flush=True)
time.sleep(120)
"""


class Procs:
    """Processes a test started (pid, start time), killed when it ends."""

    def __init__(self) -> None:
        self.recorded: list[tuple[int, int | None]] = []
        self.labs: list[subprocess.Popen[bytes]] = []

    def track(self, pid: int) -> int | None:
        start = proc_starttime(pid)
        self.recorded.append((pid, start))
        return start

    def lab(
        self, script: str, *args: str, run_root: Path
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start a lab process; return it and the pid of the node it printed."""
        env = dict(os.environ)
        env["PLEXILAB_RUN_ROOT"] = str(run_root)
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.labs.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        line = proc.stdout.readline() if ready else b""
        if not line.strip():
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"the lab printed no node pid:\n{err.decode()[-3000:]}")
        pid = int(line)
        self.track(pid)
        return proc, pid

    def cleanup(self) -> None:
        for lab in self.labs:
            with contextlib.suppress(OSError):
                os.killpg(lab.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                lab.wait(10)
        for pid, start in self.recorded:
            if alive(pid, start):
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def procs() -> Iterator[Procs]:
    tracker = Procs()
    try:
        yield tracker
    finally:
        tracker.cleanup()


def sigkill(lab: subprocess.Popen[bytes]) -> None:
    lab.send_signal(signal.SIGKILL)
    lab.wait(10)


def pidfiles_of(root: Path, pid: int) -> list[Path]:
    found = []
    for path in root.rglob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text())["pid"] == pid:
                found.append(path)
    return found


# -- local nodes -----------------------------------------------------------------------


def test_a_sigkilled_lab_takes_its_local_nodes(tmp_path: Path, procs: Procs) -> None:
    lab, node = procs.lab(
        LOCAL_LAB, str(tmp_path / "w"), "1", run_root=tmp_path / "run"
    )
    start = proc_starttime(node)
    # the thread that spawned it has ended: the node lives on with the lab
    time.sleep(0.5)
    assert alive(node, start), "the node died with its spawning thread"
    sigkill(lab)
    assert wait_until(lambda: not alive(node, start), 5.0), (
        f"node pid {node} outlived its SIGKILLed lab"
    )


def test_a_local_node_has_a_pidfile_while_it_runs(tmp_path: Path, procs: Procs) -> None:
    host = LocalHost(workdir=tmp_path / "w", ports=1)
    try:
        process = host.spawn(SLEEPER, log_path=str(tmp_path / "w" / "node.log"))
        procs.track(process.pid)
        run_dir = rundir.current_run_dir()
        pidfiles = pidfiles_of(run_dir, process.pid)
        assert len(pidfiles) == 1, f"no pidfile of pid {process.pid} in {run_dir}"
        data = json.loads(pidfiles[0].read_text())
        assert data["pgid"] == process.pid
        assert data["starttime"] == proc_starttime(process.pid)
        assert process.stop(timeout=10) == -signal.SIGTERM
        assert not pidfiles[0].exists(), "the pidfile outlived its process"
    finally:
        host.close()


def test_reap_kills_a_local_node_whose_lab_is_dead(
    tmp_path: Path, procs: Procs
) -> None:
    root = tmp_path / "run"
    # no parent-death signal: as if it could not fire
    lab, node = procs.lab(LOCAL_LAB, str(tmp_path / "w"), "0", run_root=root)
    start = proc_starttime(node)
    assert pidfiles_of(root, node), f"no pidfile of node pid {node} under {root}"
    sigkill(lab)
    time.sleep(0.3)
    assert alive(node, start)  # the signal did not fire: the reaper must
    killed = rundir.reap(root=root)
    assert any(f"pid {node} " in line for line in killed), killed
    assert wait_until(lambda: not alive(node, start), 5.0)
    assert list(root.iterdir()) == []  # the dead run's directory is gone


# -- inventory nodes -------------------------------------------------------------------


@pytest.fixture
def client_key_path(tmp_path: Path) -> Path:
    return lab_key(tmp_path / "lab_ed25519")[0]


@pytest.fixture
def sshd(client_key_path: Path) -> Iterator[object]:
    key = paramiko.Ed25519Key.from_private_key_file(str(client_key_path))
    server = FakeSSHD(key)
    yield server
    server.close()


def entry_for(sshd: object, key: Path, workdir: Path) -> InventoryEntry:
    workdir.mkdir(parents=True, exist_ok=True)  # as inventory_hosts() does
    return InventoryEntry(
        name="fake",
        address="127.0.0.1",
        port=sshd.port,  # type: ignore[attr-defined]
        arch="x86_64",
        key=str(key),
        host_key=sshd.host_key.public_line,  # type: ignore[attr-defined]
        python=sys.executable,
        workdir=str(workdir),
    )


def watchdogs(workdir: Path) -> list[tuple[int, int]]:
    """(pid, start time) of the lease watchdogs recorded on the "remote" host."""
    found = []
    for path in (workdir / "leases").glob("*/watchdog.pid"):
        pid, start = path.read_text().split()
        found.append((int(pid), int(start)))
    return found


def node_records(workdir: Path) -> list[Path]:
    return sorted((workdir / "leases").glob("*/nodes/*.pid"))


def test_a_sigkilled_lab_takes_its_inventory_nodes(
    tmp_path: Path, procs: Procs, sshd: object, client_key_path: Path
) -> None:
    entry = entry_for(sshd, client_key_path, tmp_path / "remote")
    lab, node = procs.lab(
        INVENTORY_LAB, json.dumps(asdict(entry)), run_root=tmp_path / "run"
    )
    start = proc_starttime(node)
    for pid, wstart in watchdogs(tmp_path / "remote"):
        procs.recorded.append((pid, wstart))
    assert alive(node, start)
    sigkill(lab)
    assert wait_until(lambda: not alive(node, start), 10.0), (
        f"remote node pid {node} outlived its SIGKILLed lab"
    )
    # the watchdog ended the lease: nothing is left for the next run to reap
    assert wait_until(
        lambda: (
            not (tmp_path / "remote" / "leases").exists()
            or not any((tmp_path / "remote" / "leases").iterdir())
        ),
        5.0,
    )


def test_inventory_node_records_follow_the_nodes(
    tmp_path: Path, procs: Procs, sshd: object, client_key_path: Path
) -> None:
    workdir = tmp_path / "remote"
    host = InventoryHost(entry_for(sshd, client_key_path, workdir))
    try:
        host.ssh.connect(timeout=20)
        first = host.spawn(SLEEPER, log_path=str(workdir / "a.log"))
        second = host.spawn(SLEEPER, log_path=str(workdir / "b.log"))
        starts = {p.pid: procs.track(p.pid) for p in (first, second)}
        for pid, wstart in watchdogs(workdir):
            procs.recorded.append((pid, wstart))
        assert [p.stem for p in node_records(workdir)] == sorted(
            str(p.pid) for p in (first, second)
        )
        assert first.stop(timeout=10) == 128 + signal.SIGTERM
        assert [p.stem for p in node_records(workdir)] == [str(second.pid)]
    finally:
        host.close()  # ends the lease: the watchdog kills the node still running
    assert not alive(second.pid, starts[second.pid])
    assert not any((workdir / "leases").iterdir())


def test_next_run_reaps_nodes_a_failed_watchdog_left(
    tmp_path: Path, procs: Procs, sshd: object, client_key_path: Path
) -> None:
    workdir = tmp_path / "remote"
    entry = entry_for(sshd, client_key_path, workdir)
    lab, node = procs.lab(
        INVENTORY_LAB, json.dumps(asdict(entry)), run_root=tmp_path / "run"
    )
    start = proc_starttime(node)
    assert [p.stem for p in node_records(workdir)] == [str(node)]
    [(wpid, wstart)] = watchdogs(workdir)
    procs.recorded.append((wpid, wstart))
    os.kill(wpid, signal.SIGKILL)  # the watchdog cannot act
    assert wait_until(lambda: not alive(wpid, wstart), 5.0)
    sigkill(lab)
    time.sleep(0.3)
    assert alive(node, start)
    path = tmp_path / "hosts.toml"
    path.write_text(entries_toml([entry]))
    hosts = inventory_hosts(path, connect_timeout=20)  # the next run
    for host in hosts:
        host.close()
    assert wait_until(lambda: not alive(node, start), 5.0), (
        f"the next run did not reap remote node pid {node}"
    )
    assert not any((workdir / "leases").iterdir())


def test_next_run_reaps_the_nodes_of_a_silent_lab(
    tmp_path: Path, procs: Procs, sshd: object, client_key_path: Path
) -> None:
    """A lab whose connection is open but dead (a half-open TCP connection
    looks the same to sshd: no EOF) stops its heartbeat: once the lease is
    stale the next run kills its nodes and its watchdog."""
    workdir = tmp_path / "remote"
    entry = entry_for(sshd, client_key_path, workdir)
    lab, node = procs.lab(
        INVENTORY_LAB, json.dumps(asdict(entry)), run_root=tmp_path / "run"
    )
    start = proc_starttime(node)
    [(wpid, wstart)] = watchdogs(workdir)
    procs.recorded.append((wpid, wstart))
    lab.send_signal(signal.SIGSTOP)
    [alive_file] = (workdir / "leases").glob("*/alive")
    old = time.time() - 3600
    os.utime(alive_file, (old, old))
    host = InventoryHost(entry)
    try:
        host.ssh.connect(timeout=20)
        killed = host.reap_leftovers()
    finally:
        host.close()
    assert any(f"pid {node} " in line for line in killed), killed
    assert wait_until(lambda: not alive(node, start), 5.0)
    assert wait_until(lambda: not alive(wpid, wstart), 5.0)
    sigkill(lab)


def test_a_live_labs_lease_is_left_alone(
    tmp_path: Path, procs: Procs, sshd: object, client_key_path: Path
) -> None:
    workdir = tmp_path / "remote"
    entry = entry_for(sshd, client_key_path, workdir)
    lab, node = procs.lab(
        INVENTORY_LAB, json.dumps(asdict(entry)), run_root=tmp_path / "run"
    )
    start = proc_starttime(node)
    for pid, wstart in watchdogs(workdir):
        procs.recorded.append((pid, wstart))
    host = InventoryHost(entry)
    try:
        host.ssh.connect(timeout=20)
        assert host.reap_leftovers() == []
        other = host.spawn(SLEEPER, log_path=str(workdir / "other.log"))
        procs.track(other.pid)
        assert alive(node, start)
        assert len(watchdogs(workdir)) == 2
    finally:
        host.close()
    assert alive(node, start)
    sigkill(lab)
    assert wait_until(lambda: not alive(node, start), 10.0)
