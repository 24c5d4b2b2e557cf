"""The node's event counters: one typed table (a misspelt key is a type error).

Reported as ``counters`` in STATS (docs/protocol.md) and in the lab's
per-node results.
"""

from __future__ import annotations

from typing import TypedDict, cast


class NodeCounters(TypedDict):
    """How often each event happened since the node started."""

    acked: int
    send_failed: int
    sends: int
    forwarded: int
    dedup_hits: int
    replicated: int
    replicate_frames: int
    fetches: int
    relays: int
    relay_dups: int
    relay_forwarded: int
    errors_sent: int
    bad_frames: int
    unknown_ops: int
    timeouts_closed: int
    handoff_sent: int
    handoff_received: int
    handoffs: int
    syncs: int
    fenced: int
    transient_pushed: int
    slow_readers_closed: int
    delivered: int
    connections: int
    lease_lapses: int
    lease_refused: int
    replicate_refused: int
    rolled_back: int
    sync_failed: int
    handoff_blocks_same: int
    handoff_blocks_pushed: int
    placement_rounds: int


def new_counters() -> NodeCounters:
    """Every counter at 0."""
    return cast("NodeCounters", dict.fromkeys(NodeCounters.__required_keys__, 0))
