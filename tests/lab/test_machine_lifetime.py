"""Machine's process lifetime against a fake QEMU (a script speaking QMP): no guest.

Covers launch (spawn in a group from the launcher thread, pidfile, QMP socket
wait, relay file), QMP calls, shutdown by QMP ``quit``, terminate-then-kill
of a QEMU that ignores SIGTERM, and the retries when QEMU fails to start.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plexilab import guest, proc
from plexilab.infra.images import Image
from plexilab.infra.machine import Machine, MachineConfig, MachineError

# A stand-in for qemu-system-*: serves QMP on the -qmp socket until "quit".
FAKE_QEMU = r"""
import json, os, signal, socket, sys
mode = os.environ.get("FAKE_QEMU_MODE", "ok")
if mode == "fail":
    sys.stderr.write("qemu: could not set up host forwarding rule\n")
    sys.exit(1)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
argv = sys.argv[1:]
path = argv[argv.index("-qmp") + 1].removeprefix("unix:").split(",")[0]
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(1)
conn, _ = server.accept()
out = conn.makefile("w")
send = lambda msg: (out.write(json.dumps(msg) + "\n"), out.flush())
send({"QMP": {"version": {"qemu": {"major": 8, "minor": 0, "micro": 0},
                          "package": ""}, "capabilities": []}})
buf, decoder = "", json.JSONDecoder()
while data := conn.recv(65536):  # a JSON stream: no newlines needed
    buf += data.decode()
    while buf.strip():
        try:
            msg, end = decoder.raw_decode(buf.lstrip())
        except ValueError:
            break
        buf = buf.lstrip()[end:]
        cmd, mid = msg.get("execute"), msg.get("id")
        if cmd == "query-status":
            send({"return": {"status": "running", "running": True}, "id": mid})
        else:
            send({"return": {}, "id": mid})
        if cmd == "quit" and mode != "stubborn":
            sys.exit(0)
signal.pause()
"""


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PLEXILAB_CACHE", str(tmp_path / "cache"))  # the lab key
    script = tmp_path / "fake-qemu"
    script.write_text(f"#!{sys.executable}\n{FAKE_QEMU}")
    script.chmod(0o755)
    return script


@pytest.fixture
def image(tmp_path: Path) -> Image:
    disk = tmp_path / "base.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True
    )
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    return Image("x86_64", "test", tmp_path, kernel, disk, {"kernel_version": "0"})


def _machine(name: str, fake: Path, image: Image) -> Machine:
    m = Machine(MachineConfig(arch="x86_64", name=name, accel="tcg"), image=image)
    m.profile = dataclasses.replace(m.profile, qemu=str(fake))
    return m


def test_launch_query_and_quit(fake: Path, image: Image, tmp_path: Path) -> None:
    name = f"fake-{tmp_path.name[-12:]}"
    m = _machine(name, fake, image)
    try:
        m.launch()
        assert m.running()
        assert m.accel == "tcg"
        rec = proc.read_pidfile(m.dir / "qemu.pid")
        assert rec is not None
        assert rec.pid == m.pid
        assert rec.pgid == m.pid  # its own process group
        assert rec.alive()
        assert (m.dir / "relay.py").read_bytes() == guest.source_bytes("relay.py")
        state = json.loads((m.dir / "guest.json").read_text())
        assert state["pid"] == m.pid
        assert state["ssh_port"] == m.ssh_port
        assert m.qmp("query-status")["status"] == "running"
    finally:
        code = m.shutdown()
    assert code == 0  # QMP quit: a clean exit, no signal needed
    assert not m.running()
    for gone in ("qemu.pid", "guest.json", "disk.qcow2", "seed.tar"):
        assert not (m.dir / gone).exists()
    assert m.shutdown() == 0  # idempotent


@pytest.mark.slow  # quit's 3 s, then SIGTERM's 3 s grace before SIGKILL
def test_a_qemu_ignoring_quit_and_sigterm_is_killed(
    fake: Path, image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "stubborn")
    m = _machine(f"stubborn-{tmp_path.name[-12:]}", fake, image)
    try:
        m.launch()
        pid = m.pid
        start = proc.proc_starttime(pid)
        t0 = time.monotonic()
    finally:
        code = m.shutdown(graceful=False)
    assert code == -signal.SIGKILL
    assert time.monotonic() - t0 >= 3.0  # SIGTERM and its grace period came first
    assert not proc.alive(pid, start)


def test_launch_retries_then_reports_qemu_errors(
    fake: Path, image: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "fail")
    m = _machine(f"failing-{tmp_path.name[-12:]}", fake, image)
    try:
        with pytest.raises(MachineError, match="QEMU failed 2 times") as err:
            m.launch(attempts=2)
        assert "host forwarding rule" in str(err.value)
        assert not (m.dir / "qemu.pid").exists()
    finally:
        m.shutdown(graceful=False)
