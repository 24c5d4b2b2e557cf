"""``plexichat-node --http-listen``: the node process serves the API on a real
127.0.0.1 port next to its binary port, and stops it with the node."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from plexichat.node import cli
from plexilab.providers.local import free_ports

SRC = str(Path(__file__).resolve().parents[2] / "src")


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of the node's stdout within *timeout* seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("no line from the node")
    return proc.stdout.readline()


def test_node_serves_the_api_until_sigterm(tmp_path):
    port, http_port = free_ports(2)
    data = tmp_path / "d"
    argv = [sys.executable, "-m", "plexichat.node.cli", "--node-id", "solo"]
    argv += ["--listen", f"127.0.0.1:{port}", "--data-dir", str(data)]
    argv += ["--replicas", "1", "--http-listen", f"127.0.0.1:{http_port}"]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        bufsize=0,  # (unbuffered: select sees every line not read yet)
    )
    try:
        assert read_line(proc, 30).startswith(b"ready solo")
        assert read_line(proc, 10) == f"http 127.0.0.1:{http_port}\n".encode()
        # the node made its own secret and admin token (no --secret-file)
        token = (data / "auth" / "admin.token").read_text().strip()
        base = f"http://127.0.0.1:{http_port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/health").json() == {"status": "ok", "node_id": "solo"}
            url = "/channels/c/messages"
            assert http.post(url, json={"text": "no token"}).status_code == 401
            auth = {"Authorization": f"Bearer {token}"}
            r = http.post(url, json={"text": "hi"}, headers=auth)
            assert (r.status_code, r.json()["seq"]) == (201, 1)
            page = http.get(url, headers=auth).json()
            assert [m["text"] for m in page["messages"]] == ["hi"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        with pytest.raises(httpx.ConnectError):  # stopped with the node
            httpx.get(f"{base}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_without_the_flag_the_api_is_not_imported(tmp_path):
    """The node runs on its core dependencies: fastapi stays unimported."""
    code = (
        "import sys\n"
        "from plexichat.node import cli\n"
        f"args = cli.build_parser().parse_args(['--node-id', 'a', '--data-dir', "
        f"{str(tmp_path)!r}])\n"
        "cli.config_from_args(args)\n"
        "assert args.http_listen is None\n"
        "bad = sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'pydantic',"
        " 'plexichat.api') if m in sys.modules)\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_a_bad_http_address_exits_2(tmp_path, capsys):
    started = time.monotonic()
    argv = ["--node-id", "a", "--data-dir", str(tmp_path), "--http-listen", "nope"]
    assert cli.main(argv) == 2
    assert "--http-listen" in capsys.readouterr().err
    assert time.monotonic() - started < 10
