"""Supervision: a background loop or the storage writer that dies takes the
node out of the ring with a non-zero exit, never leaves it running half-dead.

Before, a loop's exception was logged and the node went on without it (no
more commits flushed, no lease renewed, a dead writer that nobody noticed).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from plexichat.node import cli
from plexichat.node.server import Node
from plexichat.node.storage import Storage
from plexichat.node.testing import InProcessCluster, wait_for
from plexilab.providers.local import free_ports


class Boom(Exception):
    pass


async def _raises(self: Node, *args: Any, **kwargs: Any) -> None:
    await asyncio.sleep(0.05)
    raise Boom("the loop crashed")


async def _returns(self: Node, *args: Any, **kwargs: Any) -> None:
    await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("loop", "body"),
    [("_commit_flusher", _raises), ("_lease_keeper", _returns)],
    ids=["a-loop-raises", "a-loop-returns"],
)
def test_a_dead_background_loop_is_fatal(
    tmp_path, monkeypatch, caplog, loop, body, run
):
    monkeypatch.setattr(Node, loop, body)

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=1, replicas=1) as cluster:
            node = cluster.nodes[0]
            await asyncio.wait_for(node.failed.wait(), 10)
            assert node.failure is not None

    with caplog.at_level(logging.CRITICAL, logger="plexichat.node"):
        run(scenario())
    assert any(
        r.levelno == logging.CRITICAL and "leaves the ring" in r.getMessage()
        for r in caplog.records
    )


def test_a_node_whose_membership_loop_crashes_is_failed(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2) as cluster:
            node = cluster.nodes[1]
            assert node.membership is not None

            async def crash() -> None:
                raise Boom("gossip loop")

            node.membership._task = asyncio.ensure_future(crash())
            node.membership._task.add_done_callback(
                lambda t: node._supervised("errors", "membership", t)
            )
            await asyncio.wait_for(node.failed.wait(), 10)
            assert isinstance(node.failure, Boom)
            # what the CLI does next: leave; the other node sees it go
            await node.stop()
            other = cluster.nodes[0]
            assert other.membership is not None
            await wait_for(
                lambda: other.membership.members[node.id].status in ("left", "dead"),
                10,
                "the failed node gone",
            )

    run(scenario())


def test_the_cli_exits_non_zero_when_the_storage_writer_dies(
    tmp_path, monkeypatch, run
):
    def crash(self: Storage, *args: Any) -> None:
        raise Boom("the writer loop crashed")

    monkeypatch.setattr(Storage, "_serve", crash)
    (port,) = free_ports(1)
    argv = ["--node-id", "solo", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(tmp_path), "--replicas", "1"]
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert run(cli.serve(config), 30) == 1


def test_a_clean_stop_is_not_a_failure(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(Path(tmp_path), size=1, replicas=1) as cluster:
            node = cluster.nodes[0]
        assert node.failure is None
        assert not node.failed.is_set()

    run(scenario())
