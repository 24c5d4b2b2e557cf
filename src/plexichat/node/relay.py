"""P2P relay: fan a RELAY message out over a tree of the ring's members.

A client injects a RELAY (empty root) at any node; that node becomes the
root, ACKs it and forwards it to its children in the *fanout*-ary tree of
the sorted ring members rotated to start at the root.  Each node forwards
once per relay id (duplicates are counted and dropped) while the TTL lasts,
and records the one-way latency of every relayed copy in the ``relay``
histogram.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from plexichat import wire
from plexichat.cache import LRUCache
from plexichat.node import protocol as p
from plexichat.node.counters import NodeCounters
from plexichat.node.transport import FrameConnection
from plexichat.stats import Histogram

T = wire.MessageType
Address = tuple[str, int]


def children(members: Iterable[str], me: str, root: str, fanout: int) -> list[str]:
    """Next hops of *me* in the *fanout*-ary tree of *members* rooted at *root*."""
    ids = sorted(members)
    if root not in ids or me not in ids or fanout < 1:
        return []
    start = ids.index(root)
    order = ids[start:] + ids[:start]
    first = order.index(me) * fanout + 1
    return order[first : first + fanout]


class Relayer:
    """The RELAY handler of node *node_id*.

    *members* returns the current ring members, *resolve* a member's address
    (None: unknown), and *post* sends a one-way frame to an address
    (``post(address, type, payload, task_name)``).  *counters* (``relays``,
    ``relay_dups``, ``relay_forwarded``) and *hist* (``relay``) are the node's
    own, updated in place.
    """

    def __init__(
        self,
        node_id: str,
        *,
        members: Callable[[], Iterable[str]],
        resolve: Callable[[str], Address | None],
        post: Callable[[Address, int, bytes, str], None],
        counters: NodeCounters,
        hist: Mapping[str, Histogram],
        capacity: int,
    ) -> None:
        self.id = node_id
        self.members = members
        self.resolve = resolve
        self.post = post
        self.counters = counters
        self.hist = hist
        self.seen: LRUCache[int, bool] = LRUCache(capacity)

    def children(self, root: str, fanout: int) -> list[str]:
        """Next hops of this node in the *fanout*-ary tree rooted at *root*."""
        return children(self.members(), self.id, root, fanout)

    def on_relay(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        """Handle one RELAY frame: ACK an injected one, drop a duplicate,
        forward to this node's children while the TTL lasts."""
        relay = p.decode_relay(payload)
        injected = not relay.root
        if not injected and conn.role != "peer":
            self.counters["refused_ops"] += 1
            conn.send_error(
                rid, p.ErrorCode.FORBIDDEN, "a RELAY with a root is for peers only"
            )
            return
        if injected:
            conn.send(T.ACK, rid, p.encode_ack(0, relay.relay_id))
        if relay.relay_id in self.seen:
            self.counters["relay_dups"] += 1
            return
        self.seen.put(relay.relay_id, True)
        self.counters["relays"] += 1
        root = self.id if injected else relay.root
        if not injected:
            elapsed = (time.time_ns() - relay.sent_ns) // 1000
            self.hist["relay"].record(max(1, elapsed))
        if relay.ttl == 0:
            return
        body = p.encode_relay(
            p.Relay(
                relay.relay_id,
                relay.sent_ns,
                relay.ttl - 1,
                relay.fanout,
                root,
                relay.payload,
            )
        )
        for child in self.children(root, relay.fanout):
            address = self.resolve(child)
            if address is None:
                continue
            self.counters["relay_forwarded"] += 1
            self.post(address, T.RELAY, body, "relay")
