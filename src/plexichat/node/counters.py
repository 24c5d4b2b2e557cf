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
    handoffs: int  # rebalance rounds after ring changes
    takeovers: int  # channel takeovers started (a new term)
    takeover_failed: int
    step_downs: int  # an owner gave a channel up after a failed write
    prepares_refused: int
    append_refused: int  # APPENDs of a term below this node's promise
    append_mismatch: int  # APPENDs whose prev (term, seq) this node lacks
    truncated: int  # conflicting tails dropped
    log_pulled: int  # records a new owner pulled from the best log
    log_installed: int  # records a new owner sent to its replicas
    slow_readers_closed: int
    delivered: int
    connections: int
    lease_lapses: int
    lease_refused: int
    auth_failures: int  # HELLOs whose token or peer proof did not verify
    refused_ops: int  # operations refused: unauthenticated or forbidden
    frames_received: int  # whole frames read on connections since closed
    # limits (docs/protocol.md "Limits")
    connections_refused: int  # accepted over max_connections, told and closed
    unauthenticated_closed: int  # over max_unauthenticated or auth_timeout
    idle_closed: int  # connections closed by idle_timeout
    inflight_resets: int  # paused connections whose unanswered requests stuck


def new_counters() -> NodeCounters:
    """Every counter at 0."""
    return cast("NodeCounters", dict.fromkeys(NodeCounters.__required_keys__, 0))
