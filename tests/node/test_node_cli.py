"""``plexichat-node``: arguments, JSON-lines logs, serving until SIGTERM."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal

import pytest

from plexichat.load.client import NodeClient
from plexichat.node import cli, logs
from plexichat.node.server import parse_address
from plexilab.providers.local import free_ports


def test_arguments_become_a_config(tmp_path):
    args = cli.build_parser().parse_args(
        [
            "--node-id",
            "a",
            "--listen",
            "0.0.0.0:7000",
            "--advertise",
            "[::1]:7001",
            "--seeds",
            "10.0.2.100:7000, 10.0.2.101:7000",
            "--data-dir",
            str(tmp_path),
            "--replicas",
            "3",
            "--gossip-interval",
            "0.1",
            "--suspect-timeout",
            "1",
            "--sync",
            "full",
            "--max-members",
            "32",
            "--forget-after",
            "5",
        ]
    )
    config = cli.config_from_args(args)
    assert (config.gossip.max_members, config.gossip.forget_after) == (32, 5.0)
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 7000)
    assert (config.advertise_host, config.advertise_port) == ("::1", 7001)
    assert config.seeds == [("10.0.2.100", 7000), ("10.0.2.101", 7000)]
    assert (config.replicas, config.synchronous) == (3, "full")
    assert (config.gossip.interval, config.gossip.suspect_timeout) == (0.1, 1.0)
    for bad in ("nohost", "host:", ":80", "h:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad)


def test_bad_listen_address_exits_2(tmp_path, capsys):
    assert (
        cli.main(["--node-id", "a", "--data-dir", str(tmp_path), "--listen", "x"]) == 2
    )
    assert "HOST:PORT" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for option in (
        "--node-id",
        "--listen",
        "--advertise",
        "--seeds",
        "--data-dir",
        "--replicas",
        "--gossip-interval",
        "--log-level",
    ):
        assert option in out


def test_logs_are_json_lines():
    stream = io.StringIO()
    logs.setup("debug", "n9", stream)
    log = logging.getLogger("plexichat.test")
    log.info("hello %s", "world", extra={"event": "greet", "n": 1})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "hello world"
    assert (first["event"], first["n"], first["node"], first["level"]) == (
        "greet",
        1,
        "n9",
        "info",
    )
    assert "RuntimeError: boom" in second["exc"]
    logs.setup("warning")


async def first_ack(port: int, timeout: float, token: str | None = None) -> int:
    """The sequence number a node on *port* gives one message.

    Retries only while nothing listens yet; a node that never listens, or that
    takes the connection and never answers, fails with ``TimeoutError``.
    """
    async with asyncio.timeout(timeout):
        while True:
            try:
                client = NodeClient("127.0.0.1", port, timeout=timeout, token=token)
                async with client:
                    return await client.send(5, b"\x00" * 16, 0, b"x")
            except ConnectionRefusedError:  # not listening yet
                await asyncio.sleep(0.01)


def test_first_ack_fails_when_nothing_listens() -> None:
    (port,) = free_ports(1)
    with pytest.raises(TimeoutError):
        asyncio.run(first_ack(port, timeout=0.5))


def test_first_ack_fails_when_the_node_never_answers() -> None:
    async def scenario() -> None:
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        async with silent:
            await first_ack(port, timeout=0.5)

    with pytest.raises(TimeoutError):
        asyncio.run(scenario())


def test_serve_until_sigterm(tmp_path, capsys):
    (port,) = free_ports(1)
    args = cli.build_parser().parse_args(
        [
            "--node-id",
            "solo",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path),
            "--replicas",
            "1",
        ]
    )

    config = cli.config_from_args(args)  # makes the node's own credentials
    token = (tmp_path / "auth" / "admin.token").read_text().strip()

    async def scenario() -> None:
        server = asyncio.create_task(cli.serve(config))
        ack = asyncio.create_task(first_ack(port, timeout=20, token=token))
        try:
            await asyncio.wait({ack, server}, return_when=asyncio.FIRST_COMPLETED)
            assert not server.done(), f"the node stopped first: {server!r}"
            assert ack.result() == 1
        except BaseException:  # no SIGTERM: the node may not handle it (yet)
            ack.cancel()
            server.cancel()
            raise
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(server, 10)

    asyncio.run(scenario())
    assert f"ready solo 127.0.0.1:{port}" in capsys.readouterr().out
