"""Per-node message store: SQLite in WAL mode behind one writer thread.

Every database operation runs on a dedicated thread, in submission order, so
the event loop never blocks on SQLite.  Inserts are *group committed*: the
thread drains every batch queued while it was busy, writes them in one
transaction and commits once, then reports all results back to the loop in a
single ``call_soon_threadsafe``.

Durability: ``journal_mode=WAL`` with ``synchronous=NORMAL`` (the default
here) makes a committed transaction survive a crash of the node *process*
(SIGKILL included): the commit has been written to the WAL file, which the OS
keeps; only a power loss or kernel crash can roll back the last transactions,
because the WAL is fsynced at checkpoints only.  ``synchronous=FULL``
(``--sync full``) fsyncs the WAL on every commit and survives power loss too,
at a cost in throughput.  An acknowledgement is sent only after the commit
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from plexichat.node.protocol import Record
from plexichat.node.store import InsertCallback, StorageStats, Synchronous

__all__ = ["InsertCallback", "Storage", "StorageStats", "Synchronous"]

T = TypeVar("T")

# AUTOINCREMENT: a row id is never handed out twice, even after the newest
# rows were deleted (a rollback); the handoff's placement intervals are row
# id ranges and must not take in a later row under a reused id.
TABLE = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    msg_id BLOB NOT NULL,
    sender INTEGER NOT NULL,
    ts_us INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS messages_msg_id ON messages (msg_id);
CREATE INDEX IF NOT EXISTS messages_channel_seq ON messages (channel, seq);
"""
SCHEMA = TABLE + INDEXES
INSERT = (
    "INSERT OR IGNORE INTO messages (channel, seq, msg_id, sender, ts_us, payload) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
LOOKUP = "SELECT channel, seq FROM messages WHERE msg_id = ?"
FETCH = (
    "SELECT channel, seq, msg_id, sender, ts_us, payload FROM messages "
    "WHERE channel = ? AND seq > ? ORDER BY seq, id LIMIT ?"
)
FETCH_SEQ = (
    "SELECT channel, seq, msg_id, sender, ts_us, payload FROM messages "
    "WHERE channel = ? AND seq = ? ORDER BY id"
)

# (inserted rows, {index in batch: stored seq} for ids stored before, error)
InsertResult = tuple[int, dict[int, int], BaseException | None]


_SIGNED_TOP: Final = 1 << 63
_WRAP: Final = 1 << 64


def _to_signed(value: int) -> int:
    """SQLite integers are signed 64-bit: store u64 values two's-complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _to_unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


@dataclass
class _Insert:
    rows: list[tuple[int, int, bytes, int, int, bytes]]
    callback: InsertCallback


@dataclass
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


_STOP = object()


def _migrate_to_autoincrement(conn: sqlite3.Connection) -> None:
    """Rebuild a ``messages`` table made before row ids were AUTOINCREMENT
    (same rows, same ids; one transaction)."""
    row = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
    ).fetchone()
    if row is None or "AUTOINCREMENT" in str(row[0]).upper():
        return
    conn.execute("BEGIN")
    try:
        conn.execute("ALTER TABLE messages RENAME TO messages_before_autoincrement")
        conn.execute(TABLE)
        conn.execute("INSERT INTO messages SELECT * FROM messages_before_autoincrement")
        conn.execute("DROP TABLE messages_before_autoincrement")
        conn.execute("COMMIT")
    except sqlite3.Error:
        conn.execute("ROLLBACK")
        raise


class Storage:
    """SQLite message store with a group-committing writer thread (the
    ``"sqlite"`` engine of :class:`~plexichat.node.store.MessageStore`)."""

    def __init__(
        self,
        path: Path,
        synchronous: Synchronous = "normal",
        *,
        commit_interval: float = 0.002,
        checkpoint_interval: float = 0.25,
    ) -> None:
        self.path = Path(path)
        self.synchronous: Synchronous = synchronous
        self.commit_interval = commit_interval
        self.checkpoint_interval = checkpoint_interval
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self.stats = StorageStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle ----------------------------------------------------------

    def open(self) -> dict[int, int]:
        """Create the schema; return ``{channel: last seq}`` of what is stored."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA cache_size=-65536")
        conn.execute("PRAGMA temp_store=MEMORY")
        # Checkpoints run on their own thread and connection (see _checkpoints)
        # so that copying the WAL into the database never stalls a commit.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        _migrate_to_autoincrement(conn)
        conn.executescript(SCHEMA)
        rows = conn.execute("SELECT channel, MAX(seq) FROM messages GROUP BY channel")
        last = {_to_unsigned(c): int(s) for c, s in rows}
        self._conn = conn
        return last

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer thread (after :meth:`open`)."""
        if self._conn is None:
            raise RuntimeError("Storage.open() first")
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="storage", daemon=True)
        self._thread.start()
        self._stop_checkpoints.clear()
        self._checkpointer = threading.Thread(
            target=self._checkpoints, name="checkpoint", daemon=True
        )
        self._checkpointer.start()

    async def close(self) -> None:
        """Finish queued work, commit, checkpoint and close the database."""
        loop = asyncio.get_running_loop()
        if self._thread is not None:
            self._queue.put(_STOP)
            await loop.run_in_executor(None, self._thread.join)
            self._thread = None
        if self._checkpointer is not None:
            self._stop_checkpoints.set()
            await loop.run_in_executor(None, self._checkpointer.join)
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- API used from the event loop ---------------------------------------

    def insert(self, records: Sequence[Record], callback: InsertCallback) -> None:
        """Queue *records* (INSERT OR IGNORE on msg_id); *callback* runs on the loop.

        The callback gets the number of rows inserted, a ``{index: seq}`` map
        for records whose message id was stored before under another sequence
        number (the stored number wins) and an exception or None.
        """
        top, wrap = _SIGNED_TOP, _WRAP
        rows = [
            (
                c - wrap if c >= top else c,
                seq,
                msg_id,
                snd - wrap if snd >= top else snd,
                ts,
                payload,
            )
            for c, seq, msg_id, snd, ts, payload, _term in records
        ]
        self._queue.put(_Insert(rows, callback))

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn(connection)`` on the writer thread after queued writes."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Call(fn, future))
        return future

    async def fetch(self, channel: int, after: int, limit: int) -> list[Record]:
        """Messages of *channel* with ``seq > after``, in sequence order.

        A page never ends inside a sequence number: two messages can share one
        (an owner's unacknowledged write and the acknowledged one a new owner
        gave the same number during a partition), and a reader that goes on
        with ``after = last seq`` must not skip the second.  So the last
        sequence number's messages are all returned, even beyond *limit*.
        """

        def run(conn: sqlite3.Connection) -> list[Record]:
            signed = _to_signed(channel)
            rows = conn.execute(FETCH, (signed, after, limit)).fetchall()
            if rows and len(rows) >= limit:
                last = rows[-1][1]
                have = {r[2] for r in rows if r[1] == last}
                rows += [
                    r
                    for r in conn.execute(FETCH_SEQ, (signed, last)).fetchall()
                    if r[2] not in have
                ]
            return [
                Record(_to_unsigned(c), s, bytes(m), _to_unsigned(snd), ts, bytes(p))
                for c, s, m, snd, ts, p in rows
            ]

        return await self.call(run)

    async def digest(self, channel: int, block: int) -> dict[int, tuple[int, int]]:
        """Per block of *block* sequence numbers (``(seq - 1) // block``): rows
        and the xor of their 128-bit message ids (equal digests: same rows)."""

        def run(conn: sqlite3.Connection) -> dict[int, tuple[int, int]]:
            out: dict[int, tuple[int, int]] = {}
            rows = conn.execute(
                "SELECT seq, msg_id FROM messages WHERE channel = ?",
                (_to_signed(channel),),
            )
            for seq, msg_id in rows:
                key = (seq - 1) // block
                count, xor = out.get(key, (0, 0))
                out[key] = (count + 1, xor ^ int.from_bytes(msg_id, "big"))
            return out

        return await self.call(run)

    async def delete_exact(self, records: Sequence[Record]) -> int:
        """Delete exactly these rows (channel, seq and message id all match);
        an earlier copy of the same message under another seq stays."""
        keys = [(_to_signed(r.channel), r.seq, r.msg_id) for r in records]

        def run(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN")
            try:
                cursor = conn.executemany(
                    "DELETE FROM messages WHERE channel = ? AND seq = ? AND msg_id = ?",
                    keys,
                )
                conn.execute("COMMIT")
            except sqlite3.Error:
                conn.execute("ROLLBACK")
                raise
            return int(cursor.rowcount)

        return await self.call(run)

    async def max_rowid(self) -> int:
        """Row id of the last stored message (0 when empty); ids only grow."""

        def run(conn: sqlite3.Connection) -> int:
            (top,) = conn.execute(
                "SELECT COALESCE(MAX(id), 0) FROM messages"
            ).fetchone()
            return int(top)

        return await self.call(run)

    async def rows_after(
        self, rowid: int, upto: int, limit: int
    ) -> list[tuple[int, Record]]:
        """``(row id, record)`` of messages with ``rowid < id <= upto``, by id."""

        def run(conn: sqlite3.Connection) -> list[tuple[int, Record]]:
            rows = conn.execute(
                "SELECT id, channel, seq, msg_id, sender, ts_us, payload FROM messages "
                "WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                (rowid, upto, limit),
            ).fetchall()
            return [
                (
                    int(i),
                    Record(
                        _to_unsigned(c), s, bytes(m), _to_unsigned(snd), ts, bytes(p)
                    ),
                )
                for i, c, s, m, snd, ts, p in rows
            ]

        return await self.call(run)

    async def count(self) -> tuple[int, int]:
        """``(messages, channels)`` stored."""

        def run(conn: sqlite3.Connection) -> tuple[int, int]:
            (rows,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
            (chans,) = conn.execute(
                "SELECT COUNT(*) FROM (SELECT DISTINCT channel FROM messages)"
            ).fetchone()
            return int(rows), int(chans)

        return await self.call(run)

    # -- writer thread ------------------------------------------------------

    def _run(self) -> None:
        conn = self._conn
        loop = self._loop
        assert conn is not None
        assert loop is not None
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        interval = self.commit_interval
        stopping = False
        last_commit = 0.0
        while not stopping:
            items = [get()]
            # Group commit: let a burst accumulate for up to commit_interval
            # after the previous commit, so each commit carries more rows.
            pause = last_commit + interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            while True:
                try:
                    items.append(get_nowait())
                except queue.Empty:
                    break
            inserts: list[_Insert] = []
            calls: list[_Call] = []
            for item in items:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, _Insert):
                    inserts.append(item)
                else:
                    calls.append(item)
            results = self._write(conn, inserts) if inserts else []
            last_commit = time.monotonic()
            call_results = [self._call(conn, c) for c in calls]
            if results or call_results:
                try:
                    loop.call_soon_threadsafe(
                        self._deliver, inserts, results, calls, call_results
                    )
                except RuntimeError:  # loop closed during shutdown
                    return
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _checkpoints(self) -> None:
        """Copy the WAL into the database every ``checkpoint_interval`` seconds.

        PASSIVE checkpoints never wait for the writer; once one has copied
        everything, the writer starts the WAL over from its beginning.
        """
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            while not self._stop_checkpoints.wait(self.checkpoint_interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.stats.checkpoints += 1
                except sqlite3.Error:
                    self.stats.errors += 1
        finally:
            conn.close()

    def _write(
        self, conn: sqlite3.Connection, inserts: list[_Insert]
    ) -> list[InsertResult]:
        results: list[InsertResult] = []
        try:
            conn.execute("BEGIN")
            for item in inserts:
                cursor = conn.executemany(INSERT, item.rows)
                inserted = cursor.rowcount
                corrections: dict[int, int] = {}
                if inserted != len(item.rows):
                    for index, row in enumerate(item.rows):
                        found = conn.execute(LOOKUP, (row[2],)).fetchone()
                        if found is not None and tuple(found) != row[:2]:
                            corrections[index] = int(found[1])
                results.append((inserted, corrections, None))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.stats.errors += 1
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return [(0, {}, exc) for _ in inserts]
        total = sum(r[0] for r in results)
        rows = sum(len(i.rows) for i in inserts)
        self.stats.commits += 1
        self.stats.rows_inserted += total
        self.stats.rows_ignored += rows - total
        self.stats.largest_group = max(self.stats.largest_group, rows)
        return results

    @staticmethod
    def _call(
        conn: sqlite3.Connection, call: _Call
    ) -> tuple[Any, BaseException | None]:
        try:
            return call.fn(conn), None
        except Exception as exc:
            return None, exc

    @staticmethod
    def _deliver(
        inserts: list[_Insert],
        results: list[InsertResult],
        calls: list[_Call],
        call_results: list[tuple[Any, BaseException | None]],
    ) -> None:
        for item, (inserted, corrections, error) in zip(inserts, results, strict=True):
            item.callback(inserted, corrections, error)
        for call, (value, error) in zip(calls, call_results, strict=True):
            if call.future.done():
                continue
            if error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(value)
