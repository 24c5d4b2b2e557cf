"""plexilab.infra.ssh against a local fake sshd (paramiko server running ``sh -c``).

Covers the banner wait and retry/backoff (a listener that resets the first
connections, like QEMU's user network before sshd listens), host-key
pinning, concurrent draining of large stdout+stderr, command timeouts, and
``SSHHost.spawn``/``wait``/``send_signal`` -- all on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from plexilab.host import HostError
from plexilab.infra.ssh import SSHHost
from plexilab.infra.sshclient import (
    CommandTimeout,
    ConnectError,
    HostKeyPair,
    SSHClient,
    backoff_delays,
    lab_key,
    wait_for_banner,
)


class _Server(paramiko.ServerInterface):
    def __init__(self, allowed: paramiko.PKey) -> None:
        self.allowed = allowed
        self.command: bytes | None = None
        self.ready = threading.Event()

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else 2

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = key.get_base64() == self.allowed.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_channel_exec_request(
        self, channel: paramiko.Channel, command: bytes
    ) -> bool:
        self.command = command
        self.ready.set()
        return True


def _pump(src: object, send: object) -> None:
    while True:
        data = src.read1(65536)  # type: ignore[attr-defined]
        if not data:
            return
        try:
            send(data)  # type: ignore[operator]
        except OSError:  # the client closed the channel (a lab that went away)
            return


def _serve_exec(chan: paramiko.Channel, command: bytes) -> None:
    """Run *command* with sh; stream stdout/stderr; exit status last."""
    proc = subprocess.Popen(
        ["sh", "-c", command.decode()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None

    def feed() -> None:
        with contextlib.suppress(OSError, EOFError):
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                proc.stdin.write(data)  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]

    threads = [
        threading.Thread(target=feed, daemon=True),
        threading.Thread(target=_pump, args=(proc.stdout, chan.sendall), daemon=True),
        threading.Thread(
            target=_pump, args=(proc.stderr, chan.sendall_stderr), daemon=True
        ),
    ]
    for t in threads:
        t.start()
    try:
        code = proc.wait()
        threads[1].join()
        threads[2].join()
        chan.send_exit_status(code)
        chan.shutdown_write()
        chan.close()
    except (OSError, EOFError):
        with contextlib.suppress(OSError):
            import os

            os.killpg(proc.pid, signal.SIGKILL)


class FakeSSHD:
    """A paramiko SSH server on 127.0.0.1 that resets the first *resets* connections."""

    def __init__(self, client_key: paramiko.PKey, resets: int = 0) -> None:
        self.host_key = HostKeyPair.generate()
        self.client_key = client_key
        self.resets = resets
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.transports: list[paramiko.Transport] = []
        self.stopped = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.resets:
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
                )
                conn.close()  # RST, like slirp before sshd listens
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        transport = paramiko.Transport(conn)
        self.transports.append(transport)
        transport.add_server_key(self.host_key.pkey())
        server = _Server(self.client_key)
        try:
            transport.start_server(server=server)
        except (paramiko.SSHException, EOFError, OSError):
            return
        while transport.is_active():
            chan = transport.accept(1)
            if chan is None:
                continue
            server.ready.wait(10)
            server.ready.clear()
            assert server.command is not None
            threading.Thread(
                target=_serve_exec, args=(chan, server.command), daemon=True
            ).start()

    def close(self) -> None:
        self.stopped = True
        self.sock.close()
        for t in self.transports:
            t.close()


@pytest.fixture
def client_key(tmp_path: Path) -> paramiko.PKey:
    return lab_key(tmp_path / "lab_ed25519")[1]


@pytest.fixture
def sshd(client_key: paramiko.PKey) -> Iterator[FakeSSHD]:
    server = FakeSSHD(client_key)
    yield server
    server.close()


def connect(server: FakeSSHD, key: paramiko.PKey) -> SSHClient:
    client = SSHClient(
        "127.0.0.1", server.port, key=key, host_key=server.host_key.public_pkey()
    )
    return client.connect(timeout=20)


def test_backoff_doubles_up_to_the_cap() -> None:
    step = backoff_delays(first=0.1, factor=2.0, cap=1.0)
    assert [step() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_lab_key_is_created_once(tmp_path: Path) -> None:
    path, key, public = lab_key(tmp_path / "k")
    assert path.stat().st_mode & 0o777 == 0o600
    again = lab_key(tmp_path / "k")
    assert again[1].get_base64() == key.get_base64()
    assert public.startswith("ssh-ed25519 ")


def test_run_drains_large_stdout_and_stderr(sshd: FakeSSHD, client_key) -> None:
    client = connect(sshd, client_key)
    # 3 MB on each stream: more than the SSH window, written alternately.
    script = (
        'python3 -c "import sys\n'
        "for i in range(48):\n"
        " sys.stdout.write('o' * 65536); sys.stdout.flush()\n"
        " sys.stderr.write('e' * 65536); sys.stderr.flush()\n"
        'sys.exit(3)"'
    )
    res = client.run(script, timeout=60, check=False)
    client.close()
    assert res.returncode == 3
    assert res.stdout == "o" * (48 * 65536)
    assert res.stderr == "e" * (48 * 65536)


def test_run_passes_input_env_and_checks(sshd: FakeSSHD, client_key) -> None:
    client = connect(sshd, client_key)
    res = client.run(
        ["sh", "-c", 'cat; echo "$GREETING"'],
        timeout=30,
        env={"GREETING": "hi there"},
        input=b"in\n",
    )
    assert res.stdout == "in\nhi there\n"
    with pytest.raises(HostError, match="exited 4"):
        client.run("exit 4", timeout=30)
    client.close()


def test_run_is_bounded_by_its_timeout(sshd: FakeSSHD, client_key) -> None:
    client = connect(sshd, client_key)
    with pytest.raises(CommandTimeout):
        client.run(["sleep", "30"], timeout=0.5)
    # The connection stays usable afterwards.
    assert client.run(["echo", "ok"], timeout=30).stdout == "ok\n"
    client.close()


def test_connect_retries_through_resets(client_key) -> None:
    server = FakeSSHD(client_key, resets=3)
    try:
        client = connect(server, client_key)
        assert client.connect_attempts >= 4
        assert client.run(["true"], timeout=30).returncode == 0
        client.close()
    finally:
        server.close()


def test_connect_gives_up_at_the_deadline(client_key) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (kernel backlog) but never sends a banner
    try:
        client = SSHClient(
            "127.0.0.1",
            silent.getsockname()[1],
            key=client_key,
            host_key=HostKeyPair.generate().public_pkey(),
        )
        with pytest.raises(ConnectError):
            client.connect(timeout=1.5)
    finally:
        silent.close()


def test_banner_is_peeked_not_consumed(sshd: FakeSSHD) -> None:
    sock = wait_for_banner("127.0.0.1", sshd.port, timeout=10)
    try:
        assert sock.recv(4) == b"SSH-"
    finally:
        sock.close()


def test_wrong_host_key_is_rejected(sshd: FakeSSHD, client_key) -> None:
    client = SSHClient(
        "127.0.0.1",
        sshd.port,
        key=client_key,
        host_key=HostKeyPair.generate().public_pkey(),
    )
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect(timeout=20)


def test_unpinned_host_is_refused(client_key) -> None:
    with pytest.raises(ValueError, match="pin"):
        SSHClient("127.0.0.1", 22, key=client_key)


class _Host(SSHHost):
    def listen_endpoint(self, index: int):  # pragma: no cover - unused here
        raise NotImplementedError

    lab_endpoint = peer_endpoint = listen_endpoint  # type: ignore[assignment]


def test_spawn_wait_and_signal(sshd: FakeSSHD, client_key, tmp_path: Path) -> None:
    host = _Host("fake", "x86_64", connect(sshd, client_key), workdir=str(tmp_path))
    done = host.spawn(
        ["sh", "-c", "echo out; exit 7"], log_path=str(tmp_path / "a.log")
    )
    assert done.wait(20) == 7
    assert not done.alive()
    assert (tmp_path / "a.log").read_text() == "out\n"

    sleeper = host.spawn(
        ["sleep", "60"], log_path=str(tmp_path / "b.log"), env={"X": "1"}
    )
    assert sleeper.alive()
    assert sleeper.wait(0.2) is None
    assert sleeper.stop(timeout=10) == 128 + signal.SIGTERM
    assert not sleeper.alive()
    host.close()
