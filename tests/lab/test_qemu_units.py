"""Unit tests of the QEMU lab that need no guest: KVM fallback, reaper, relay, plan."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from plexilab import guest
from plexilab.infra import buildsteps, images, kvm
from plexilab.infra import rundir as runs
from plexilab.infra.kvm import ProbeResult, choose_accel
from plexilab.infra.sshclient import HostKeyPair
from plexilab.proc import proc_starttime, wait_until, write_pidfile
from plexilab.providers.inventory import InventoryEntry, entries_toml, load_inventory
from plexilab.providers.qemu import GuestSpec, plan


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinuz"
    path.write_bytes(b"kernel")
    return path


@pytest.fixture
def dev_kvm(tmp_path: Path) -> Path:
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    return path


class FakeProbe:
    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.calls = 0

    def __call__(self, profile: images.Profile, kernel: Path) -> ProbeResult:
        self.calls += 1
        return ProbeResult(self.ok, 0.1, "fake")


def test_kvm_falls_back_to_tcg_when_the_probe_fails(tmp_path, kernel, dev_kvm) -> None:
    probe = FakeProbe(ok=False)
    cache = tmp_path / "verdict.json"
    kw = {
        "probe": probe,
        "dev_kvm": dev_kvm,
        "host_arch": "x86_64",
        "cache_path": cache,
    }
    assert choose_accel("x86_64", kernel, **kw) == "tcg"
    assert choose_accel("x86_64", kernel, **kw) == "tcg"
    assert probe.calls == 1  # the verdict is cached
    assert [v["ok"] for v in json.loads(cache.read_text()).values()] == [False]


def test_kvm_is_used_when_the_probe_boots(tmp_path, kernel, dev_kvm) -> None:
    probe = FakeProbe(ok=True)
    kw = {"probe": probe, "dev_kvm": dev_kvm, "host_arch": "x86_64"}
    assert choose_accel("x86_64", kernel, cache_path=tmp_path / "v.json", **kw) == "kvm"
    # Another guest kernel is probed again.
    other = kernel.with_name("vmlinuz-2")
    other.write_bytes(b"another kernel")
    probe.ok = False
    assert choose_accel("x86_64", other, cache_path=tmp_path / "v.json", **kw) == "tcg"
    assert probe.calls == 2


def test_no_probe_without_kvm_or_for_a_foreign_arch(tmp_path, kernel) -> None:
    probe = FakeProbe(ok=True)
    cache = tmp_path / "v.json"
    missing = tmp_path / "no-kvm"
    assert (
        choose_accel("x86_64", kernel, probe=probe, dev_kvm=missing, cache_path=cache)
        == "tcg"
    )
    assert (
        choose_accel(
            "aarch64",
            kernel,
            probe=probe,
            dev_kvm=kernel,
            host_arch="x86_64",
            cache_path=cache,
        )
        == "tcg"
    )
    assert probe.calls == 0


def _fake_qemu(tmp_path: Path, body: str) -> images.Profile:
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    base = images.load_profile("x86_64")
    return images.Profile(**{**base.__dict__, "qemu": str(script)})


def test_probe_boot_needs_the_kernel_to_reach_its_panic(tmp_path, kernel) -> None:
    booted = _fake_qemu(
        tmp_path, "echo 'Linux version 6.1'; echo 'Kernel panic - not syncing: VFS'"
    )
    assert kvm.probe_boot(booted, kernel, timeout=10).ok
    hangs = _fake_qemu(tmp_path, "echo 'Booting from ROM..'; exec sleep 30")
    result = kvm.probe_boot(hangs, kernel, timeout=0.5)
    assert not result.ok
    assert result.detail.startswith("timeout")


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_reaper_kills_leftovers_of_dead_owners_only(tmp_path: Path) -> None:
    dead_dir = tmp_path / "dead-owner"
    live_dir = tmp_path / "live-owner"
    for d in (dead_dir, live_dir):
        d.mkdir()
    write_pidfile(live_dir / "owner.json", os.getpid(), "owner")
    (dead_dir / "owner.json").write_text(
        json.dumps({"pid": _dead_pid(), "starttime": 1})
    )
    orphan, kept = _sleeper(), _sleeper()
    try:
        write_pidfile(dead_dir / "qemu.pid", orphan.pid, "qemu")
        write_pidfile(live_dir / "qemu.pid", kept.pid, "qemu")
        killed = runs.reap(root=tmp_path)
        assert orphan.wait(10) == -signal.SIGTERM
        assert len(killed) == 1
        assert "qemu" in killed[0]
        assert not dead_dir.exists()
        assert kept.poll() is None
        assert live_dir.exists()
        assert runs.reap(root=tmp_path, everything=True)
        assert kept.wait(10) == -signal.SIGTERM
    finally:
        for p in (orphan, kept):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_reaper_checks_the_start_time(tmp_path: Path) -> None:
    """A pidfile whose PID now belongs to another process is not acted on."""
    rundir = tmp_path / "x"
    rundir.mkdir()
    (rundir / "owner.json").write_text(json.dumps({"pid": _dead_pid(), "starttime": 1}))
    bystander = _sleeper()
    try:
        start = proc_starttime(bystander.pid)
        assert start is not None
        (rundir / "qemu.pid").write_text(
            json.dumps(
                {"pid": bystander.pid, "pgid": bystander.pid, "starttime": start + 1}
            )
        )
        assert runs.reap(root=tmp_path) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_relay_bridges_a_connection_and_cleans_up(tmp_path: Path) -> None:
    """The guestfwd relay: stdin/stdout (a socket from slirp) <-> 127.0.0.1:PORT."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]

    def echo_upper() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            conn.sendall(data.upper())

    threading.Thread(target=echo_upper, daemon=True).start()
    relay = tmp_path / "relay.py"
    relay.write_text(guest.source("relay.py"))
    piddir = tmp_path / "relays"
    piddir.mkdir()
    fake_qemu = _sleeper()
    write_pidfile(tmp_path / "qemu.pid", fake_qemu.pid, "qemu")
    guest_side, relay_side = socket.socketpair()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-S",
            "-E",
            str(relay),
            str(port),
            str(piddir),
            str(tmp_path / "qemu.pid"),
        ],
        stdin=relay_side.fileno(),
        stdout=relay_side.fileno(),
        stderr=relay_side.fileno(),
        start_new_session=True,
    )
    relay_side.close()
    try:
        wait_until(lambda: list(piddir.glob("relay-*.pid")), 10, 0.02)
        assert [p.name for p in piddir.glob("*.pid")] == [f"relay-{proc.pid}.pid"]
        payload = b"hello guest " * 20000
        guest_side.sendall(payload)
        guest_side.shutdown(socket.SHUT_WR)
        received = b""
        guest_side.settimeout(10)
        while chunk := guest_side.recv(65536):
            received += chunk
        assert received == payload.upper()
        assert proc.wait(10) == 0
        assert list(piddir.glob("*.pid")) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        guest_side.close()
        server.close()
        fake_qemu.kill()
        fake_qemu.wait()


def test_relay_exits_when_qemu_is_gone(tmp_path: Path) -> None:
    """An idle relay whose QEMU died does not linger, even with both ends open."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    relay = tmp_path / "relay.py"
    relay.write_text(guest.source("relay.py"))
    fake_qemu = _sleeper()
    write_pidfile(tmp_path / "qemu.pid", fake_qemu.pid, "qemu")
    guest_side, relay_side = socket.socketpair()
    port = str(server.getsockname()[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-S",
            "-E",
            str(relay),
            port,
            str(tmp_path),
            str(tmp_path / "qemu.pid"),
        ],
        stdin=relay_side.fileno(),
        stdout=relay_side.fileno(),
        start_new_session=True,
    )
    relay_side.close()
    try:
        conn, _ = server.accept()  # the relay is connected and idle
        assert proc.poll() is None
        fake_qemu.kill()
        fake_qemu.wait()
        assert proc.wait(15) == 0
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        guest_side.close()
        server.close()


def test_plan_links_every_guest_to_every_other_node() -> None:
    specs = [GuestSpec("a", "x86_64", [0, 2]), GuestSpec("b", "aarch64", [1])]
    a, b = plan(specs, port_base=7100)
    assert set(a.forwards) == {7100, 7102}
    assert set(b.forwards) == {7101}
    assert [(lk.address, lk.port, lk.target_port) for lk in a.links] == [
        ("10.0.2.101", 7101, b.forwards[7101])
    ]
    assert sorted((lk.address, lk.port) for lk in b.links) == [
        ("10.0.2.100", 7100),
        ("10.0.2.100", 7102),
    ]
    with pytest.raises(ValueError, match="more than one guest"):
        plan([GuestSpec("a", "x86_64", [0]), GuestSpec("b", "x86_64", [0])])


def test_inventory_round_trip(tmp_path: Path) -> None:
    entry = InventoryEntry(
        name="g1",
        address="127.0.0.1",
        arch="aarch64",
        port=2222,
        host_key=HostKeyPair.generate().public_line,
        nodes=[1],
        lab_ports={7101: 40001},
    )
    path = tmp_path / "hosts.toml"
    path.write_text(entries_toml([entry]))
    (loaded,) = load_inventory(path)
    assert loaded == entry
    path.write_text('[[host]]\nname = "x"\naddress = "127.0.0.1"\narch = "x86_64"\n')
    with pytest.raises(ValueError, match="pinned"):
        load_inventory(path)


def test_setup_without_root_prints_the_commands(monkeypatch) -> None:
    from plexilab.infra import setup_host

    monkeypatch.setattr(setup_host.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(setup_host, "foreign_arch_enabled", lambda: False)
    monkeypatch.setattr(setup_host, "missing_packages", lambda: ["mmdebstrap"])
    monkeypatch.setattr(setup_host, "binfmt_enabled", lambda: False)
    monkeypatch.setattr(setup_host, "binfmt_mounted", lambda: True)

    def no_commands(argv):
        raise AssertionError(f"ran {argv} without root")

    monkeypatch.setattr(setup_host, "_run", no_commands)
    with pytest.raises(setup_host.HostSetupError) as info:
        setup_host.ensure(quiet=True)
    text = str(info.value)
    assert "sudo dpkg --add-architecture arm64" in text
    assert "sudo apt-get update" in text
    assert "mmdebstrap" in text
    assert "sudo update-binfmts --enable qemu-aarch64" in text


def test_setup_is_a_no_op_when_everything_is_there(monkeypatch) -> None:
    from plexilab.infra import setup_host

    monkeypatch.setattr(setup_host, "foreign_arch_enabled", lambda: True)
    monkeypatch.setattr(setup_host, "missing_packages", lambda: [])
    monkeypatch.setattr(setup_host, "binfmt_enabled", lambda: True)
    monkeypatch.setattr(setup_host, "_run", lambda argv: pytest.fail(f"ran {argv}"))
    assert setup_host.ensure(quiet=True).actions == []


def test_reap_can_keep_the_logs_of_dead_runs(tmp_path: Path) -> None:
    rundir = tmp_path / "dead"
    (rundir / "g0").mkdir(parents=True)
    (rundir / "owner.json").write_text(json.dumps({"pid": _dead_pid(), "starttime": 1}))
    for name in ("g0.serial.log", "disk.qcow2", "seed.tar"):
        (rundir / "g0" / name).write_text("x")
    assert runs.reap(root=tmp_path, keep_logs=True) == []
    assert sorted(p.name for p in (rundir / "g0").iterdir()) == ["g0.serial.log"]
    runs.reap(root=tmp_path)
    assert not rundir.exists()


def test_setup_probes(tmp_path: Path, monkeypatch, capsys, skips) -> None:
    from plexilab.infra import setup_host

    if shutil.which("dpkg-query") is None:
        skips.skip("not-debian-12", "no dpkg-query")
    missing = setup_host.missing_packages(["tar", "plexilab-no-such-package"])
    assert missing == ["plexilab-no-such-package"]
    monkeypatch.setattr(setup_host, "BINFMT_DIR", tmp_path)
    assert not setup_host.binfmt_enabled()
    assert not setup_host.binfmt_mounted()
    (tmp_path / "qemu-aarch64").write_text("disabled\ninterpreter x\n")
    assert not setup_host.binfmt_enabled()
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter x\n")
    assert setup_host.binfmt_enabled()
    monkeypatch.setattr(setup_host, "ensure", lambda **kw: setup_host.Report())
    assert setup_host.main([]) == 0
    assert "already has everything" in capsys.readouterr().out


def test_a_run_reaps_only_under_its_own_run_root(tmp_path: Path, monkeypatch) -> None:
    """``$PLEXILAB_RUN_ROOT`` moves the runs: the dead runs of another root (a
    user's lab beside the test suite) are left alone."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for root in (ours, theirs):
        (root / "dead").mkdir(parents=True)
        (root / "dead" / "owner.json").write_text(
            json.dumps({"pid": _dead_pid(), "starttime": 1})
        )
    monkeypatch.setenv("PLEXILAB_RUN_ROOT", str(ours))
    assert runs.run_root() == ours
    runs.reap()
    assert not (ours / "dead").exists()
    assert (theirs / "dead" / "owner.json").exists()


def test_the_suite_runs_under_its_own_run_root() -> None:
    """conftest points every lab run of the suite away from the user's root."""
    root = Path(os.environ["PLEXILAB_RUN_ROOT"])
    assert root.name == "run-tests"
    assert runs.run_root() == root
    assert root != buildsteps.cache_root() / "run"
