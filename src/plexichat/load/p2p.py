"""P2P scenario: inject RELAY messages and measure how fast they reach every node.

Each relay is injected at one node (round robin) and spreads over a
``fanout``-ary tree of the live members rooted at that node (see
docs/protocol.md, RELAY).  Every node that receives a relay from a peer
records ``now - sent`` in its ``relay`` histogram; the scenario resets those
histograms first, waits until every node has seen every relay (or a timeout)
and merges them.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from plexichat.load.client import NodeClient, connect_all
from plexichat.load.report import percentiles_ms
from plexichat.node import protocol as p
from plexichat.node.auth import Credentials
from plexichat.stats import Histogram


@dataclass
class P2PConfig:
    nodes: list[tuple[str, int]]
    count: int = 200
    rate: float = 200.0
    fanout: int = 2
    ttl: int = 16
    payload: int = 64
    settle: float = 10.0
    timeout: float = 10.0
    credentials: Credentials | None = None  # an admin token resets histograms


async def _relay_counts(clients: list[NodeClient]) -> int:
    infos = await asyncio.gather(*(c.stats() for c in clients))
    return sum(int(info["counters"]["relays"]) for info, _ in infos)


async def run_p2p(config: P2PConfig) -> dict[str, Any]:
    """Inject ``count`` relays; report propagation latency percentiles."""
    creds = config.credentials
    token = None if creds is None else creds.token(1, admin=True)
    clients = await connect_all(config.nodes, config.timeout, token=token)
    try:
        before = await asyncio.gather(*(c.stats(reset=["relay"]) for c in clients))
        base = sum(int(info["counters"]["relays"]) for info, _ in before)
        live = [
            m for m in before[0][0]["members"] if m["status"] in ("alive", "suspect")
        ]
        n_nodes = len(live)
        body = os.urandom(config.payload)
        start = time.perf_counter()
        injected = 0
        for i in range(config.count):
            target = start + i / config.rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            relay = p.Relay(
                relay_id=int.from_bytes(os.urandom(8), "big"),
                sent_ns=time.time_ns(),
                ttl=config.ttl,
                fanout=config.fanout,
                root="",
                payload=body,
            )
            await clients[i % len(clients)].relay(relay)
            injected += 1
        expected = injected * n_nodes
        deadline = time.monotonic() + config.settle
        seen = 0
        while time.monotonic() < deadline:
            seen = await _relay_counts(clients) - base
            if seen >= expected:
                break
            await asyncio.sleep(0.05)
        merged = Histogram()
        infos = await asyncio.gather(*(c.stats() for c in clients))
        for _, hists in infos:
            if "relay" in hists:
                merged.merge(hists["relay"])
        pct = percentiles_ms(merged)
        return {
            "scenario": "p2p",
            "injected": injected,
            "nodes": n_nodes,
            "fanout": config.fanout,
            "deliveries": seen,
            "expected_deliveries": expected,
            "coverage": round(seen / expected, 4) if expected else 0.0,
            "samples": merged.count,
            "p2p_latency_ms": {
                "p50": pct["50%"],
                "p99": pct["99%"],
                "max": pct["100%"],
            },
            "percentiles_ms": pct,
        }
    finally:
        for c in clients:
            await c.close()
