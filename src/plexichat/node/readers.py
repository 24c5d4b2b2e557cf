"""Readers: FETCH pages and SUBSCRIBE/DELIVER, of committed records only.

A FETCH answers with a page of a channel's committed records after a
sequence number (whole sequence numbers only, within the frame budget).
A subscriber gets a DELIVER for every record committed after it subscribed:
from the owner's write path as it commits, and from the channel order when
a replica's (or a new owner's) commit moves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node.transport import FrameConnection

if TYPE_CHECKING:
    from plexichat.node.server import Node

T = wire.MessageType
FRAME_ROOM: Final = 4096  # bytes of a frame kept for what surrounds the records


def whole_seqs(rows: list[p.Record], limit: int) -> list[p.Record]:
    """The longest prefix of at most *limit* rows that ends between two sequence
    numbers (at least the first sequence number's rows): a page a reader can
    continue with ``after = last seq`` without skipping anything."""
    if len(rows) <= limit:
        cut = len(rows)
    else:
        cut = max(0, limit)
        while 0 < cut < len(rows) and rows[cut - 1].seq == rows[cut].seq:
            cut -= 1
    if cut == 0 and rows:
        first = rows[0].seq
        cut = next((i for i, r in enumerate(rows) if r.seq != first), len(rows))
    return rows[:cut]


class Readers:
    """FETCH and SUBSCRIBE/DELIVER on *node* (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.subscribers: dict[int, set[FrameConnection]] = {}
        # FETCH store reads at once (the store thread also writes; each read
        # holds a few frames of records at most): more FETCHes wait their turn
        self._reads = asyncio.Semaphore(node.config.max_fetches)

    async def read(
        self, channel: int, after: int, count: int, budget: int
    ) -> list[p.Record]:
        """Up to *count* records of *channel* with ``seq > after``, by seq, no
        more than fit *budget* bytes (at least one): the store stops reading
        there, so a read never holds more than about one frame of records."""
        return await self.node.storage.fetch(channel, after, count, budget)

    # -- SUBSCRIBE, DELIVER ----------------------------------------------------------

    def on_subscribe(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        channel = p.decode_channel(payload)
        self.subscribers.setdefault(channel, set()).add(conn)
        conn.data.setdefault("subs", set()).add(channel)
        commit = self.node.order.meta(channel).commit
        conn.send(T.ACK, rid, p.encode_ack(channel, commit))

    def drop(self, conn: FrameConnection) -> None:
        """Forget the subscriptions of a closed connection."""
        for channel in conn.data.get("subs", ()):
            subs = self.subscribers.get(channel)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self.subscribers[channel]

    def committed_elsewhere(self, channel: int, old: int, new: int) -> None:
        """A replica's (or new owner's) commit moved: DELIVER (old, new]."""
        if channel in self.subscribers:
            self.node.spawn(self._deliver_range(channel, old, new), "deliver")

    async def _deliver_range(self, channel: int, old: int, new: int) -> None:
        node = self.node
        after = old
        budget = node.config.max_frame - FRAME_ROOM
        while after < new:
            rows = await self.read(channel, after, node.config.fetch_limit, budget)
            rows = [r for r in rows if r.seq <= new]
            if not rows:
                return
            self.deliver(rows)
            after = rows[-1].seq

    def deliver(self, records: Iterable[p.Record]) -> None:
        """Push committed records to this node's subscribers of their channels."""
        subscribers = self.subscribers
        counters = self.node.counters
        for rec in records:
            conns = subscribers.get(rec.channel)
            if conns:
                body = p.encode_deliver(rec)
                for conn in conns:
                    conn.send(T.DELIVER, 0, body)
                    counters["delivered"] += 1

    # -- FETCH --------------------------------------------------------------------

    def on_fetch(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        node = self.node
        channel, after, limit = p.decode_fetch(payload)
        limit = max(1, min(limit, node.config.fetch_limit))
        node.counters["fetches"] += 1
        node.spawn(self._fetch(conn, rid, channel, after, limit), "fetch")

    async def _fetch(
        self, conn: FrameConnection, rid: int, channel: int, after: int, limit: int
    ) -> None:
        node = self.node
        t0 = time.perf_counter_ns()
        budget = node.config.max_frame - FRAME_ROOM
        async with self._reads:
            if conn.closed:  # (dropped while this FETCH waited its turn)
                return
            meta = node.order.metas.get(channel)
            commit = 0 if meta is None else meta.commit
            rows: list[p.Record] = []
            if after < commit:  # only committed records are visible
                try:
                    rows = await self.read(
                        channel, after, min(limit, commit - after) + 1, budget
                    )
                except Exception as exc:
                    node.error(conn, rid, p.ErrorCode.INTERNAL, f"fetch: {exc}")
                    return
                rows = [r for r in rows if r.seq <= commit]
            total = len(rows) + (commit > after + len(rows))
            rows = whole_seqs(rows, limit)
            size = 0
            for index, rec in enumerate(rows):
                size += p.MESSAGE_RECORD.size + len(rec.payload)
                if size > budget:
                    rows = whole_seqs(rows, index)
                    break
            more = len(rows) < total
            conn.send(T.MESSAGES, rid, p.encode_messages(channel, rows, more))
        node.hist["fetch"].record(max(1, (time.perf_counter_ns() - t0) // 1000))
