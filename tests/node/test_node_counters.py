"""The node's counters: one typed table, all reported."""

from __future__ import annotations

import asyncio

from plexichat.node.counters import NodeCounters, new_counters
from plexichat.node.testing import InProcessCluster, admin_client


def test_new_counters_are_every_declared_key_at_zero():
    counters = new_counters()
    assert set(counters) == set(NodeCounters.__required_keys__)
    assert len(counters) == 37
    assert set(counters.values()) == {0}


def test_stats_report_exactly_the_declared_counters(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2, replicas=1) as cluster:
            node = cluster.nodes[0]
            client = admin_client(node)
            await client.connect()
            info, _ = await client.stats()
            await client.close()
            assert set(info["counters"]) == set(NodeCounters.__required_keys__)
            assert info["counters"]["connections"] >= 1

    asyncio.run(asyncio.wait_for(scenario(), 60))
