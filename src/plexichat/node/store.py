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
positive.  A message id is stored at most once; a (channel, seq) pair can be
held by more than one message (see :meth:`MessageStore.fetch`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
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
class StorageStats:
    """Counters of a store's writes (``checkpoints``: SQLite only)."""

    commits: int = 0
    rows_inserted: int = 0
    rows_ignored: int = 0
    largest_group: int = 0
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

    def insert(self, records: Sequence[Record], callback: InsertCallback) -> None:
        """Store *records*: INSERT OR IGNORE on the message id.

        Returns at once; ``callback(inserted, corrections, error)`` runs later
        on the loop, once the rows are committed (durably, for a durable
        engine).  *inserted* counts rows newly stored; *corrections* maps the
        index (in *records*) of each record whose message id was already
        stored under another (channel, seq) to the seq it is stored at (the
        stored one wins; an exact duplicate is ignored without a correction).
        A repeated id within one batch behaves as if stored by an earlier
        batch.  On *error* nothing of the batch is stored.
        """
        ...

    async def fetch(self, channel: int, after: int, limit: int) -> list[Record]:
        """Messages of *channel* with ``seq > after``, by seq (ties: in the
        order they were stored), at most *limit* of them, except that a page
        never ends inside a seq: when the page is full, every message at its
        last seq is included, even beyond *limit*.  So a reader that goes on
        with ``after = last seq`` skips nothing, even where two messages share
        a seq."""
        ...

    async def digest(self, channel: int, block: int) -> dict[int, tuple[int, int]]:
        """Per block ``(seq - 1) // block`` holding any message of *channel*:
        ``(messages, xor of their message ids as 128-bit big-endian ints)``.
        Equal digests on two nodes mean (almost surely) the same rows."""
        ...

    async def delete_exact(self, records: Sequence[Record]) -> int:
        """Delete the rows whose channel, seq and message id all match one of
        *records* (other fields are ignored); return how many went.  A copy
        of the same message id under another seq stays."""
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
