"""In-memory message store: the ``"memory"`` engine of
:class:`~plexichat.node.store.MessageStore`.

**Not durable**: the messages live in this process's memory and are gone when
it ends (a node restarted in a new process starts empty; one object reopened
after :meth:`MemoryStore.close` still holds them).  Meant for tests and
simulations: no threads and no files, every operation runs on the event loop,
and results are handed back through ``loop.call_soon`` (never synchronously
inside the call), so the order in which callbacks and results arrive matches
the SQLite engine's.

A node keeps ``placed.json`` and ``ring.json`` in its data directory whatever
the engine; the row ids in ``placed.json`` describe the rows of the store that
wrote them, so a node restarted on a memory store should get a fresh data
directory.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence
from typing import TypeVar

from plexichat.node.protocol import Record
from plexichat.node.store import InsertCallback, StorageStats

T = TypeVar("T")


class MemoryStore:
    """Messages in dicts and sorted lists, served on the event loop."""

    def __init__(self) -> None:
        self.stats = StorageStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened = False
        self._closed = False
        self._next_rowid = 1  # never reused, even after a delete
        self._rows: dict[int, Record] = {}  # row id -> record
        self._rowids: list[int] = []  # ascending
        self._by_msg_id: dict[bytes, tuple[int, int, int]] = {}  # (channel, seq, id)
        self._channels: dict[int, list[tuple[int, int]]] = {}  # sorted (seq, id)

    # -- lifecycle ----------------------------------------------------------

    def open(self) -> dict[int, int]:
        """``{channel: highest seq}`` of what this object holds (new: ``{}``)."""
        self._opened = True
        self._closed = False
        return {channel: rows[-1][0] for channel, rows in self._channels.items()}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._opened:
            raise RuntimeError("MemoryStore.open() first")
        self._loop = loop

    async def close(self) -> None:
        """Stop serving (the contents stay in this object until it is dropped)."""
        if self._loop is not None:
            await self._result(None)  # callbacks queued before run first
        self._closed = True
        self._opened = False
        self._loop = None

    # -- API used from the event loop ---------------------------------------

    def insert(self, records: Sequence[Record], callback: InsertCallback) -> None:
        """INSERT OR IGNORE on msg_id; *callback* runs via ``loop.call_soon``.

        After :meth:`close` the callback gets a RuntimeError and nothing is
        stored.
        """
        loop = self._running()
        if self._closed:
            loop.call_soon(callback, 0, {}, RuntimeError("store closed"))
            return
        inserted = 0
        corrections: dict[int, int] = {}
        for index, rec in enumerate(records):
            channel, seq, msg_id = rec.channel, rec.seq, bytes(rec.msg_id)
            found = self._by_msg_id.get(msg_id)
            if found is not None:
                if (found[0], found[1]) != (channel, seq):
                    corrections[index] = found[1]
                continue
            rowid = self._next_rowid
            self._next_rowid += 1
            self._rows[rowid] = Record(
                channel, seq, msg_id, rec.sender, rec.ts_us, bytes(rec.payload)
            )
            self._rowids.append(rowid)
            self._by_msg_id[msg_id] = (channel, seq, rowid)
            bisect.insort(self._channels.setdefault(channel, []), (seq, rowid))
            inserted += 1
        stats = self.stats
        stats.commits += 1
        stats.rows_inserted += inserted
        stats.rows_ignored += len(records) - inserted
        stats.largest_group = max(stats.largest_group, len(records))
        loop.call_soon(callback, inserted, corrections, None)

    async def fetch(self, channel: int, after: int, limit: int) -> list[Record]:
        """Like SQLite's: by seq then row id; a page never ends inside a seq."""
        self._check()
        index = self._channels.get(channel, [])
        start = bisect.bisect_right(index, (after, self._next_rowid))
        stop = start + max(limit, 0)
        if stop < len(index) and stop > start:
            last = index[stop - 1][0]
            while stop < len(index) and index[stop][0] == last:
                stop += 1
        return await self._result([self._rows[i] for _, i in index[start:stop]])

    async def digest(self, channel: int, block: int) -> dict[int, tuple[int, int]]:
        self._check()
        out: dict[int, tuple[int, int]] = {}
        for seq, rowid in self._channels.get(channel, []):
            key = (seq - 1) // block
            count, xor = out.get(key, (0, 0))
            out[key] = (
                count + 1,
                xor ^ int.from_bytes(self._rows[rowid].msg_id, "big"),
            )
        return await self._result(out)

    async def delete_exact(self, records: Sequence[Record]) -> int:
        self._check()
        deleted = 0
        for rec in records:
            msg_id = bytes(rec.msg_id)
            found = self._by_msg_id.get(msg_id)
            if found is None or (found[0], found[1]) != (rec.channel, rec.seq):
                continue
            channel, seq, rowid = found
            del self._by_msg_id[msg_id]
            del self._rows[rowid]
            del self._rowids[bisect.bisect_left(self._rowids, rowid)]
            rows = self._channels[channel]
            del rows[bisect.bisect_left(rows, (seq, rowid))]
            if not rows:
                del self._channels[channel]
            deleted += 1
        return await self._result(deleted)

    async def max_rowid(self) -> int:
        self._check()
        return await self._result(self._rowids[-1] if self._rowids else 0)

    async def rows_after(
        self, rowid: int, upto: int, limit: int
    ) -> list[tuple[int, Record]]:
        self._check()
        ids = self._rowids
        start = bisect.bisect_right(ids, rowid)
        stop = min(bisect.bisect_right(ids, upto), start + max(limit, 0))
        return await self._result([(i, self._rows[i]) for i in ids[start:stop]])

    async def count(self) -> tuple[int, int]:
        self._check()
        return await self._result((len(self._rows), len(self._channels)))

    # -- helpers ------------------------------------------------------------

    def _running(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("MemoryStore.start() first")
        return self._loop

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("store closed")
        self._running()

    async def _result(self, value: T) -> T:
        """*value*, handed over through ``call_soon`` (after callbacks queued
        before it, as the SQLite engine's writer thread would)."""
        future: asyncio.Future[T] = self._running().create_future()
        self._running().call_soon(_settle, future, value)
        return await future


def _settle(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)
