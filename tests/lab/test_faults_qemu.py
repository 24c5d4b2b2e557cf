"""QEMU fault plumbing without guests: the guestfwd relay's blocklist, the
relay network's files, and what pause/poweroff ask of QEMU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from plexilab.guest import source as guest_source
from plexilab.proc import proc_starttime
from plexilab.providers.qemu import QemuHost, RelayNetwork
from plexilab.run import faults


@pytest.fixture
def echo_port():
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def _relay(tmp_path: Path, port: int) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the relay as slirp would: the guest connection on stdin/stdout."""
    (tmp_path / "relay.py").write_text(guest_source("relay.py"))
    (tmp_path / "relays").mkdir(exist_ok=True)
    pidfile = tmp_path / "qemu.pid"  # "QEMU" is this test process
    pidfile.write_text(
        json.dumps({"pid": os.getpid(), "starttime": proc_starttime(os.getpid())})
    )
    guest, relay_end = socket.socketpair()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-S",
            "-E",
            str(tmp_path / "relay.py"),
            str(port),
            str(tmp_path / "relays"),
            str(pidfile),
        ],
        stdin=relay_end,
        stdout=relay_end,
    )
    relay_end.close()
    guest.settimeout(10)
    return proc, guest


def _block(tmp_path: Path, ports: list[int]) -> None:
    tmp = tmp_path / "blocked.tmp"
    tmp.write_text("".join(f"{p}\n" for p in ports))
    tmp.replace(tmp_path / "blocked")


def test_relay_cuts_and_refuses_blocked_ports(tmp_path, echo_port):
    # another port listed: no effect (the relay reads the list before it
    # connects, so no wait is needed to know it has seen it)
    _block(tmp_path, [echo_port + 1])
    proc, guest = _relay(tmp_path, echo_port)
    try:
        guest.sendall(b"hello")
        assert guest.recv(10) == b"hello"
        _block(tmp_path, [echo_port])
        assert guest.recv(10) == b""  # the live connection is cut
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        guest.close()
    # a new connection while blocked is refused before anything is relayed
    proc, guest = _relay(tmp_path, echo_port)
    try:
        assert proc.wait(10) == 1
        assert guest.recv(10) == b""
    finally:
        guest.close()
    _block(tmp_path, [])
    proc, guest = _relay(tmp_path, echo_port)
    try:
        guest.sendall(b"healed")
        assert guest.recv(10) == b"healed"
    finally:
        proc.kill()
        proc.wait(10)
        guest.close()


class FakeMachine:
    def __init__(self, directory: Path, forwards: dict[int, int]) -> None:
        self.dir = directory
        self.forwards = forwards
        self.calls: list[str] = []

    def qmp(self, cmd: str, args: object = None, timeout: float = 10) -> None:
        self.calls.append(cmd)


class FakeSSH:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def close(self) -> None:
        self.calls.append("close")

    def connect(self, timeout: float) -> None:
        self.calls.append("connect")

    def run(self, argv: list[str], timeout: float) -> None:
        self.calls.append(" ".join(argv))


def fake_guest(tmp_path: Path, name: str, index: int, host_port: int) -> QemuHost:
    host = QemuHost.__new__(QemuHost)
    host.name = name
    host.port_base = 7100
    directory = tmp_path / name
    directory.mkdir()
    host.machine = FakeMachine(directory, {7100 + index: host_port})  # type: ignore[assignment]
    host.ssh = FakeSSH()  # type: ignore[assignment]
    return host


def test_relay_network_writes_each_guests_blocklist(tmp_path):
    guests = [fake_guest(tmp_path, f"g{i}", i, 40000 + i) for i in range(3)]
    network = RelayNetwork([(g, i) for i, g in enumerate(guests)])

    def blocked(i: int) -> list[str]:
        return (tmp_path / f"g{i}" / "blocked").read_text().split()

    assert network.partition([0], [1, 2]) == 4
    assert blocked(0) == ["40001", "40002"]
    assert blocked(1) == ["40000"]
    assert blocked(2) == ["40000"]
    network.heal()
    assert blocked(0) == blocked(1) == blocked(2) == []
    shared = RelayNetwork([(guests[0], 0), (guests[0], 1)])
    with pytest.raises(Exception, match="share g0"):
        shared.partition([0], [1])


def test_qemu_pause_and_poweroff_use_qmp_and_reconnect(tmp_path):
    guest = fake_guest(tmp_path, "g0", 0, 40000)
    guest.pause(None)  # type: ignore[arg-type]
    guest.resume(None)  # type: ignore[arg-type]
    guest.power_off()
    guest.power_on(timeout=5)
    assert guest.machine.calls == [
        "stop",
        "cont",
        "set-action",  # a reset must not end QEMU (-no-reboot)
        "stop",
        "system_reset",
        "cont",
        "set-action",
    ]
    assert guest.ssh.calls == ["close", "connect", "true"]
    assert faults.supported([QemuHost]) == list(faults.KINDS)
    assert isinstance(guest.network_for([(guest, 0)]), RelayNetwork)
