"""Real guests: one x86_64 and one aarch64 guest boot, receive the wheel over SSH,
pass the golden vectors, talk to each other, and leave no process behind.

The images come from the cache (built when absent: a few minutes, cold); the
wheels from dist/ (rebuilt when older than the sources).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from plexilab.infra import machine, rundir
from plexilab.infra.sshclient import lab_key
from plexilab.proc import proc_starttime, wait_until
from plexilab.providers.inventory import InventoryEntry, InventoryHost
from plexilab.providers.qemu import GuestSpec, QemuHost, QemuLab

pytestmark = [pytest.mark.qemu]
if importlib.util.find_spec("pytest_timeout") is not None:
    # Cold caches: both images (~5 min) and both wheels (~1.5 min) in the first test.
    pytestmark.append(pytest.mark.timeout(1800))

ARCHES = ("x86_64", "aarch64")
ECHO_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(8)\n"
    "while True:\n"
    "    c,_=s.accept(); d=c.recv(65536)\n"
    "    c.sendall(d.upper()+sys.argv[2].encode()); c.close()\n"
)
ECHO_CLIENT = (
    "import socket,sys\n"
    "c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)\n"
    "c.sendall(b'ping'); print(c.recv(100).decode())\n"
)


@pytest.fixture(scope="module")
def artifacts(skips) -> dict[str, tuple[Path, Path]]:
    from plexilab.infra import setup_host
    from plexilab.infra.artifacts import ensure_artifacts

    # installs what is missing (as root); fails on the lab host if it cannot
    skips.setup("QEMU host set-up", setup_host.ensure)
    return {arch: ensure_artifacts(arch) for arch in ARCHES}


@pytest.fixture(scope="module")
def lab(artifacts: dict[str, tuple[Path, Path]]) -> Iterator[QemuLab]:
    from plexilab.infra import images

    images.images_for(ARCHES)
    specs = [
        GuestSpec(f"t-{arch}", arch, [slot], wheelhouse=artifacts[arch][1])
        for slot, arch in enumerate(ARCHES)
    ]
    with QemuLab(specs, port_base=7100) as running:
        yield running


@pytest.fixture(scope="module")
def installed(lab: QemuLab, artifacts) -> dict[str, QemuHost]:
    hosts = {h.arch: h for h in lab.hosts}
    for arch, host in hosts.items():
        wheel, house = artifacts[arch]
        report = host.install(wheel, house)
        assert "plexichat-" in report.output
    return hosts


@pytest.mark.parametrize("arch", ARCHES)
def test_wheel_runs_compiled_in_the_guest(
    installed: dict[str, QemuHost], arch: str
) -> None:
    host = installed[arch]
    res = host.run([host.python(), "-m", "plexichat.accel", "--json"], timeout=300)
    status = json.loads(res.stdout)
    assert status["machine"] == arch
    assert status["python"].startswith("3.11.")
    rc = host.run(
        [host.python(), "-m", "plexichat.accel", "--require-compiled"],
        timeout=300,
        check=False,
    )
    assert rc.returncode == 0, rc.stdout + rc.stderr


@pytest.mark.parametrize("arch", ARCHES)
def test_golden_vectors_pass_in_the_guest(
    installed: dict[str, QemuHost], arch: str
) -> None:
    from plexilab.providers.qemu import run_golden

    code, output = run_golden(installed[arch])
    assert code == 0, output[-4000:]
    assert " passed" in output


def _start_echo(host: QemuHost, index: int, tag: str) -> None:
    port = host.listen_endpoint(index).port
    script = f"{host.workdir()}/echo.py"
    host.ssh.run(f"cat > {script}", timeout=30, input=ECHO_SERVER.encode())
    host.spawn(
        ["python3", script, str(port), tag], log_path=f"{host.workdir()}/echo.log"
    )

    def answers() -> bool:
        probe = host.run(
            ["python3", "-c", ECHO_CLIENT, "127.0.0.1", str(port)],
            timeout=60,
            check=False,
        )
        return probe.returncode == 0

    if not wait_until(answers, 60, interval=0.5):
        raise AssertionError(f"echo server on {host.name}:{port} did not come up")


def test_guests_reach_each_other_and_the_lab_reaches_both(lab: QemuLab) -> None:
    a, b = lab.hosts
    _start_echo(a, 0, "-from-a")
    _start_echo(b, 1, "-from-b")
    for src, dst, index, tag in ((a, b, 1, "-from-b"), (b, a, 0, "-from-a")):
        ep = dst.peer_endpoint(index, src)
        assert ep.host.startswith("10.0.2.1")
        res = src.run(["python3", "-c", ECHO_CLIENT, ep.host, str(ep.port)], timeout=60)
        assert res.stdout.strip() == "PING" + tag
    for host, index, tag in ((a, 0, "-from-a"), (b, 1, "-from-b")):
        ep = host.lab_endpoint(index)
        assert ep.host == "127.0.0.1"
        with socket.create_connection((ep.host, ep.port), timeout=30) as conn:
            conn.sendall(b"lab")
            assert conn.recv(100) == b"LAB" + tag.encode()


def test_booted_guests_as_an_inventory(lab: QemuLab, tmp_path: Path) -> None:
    key_path = lab_key()[0]
    for host in lab.hosts:
        m = host.machine
        entry = InventoryEntry(
            name=f"inv-{host.name}",
            address="127.0.0.1",
            port=m.ssh_port,
            arch=host.arch,
            key=str(key_path),
            host_key=m.host_key.public_line,
            nodes=host.nodes,
        )
        inv = InventoryHost(entry)
        try:
            assert inv.run(["uname", "-m"], timeout=60).stdout.strip() == host.arch
            proc = inv.spawn(
                ["sh", "-c", "echo logged; exit 5"], log_path="/tmp/inv.log"
            )
            assert proc.wait(30) == 5
            inv.get("/tmp/inv.log", tmp_path / f"{host.arch}.log")
            assert (tmp_path / f"{host.arch}.log").read_text() == "logged\n"
            payload = tmp_path / "payload.bin"
            payload.write_bytes(os.urandom(300_000))
            inv.put(payload, "/tmp/payload.bin")
            digest = inv.run(["sha256sum", "/tmp/payload.bin"], timeout=60).stdout
            assert digest.split()[0] == hashlib.sha256(payload.read_bytes()).hexdigest()
        finally:
            inv.close()


def test_resources_are_sampled_over_qmp(lab: QemuLab) -> None:
    for m in lab.machines:
        sample = m.resources()
        assert len(sample.vcpu_seconds) == (m.config.smp or m.profile.smp)
        assert sample.vcpu_seconds[0] > 0
        assert sample.process_cpu_seconds >= sample.vcpu_seconds[0]
        assert sample.rss_bytes > 64 << 20


CHILD = """
import sys, time
from pathlib import Path
from plexilab.infra import rundir
from plexilab.infra.machine import Machine, MachineConfig
rundir.run_root = lambda: Path(sys.argv[1])  # a private run root, not the lab's
m = Machine(MachineConfig(arch="x86_64", name="orphan"))
m.launch()
print(m.pid, m.dir, flush=True)
time.sleep(600)
"""


def _gone(pid: int, timeout: float) -> bool:
    return wait_until(lambda: proc_starttime(pid) is None, timeout, interval=0.1)


def test_no_qemu_outlives_its_owner_and_reap_cleans_up(
    lab: QemuLab, tmp_path: Path
) -> None:
    """Reaps only the child's private run root: other labs' runs are not touched."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    root = tmp_path / "run"
    root.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        pid_text, run_dir = child.stdout.readline().split()
        qemu_pid = int(pid_text)
        assert proc_starttime(qemu_pid) is not None
        child.send_signal(signal.SIGKILL)  # no finally block runs in the owner
        child.wait(10)
        assert _gone(qemu_pid, 15), "QEMU survived its owner"
        assert Path(run_dir).parent.parent == root
        rundir.reap(root=root)
        assert not Path(run_dir).parent.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_shutdown_leaves_no_process_or_pidfile(lab: QemuLab) -> None:
    m = machine.Machine(machine.MachineConfig(arch="x86_64", name="short"))
    m.launch()
    pid = m.pid
    assert (m.dir / "qemu.pid").exists()
    twin = machine.Machine(machine.MachineConfig(arch="x86_64", name="short"))
    with pytest.raises(machine.MachineError, match="already runs"):
        twin.launch()
    m.shutdown(graceful=False)
    assert _gone(pid, 10)
    assert not (m.dir / "qemu.pid").exists()
    assert not (m.dir / "seed.tar").exists()  # the node's secrets are gone too


def test_invoke_tasks(artifacts, capsys, tmp_path: Path, monkeypatch) -> None:
    """The CLI path end to end: set-up, image, KVM verdict, push + golden, reap.

    ``qemu.reap`` runs on a private run root: other labs' dead runs (and their
    logs) on this host are theirs to reap.
    """
    from invoke.context import Context

    from plexilab.cli import qemu as cli
    from plexilab.cli import setup as setup_cli

    c = Context()
    setup_cli.host(c)
    cli.image(c, arch="x86_64")
    cli.kvm(c, arch="x86_64")
    cli.golden(c, arch="x86_64")
    with monkeypatch.context() as patch:
        patch.setattr(rundir, "run_root", lambda: tmp_path)
        cli.reap(c)
    out = capsys.readouterr().out
    assert "golden tests on x86_64: exit 0" in out
    assert "x86_64: tcg" in out or "x86_64: kvm" in out
    assert "reaped" in out


def test_wheels_main_builds_into_a_directory(artifacts, tmp_path: Path) -> None:
    from plexilab.infra import wheels

    assert (
        wheels.main(["--arch", "aarch64", "--out", str(tmp_path), "--no-wheelhouse"])
        == 0
    )
    (wheel,) = (tmp_path / "aarch64").glob("plexichat-*.whl")
    assert wheel.name.endswith("-cp311-cp311-linux_aarch64.whl")
    assert len(wheels.check_wheel(wheel, "aarch64")) == len(wheels.pyx_families())
