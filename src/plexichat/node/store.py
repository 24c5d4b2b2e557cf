"""The message store a node writes through, and the engines behind it.

:class:`MessageStore` is everything :class:`~plexichat.node.server.Node` asks
of its storage; :func:`open_store` builds one by engine name.  Engines:

* ``"sqlite"``: :class:`~plexichat.node.storage.Storage`, SQLite in WAL mode
  behind a group-committing writer thread (``<data_dir>/messages.sqlite3``).
  Durable: a commit survives SIGKILL (``synchronous="normal"``) or a power
  loss (``"full"``) before its callback runs.
* ``"memory"``: :class:`~plexichat.node.memstore.MemoryStore`, plain Python
  structures on the event loop.  **Not durable**: everything is gone when
  the process ends.  For tests and simulations.

Messages are :class:`~plexichat.node.protocol.Record` rows; channel and
sender ids are unsigned 64-bit, message ids 16 bytes, sequence numbers
positive, terms (the ownership term of the owner that numbered a record)
non-negative; seq, ts_us and term fit in a signed 64-bit integer.  Within a
channel, a message id is stored at most once and a seq holds at most one
message: per channel and node the rows form a log (seqs ``1..last`` without
gaps, terms non-decreasing along seq; the node keeps it so, the store only
enforces the two uniqueness rules).  The same message id may be stored in
two channels.  Beside the rows, a store keeps one :class:`ChannelState` per
channel (docs/design/channel-order.md), written in the same operation as rows
(:meth:`MessageStore.insert`) and read back at start-up
(:meth:`MessageStore.channel_logs`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from plexichat.node.protocol import Record

Synchronous = Literal["normal", "full"]
Engine = Literal["sqlite", "memory"]
ENGINES: tuple[Engine, ...] = ("sqlite", "memory")

# callback(inserted rows, {index in batch: stored seq} for ids stored before, error)
InsertCallback = Callable[[int, dict[int, int], BaseException | None], None]


@dataclass
class ChannelState:
    """Durable per-channel ownership state (see docs/design/channel-order.md)."""

    channel: int
    promised: int = 0  # highest term this node promised
    promised_to: str = ""  # the candidate it promised it to
    accepted_term: int = 0  # term of the last config it accepted (0: none)
    accepted_members: tuple[str, ...] = ()  # that config, owner first
    commit: int = 0  # highest seq known committed


@dataclass
class ChannelLog:
    """One channel's log as stored: what a node learns at start-up."""

    last: int  # highest stored seq (0: none)
    epochs: list[tuple[int, int]]  # (term, first seq of that term), ascending by seq
    state: ChannelState  # the stored state row, or a default one


@dataclass
class StorageStats:
    """Counters of a store's writes (``checkpoints``: SQLite only)."""

    commits: int = 0
    rows_inserted: int = 0
    rows_ignored: int = 0
    largest_group: int = 0
    rows_truncated: int = 0
    checkpoints: int = 0
    errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class MessageStore(Protocol):
    """A node's message store.

    Lifecycle: :meth:`open`, then :meth:`start` on the node's event loop, then
    any other method (from that loop only), then :meth:`close` once.
    Operations take effect in the order they are called (an async method
    counts from when its coroutine first runs): a read sees every insert and
    delete called before it.  Insert callbacks run in the order of the
    inserts, and a result arrives after the callbacks of every insert called
    before it; all of them on the loop, never inside the call that queued
    them.
    """

    # Called on the loop, with the error, if the engine can no longer work
    # at all (its writer died); the node treats that as fatal.
    on_dead: Callable[[Exception], None] | None

    @property
    def stats(self) -> StorageStats:
        """Write counters (read by the node's STATS reply)."""
        ...

    def open(self) -> dict[int, int]:
        """Prepare the store; return ``{channel: highest stored seq}`` for every
        channel holding a message (``{}`` when empty).  A durable engine
        returns what earlier runs stored under the same data directory."""
        ...

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin serving on *loop* (after :meth:`open`, else RuntimeError)."""
        ...

    async def close(self) -> None:
        """Finish every queued operation, make it durable (if the engine is)
        and release the store.  Nothing may be called afterwards."""
        ...

    def channel_logs(self) -> dict[int, ChannelLog]:
        """``{channel: its log}`` for every channel holding a message or a
        state row (``{}`` when empty), read synchronously: call it after
        :meth:`open` and before :meth:`start` (else RuntimeError).

        *epochs* are the ``(term, lowest seq stored with that term)`` pairs,
        ascending by seq (on a log whose terms never decrease: where each
        term begins); *state* is the stored :class:`ChannelState`, or
        ``ChannelState(channel)`` when none was written.
        """
        ...

    def insert(
        self,
        records: Sequence[Record],
        callback: InsertCallback,
        *,
        truncate: Mapping[int, int] | None = None,
        states: Sequence[ChannelState] = (),
    ) -> None:
        """One atomic write: truncate, then save *states*, then store *records*.

        In this order, all in one operation (one transaction for a durable
        engine): (a) for each ``channel -> after`` in *truncate*, delete that
        channel's rows with ``seq > after`` (counted in
        :attr:`StorageStats.rows_truncated`); (b) replace the stored state row
        of each of *states* (the last one wins for a channel listed twice);
        (c) INSERT OR IGNORE *records*, each on its (channel, message id) and
        its (channel, seq).  *records* may be empty (a state-only or
        truncate-only write).  *truncate* and *states* are copied at the call.

        Returns at once; ``callback(inserted, corrections, error)`` runs later
        on the loop, once the operation is committed (durably, for a durable
        engine).  *inserted* counts rows newly stored; *corrections* maps the
        index (in *records*) of each record whose message id was already
        stored in its channel under another seq to the seq it is stored at
        (the stored one wins).  A record whose (channel, seq) is held by
        another message is ignored without a correction, and so is an exact
        duplicate (same channel, seq and message id).  A repeated id within
        one batch behaves as if stored by an earlier batch.  On *error*
        (e.g. an OverflowError for a value that does not fit in 64 bits)
        nothing of the operation is applied; other operations are not
        affected.
        """
        ...

    async def fetch(
        self, channel: int, after: int, limit: int, max_bytes: int | None = None
    ) -> list[Record]:
        """Messages of *channel* with ``seq > after``, by seq, at most *limit*
        of them and, with *max_bytes*, only as many as :func:`within_bytes`
        keeps (always the first).  A seq holds at most one message, so a
        reader that goes on with ``after = last seq`` of a page skips nothing."""
        ...

    async def lookup(
        self, keys: Sequence[tuple[int, bytes]]
    ) -> dict[tuple[int, bytes], tuple[int, int]]:
        """``{(channel, message id): (seq, term)}`` for each of *keys* that is
        stored (absent keys are left out).  A read like :meth:`fetch`: it sees
        every insert called before it."""
        ...

    async def digest(self, channel: int, block: int) -> dict[int, tuple[int, int]]:
        """Per block ``(seq - 1) // block`` holding any message of *channel*:
        ``(messages, xor of their message ids as 128-bit big-endian ints)``.
        Equal digests on two nodes mean (almost surely) the same rows."""
        ...

    async def delete_exact(self, records: Sequence[Record]) -> int:
        """Delete the rows whose channel, seq and message id all match one of
        *records* (other fields are ignored); return how many went.  The same
        message id under another seq or channel stays."""
        ...

    async def max_rowid(self) -> int:
        """Row id of the newest stored message (0 when empty).

        A row gets a positive id larger than the id of every row ever
        stored: ids are never handed out twice, even after
        :meth:`delete_exact` of the newest rows (the top may go down then,
        but the next row gets a new id above it).
        """
        ...

    async def rows_after(
        self, rowid: int, upto: int, limit: int
    ) -> list[tuple[int, Record]]:
        """``(row id, record)`` of messages with ``rowid < id <= upto``, by row
        id, at most *limit* of them."""
        ...

    async def count(self) -> tuple[int, int]:
        """``(messages, channels holding at least one message)``."""
        ...


def open_store(
    engine: str,
    data_dir: Path,
    synchronous: Synchronous = "normal",
    *,
    commit_interval: float = 0.002,
) -> MessageStore:
    """A new, unopened store of *engine* (one of :data:`ENGINES`) for a node
    whose files live in *data_dir*.  *synchronous* and *commit_interval*
    (the group commit's minimum seconds between commits) concern SQLite; the
    memory engine ignores them and *data_dir*."""
    if engine == "sqlite":
        from plexichat.node.storage import Storage

        return Storage(
            Path(data_dir) / "messages.sqlite3",
            synchronous,
            commit_interval=commit_interval,
        )
    if engine == "memory":
        from plexichat.node.memstore import MemoryStore

        return MemoryStore()
    raise ValueError(f"unknown store engine {engine!r} (expected one of {ENGINES})")


RECORD_COST = 64  # bytes a record costs in a frame besides its payload (at most)


def within_bytes(records: Iterable[Record], max_bytes: int | None) -> list[Record]:
    """The records of *records* (in order) until the next one would make
    ``sum(len(payload) + RECORD_COST)`` exceed *max_bytes*; the first one
    always (a message fits a frame on its own).  Stops reading *records*
    there, so a lazy source is read no further."""
    out: list[Record] = []
    if max_bytes is None:
        out.extend(records)
        return out
    size = 0
    for rec in records:
        size += len(rec.payload) + RECORD_COST
        if size > max_bytes and out:
            break
        out.append(rec)
    return out
