"""In-memory message store: the ``"memory"`` engine of
:class:`~plexichat.node.store.MessageStore`.

**Not durable**: the messages live in this process's memory and are gone when
it ends (a node restarted in a new process starts empty; one object reopened
after :meth:`MemoryStore.close` still holds them).  Meant for tests and
simulations: no threads and no files, every operation runs on the event loop,
and results are handed back through ``loop.call_soon`` (never synchronously
inside the call), so the order in which callbacks and results arrive matches
the SQLite engine's.  Channel states (terms, commit) live here too, so a
node restarted on a memory store starts with no log and no promises.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

from plexichat.node.protocol import Record
from plexichat.node.store import (
    ChannelLog,
    ChannelState,
    InsertCallback,
    StorageStats,
    within_bytes,
)

T = TypeVar("T")

_I64: Final = 1 << 63
_U64: Final = 1 << 64


def _check_fits(records: Sequence[Record], states: Sequence[ChannelState]) -> None:
    """Raise OverflowError for a value SQLite could not store (so that both
    engines refuse the same writes): ids beyond unsigned 64-bit, other
    integers beyond signed 64-bit."""
    for r in records:
        if not (
            -_I64 <= r.channel < _U64
            and -_I64 <= r.sender < _U64
            and -_I64 <= r.seq < _I64
            and -_I64 <= r.ts_us < _I64
            and -_I64 <= r.term < _I64
        ):
            raise OverflowError(f"record {r[:2]} does not fit in 64 bits")
    for st in states:
        if not (
            -_I64 <= st.channel < _U64
            and -_I64 <= st.promised < _I64
            and -_I64 <= st.accepted_term < _I64
            and -_I64 <= st.commit < _I64
        ):
            raise OverflowError(f"state of channel {st.channel} does not fit")


class MemoryStore:
    """Messages in dicts and sorted lists, served on the event loop."""

    def __init__(self) -> None:
        self.stats = StorageStats()
        self.on_dead: Callable[[Exception], None] | None = None  # never dies
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opened = False
        self._closed = False
        self._next_rowid = 1  # never reused, even after a delete
        self._rows: dict[int, Record] = {}  # row id -> record
        self._rowids: list[int] = []  # ascending
        # (channel, msg_id) -> (seq, row id)
        self._by_msg_id: dict[tuple[int, bytes], tuple[int, int]] = {}
        self._channels: dict[int, list[tuple[int, int]]] = {}  # sorted (seq, id)
        self._states: dict[int, ChannelState] = {}

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

    def channel_logs(self) -> dict[int, ChannelLog]:
        """Like SQLite's: after :meth:`open`, before :meth:`start`."""
        if not self._opened or self._loop is not None:
            raise RuntimeError(
                "MemoryStore.channel_logs(): after open(), before start()"
            )
        logs: dict[int, ChannelLog] = {}
        for channel in self._channels.keys() | self._states.keys():
            rows = self._channels.get(channel, [])
            first: dict[int, int] = {}  # term -> lowest seq (SQLite's GROUP BY)
            for seq, rowid in rows:
                first.setdefault(self._rows[rowid].term, seq)
            state = self._states.get(channel)
            logs[channel] = ChannelLog(
                rows[-1][0] if rows else 0,
                sorted(first.items(), key=lambda epoch: epoch[1]),
                dataclasses.replace(state) if state else ChannelState(channel),
            )
        return logs

    # -- API used from the event loop ---------------------------------------

    def insert(
        self,
        records: Sequence[Record],
        callback: InsertCallback,
        *,
        truncate: Mapping[int, int] | None = None,
        states: Sequence[ChannelState] = (),
    ) -> None:
        """Truncate, save *states*, INSERT OR IGNORE *records*, all at once;
        *callback* runs via ``loop.call_soon``.

        After :meth:`close` the callback gets a RuntimeError and nothing is
        stored; so does a write with a value SQLite could not store
        (OverflowError).
        """
        loop = self._running()
        if self._closed:
            loop.call_soon(callback, 0, {}, RuntimeError("store closed"))
            return
        try:
            _check_fits(records, states)
        except OverflowError as exc:
            self.stats.errors += 1
            loop.call_soon(callback, 0, {}, exc)
            return
        cuts = (truncate or {}).items()
        truncated = sum(self._truncate(channel, after) for channel, after in cuts)
        for st in states:
            self._states[st.channel] = dataclasses.replace(
                st, accepted_members=tuple(st.accepted_members)
            )
        inserted = 0
        corrections: dict[int, int] = {}
        for index, rec in enumerate(records):
            channel, seq, msg_id = rec.channel, rec.seq, bytes(rec.msg_id)
            found = self._by_msg_id.get((channel, msg_id))
            if found is not None:
                if found[0] != seq:
                    corrections[index] = found[0]
                continue
            index_rows = self._channels.setdefault(channel, [])
            at = bisect.bisect_left(index_rows, (seq, 0))
            if at < len(index_rows) and index_rows[at][0] == seq:
                continue  # the seq holds another message
            rowid = self._next_rowid
            self._next_rowid += 1
            self._rows[rowid] = Record(
                channel,
                seq,
                msg_id,
                rec.sender,
                rec.ts_us,
                bytes(rec.payload),
                rec.term,
            )
            self._rowids.append(rowid)
            self._by_msg_id[(channel, msg_id)] = (seq, rowid)
            index_rows.insert(at, (seq, rowid))
            inserted += 1
        stats = self.stats
        stats.commits += 1
        stats.rows_inserted += inserted
        stats.rows_ignored += len(records) - inserted
        stats.rows_truncated += truncated
        stats.largest_group = max(stats.largest_group, len(records))
        loop.call_soon(callback, inserted, corrections, None)

    async def fetch(
        self, channel: int, after: int, limit: int, max_bytes: int | None = None
    ) -> list[Record]:
        """Like SQLite's: by seq, at most *limit* (and *max_bytes*)."""
        self._check()
        index = self._channels.get(channel, [])
        start = bisect.bisect_right(index, (after, self._next_rowid))
        stop = start + max(limit, 0)
        rows = (self._rows[i] for _, i in index[start:stop])
        return await self._result(within_bytes(rows, max_bytes))

    async def lookup(
        self, keys: Sequence[tuple[int, bytes]]
    ) -> dict[tuple[int, bytes], tuple[int, int]]:
        self._check()
        out: dict[tuple[int, bytes], tuple[int, int]] = {}
        for channel, msg_id in keys:
            key = (channel, bytes(msg_id))
            found = self._by_msg_id.get(key)
            if found is not None:
                out[key] = (found[0], self._rows[found[1]].term)
        return await self._result(out)

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
            found = self._by_msg_id.get((rec.channel, bytes(rec.msg_id)))
            if found is None or found[0] != rec.seq:
                continue
            self._forget(rec.channel, found[1])
            rows = self._channels[rec.channel]
            del rows[bisect.bisect_left(rows, found)]
            if not rows:
                del self._channels[rec.channel]
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

    def _truncate(self, channel: int, after: int) -> int:
        """Delete *channel*'s rows with ``seq > after``; return how many."""
        rows = self._channels.get(channel)
        if not rows:
            return 0
        at = bisect.bisect_right(rows, (after, self._next_rowid))
        gone = rows[at:]
        del rows[at:]
        for _seq, rowid in gone:
            self._forget(channel, rowid)
        if not rows:
            del self._channels[channel]
        return len(gone)

    def _forget(self, channel: int, rowid: int) -> None:
        """Drop row *rowid* everywhere but from its channel's seq index."""
        del self._by_msg_id[(channel, self._rows.pop(rowid).msg_id)]
        del self._rowids[bisect.bisect_left(self._rowids, rowid)]

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
