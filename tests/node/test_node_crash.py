"""A node SIGKILLed and restarted on its data dir loses no acknowledged message."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from plexichat.load import journal as jr
from plexichat.load.checker import run_check
from plexichat.load.client import NodeClient
from plexichat.node import protocol as p
from plexichat.node.auth import Credentials
from plexichat.node.transport import RemoteError
from plexichat.routing import Ring, key_of
from plexilab.providers.local import LocalHost
from plexilab.run.cluster import Cluster, ClusterConfig, prepare

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")


async def send_acked(
    client: NodeClient, channel: int, msg_id: int, sender: int, body: bytes
) -> int:
    """Send until acknowledged, as a chat client does: a node that cannot take
    the write now (no lease, view changing) says UNAVAILABLE, and the retry
    under the same message id is idempotent.  Fails after a deadline."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await client.send(channel, msg_id, sender, body)
        except RemoteError as error:
            if error.code != p.ErrorCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


async def send_many(endpoint, channels, sender, start, count, creds):
    """Send *count* messages round robin over *channels* as client *sender*;
    return journal entries."""
    entries = []
    token = creds.token(sender)
    async with NodeClient(
        endpoint.host, endpoint.port, timeout=10, token=token
    ) as client:
        for i in range(start, start + count):
            channel = channels[i % len(channels)]
            msg_id = p.message_id(sender, i)
            seq = await send_acked(client, channel, msg_id, sender, b"payload-%d" % i)
            entries.append(jr.Entry(msg_id, channel, sender, i, seq))
    return entries


def test_sigkill_and_restart_loses_no_acknowledged_message(tmp_path):
    host = LocalHost(workdir=tmp_path / "host")
    config = ClusterConfig(nodes=3, gossip_interval=0.1, suspect_timeout=2.0)
    cluster = Cluster([host], config, prepare([host], "dev"))
    channels = [key_of(f"crash-{i}") for i in range(12)]
    try:
        cluster.start()
        cluster.wait_converged(timeout=30)
        lab = cluster.lab_endpoints
        # n1 owns some of the channels: its acknowledged writes must survive.
        ring = Ring({"n0": 1.0, "n1": 1.0, "n2": 1.0})
        assert any(ring.owners(c, 1) == ["n1"] for c in channels)
        creds = Credentials(cluster.secret)
        before = asyncio.run(send_many(lab[0], channels, 11, 0, 120, creds))
        victim = cluster.nodes[1]
        pid = victim.process.pid
        cluster.kill(1)
        assert not victim.process.alive()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        # the survivors notice, take over and keep acknowledging
        cluster.wait_converged(timeout=30, nodes=[cluster.nodes[0], cluster.nodes[2]])
        during = asyncio.run(send_many(lab[2], channels, 12, 0, 60, creds))
        cluster.start_node(victim)  # same ports, same data dir
        cluster.wait_converged(timeout=30)
        after = asyncio.run(send_many(lab[1], channels, 13, 0, 30, creds))
        entries = before + during + after
        path = tmp_path / "journal.bin"
        jr.write(path, entries)
        nodes = [(e.host, e.port) for e in lab]

        async def checked():
            # the restarted owner gets the writes it missed through handoff
            for _ in range(200):
                result = await run_check(nodes, path, replicas=True, credentials=creds)
                if result.ok and result.replica_missing == 0:
                    return result
                await asyncio.sleep(0.05)
            return result

        result = asyncio.run(checked())
        assert result.acked == 210
        assert (result.lost, result.duplicated, result.reordered) == (0, 0, 0), result
        assert result.replica_missing == 0
        # one order per channel after the kill (issue 11): any violation fails
        assert result.ok, (result.violations(), result.examples)
    finally:
        cluster.stop()
        host.close()
    for node in cluster.nodes:
        assert not node.process.alive()
