"""SQLite storage: group commit, idempotence on message id, restart."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from plexichat.node import protocol as p
from plexichat.node.storage import Storage


def rec(channel: int, seq: int, counter: int, payload: bytes = b"x") -> p.Record:
    return p.Record(channel, seq, p.message_id(1, counter), 1, 1000 + seq, payload)


async def insert(
    storage: Storage, records: list[p.Record]
) -> tuple[int, dict[int, int]]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, dict[int, int]]] = loop.create_future()

    def callback(inserted, corrections, error):
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result((inserted, corrections))

    storage.insert(records, callback)
    return await done


def test_insert_fetch_dedupe_and_reopen(tmp_path):
    path = tmp_path / "db" / "m.sqlite3"

    async def first() -> None:
        storage = Storage(path)
        assert storage.open() == {}
        storage.start(asyncio.get_running_loop())
        big = 2**64 - 5  # u64 channel ids above the signed range survive
        assert await insert(storage, [rec(big, 1, 1), rec(big, 2, 2)]) == (2, {})
        # a resent message id keeps its first sequence number
        assert await insert(storage, [rec(big, 3, 2), rec(big, 4, 3)]) == (1, {0: 2})
        rows = await storage.fetch(big, 0, 10)
        assert [(r.channel, r.seq, r.msg_id) for r in rows] == [
            (big, 1, p.message_id(1, 1)),
            (big, 2, p.message_id(1, 2)),
            (big, 4, p.message_id(1, 3)),
        ]
        assert [r.seq for r in await storage.fetch(big, 1, 1)] == [2]
        assert await storage.count() == (3, 1)
        assert storage.stats.rows_ignored == 1
        await storage.close()

    asyncio.run(first())

    async def second() -> None:
        storage = Storage(path)
        assert storage.open() == {2**64 - 5: 4}
        storage.start(asyncio.get_running_loop())
        assert await storage.count() == (3, 1)
        await storage.close()

    asyncio.run(second())
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_group_commit_batches_concurrent_inserts(tmp_path):
    async def run() -> None:
        storage = Storage(tmp_path / "m.sqlite3", synchronous="full")
        storage.open()
        storage.start(asyncio.get_running_loop())
        batches = [[rec(c, s, c * 1000 + s) for s in range(1, 51)] for c in range(20)]
        results = await asyncio.gather(*(insert(storage, b) for b in batches))
        assert all(r == (50, {}) for r in results)
        assert await storage.count() == (1000, 20)
        assert storage.stats.commits < 20  # several batches shared a commit
        assert storage.stats.largest_group >= 100
        await storage.close()

    asyncio.run(run())


def test_call_errors_reach_the_caller_and_writes_fail_cleanly(tmp_path):
    async def run() -> None:
        storage = Storage(tmp_path / "m.sqlite3")
        storage.open()
        storage.start(asyncio.get_running_loop())

        def boom(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT * FROM missing_table")

        with pytest.raises(sqlite3.OperationalError):
            await storage.call(boom)
        await storage.call(lambda conn: conn.execute("DROP TABLE messages"))
        with pytest.raises(sqlite3.OperationalError):
            await insert(storage, [rec(1, 1, 1)])
        assert storage.stats.errors == 1
        await storage.close()

    asyncio.run(run())


def test_start_requires_open(tmp_path):
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError):
            Storage(tmp_path / "m.sqlite3").start(loop)
    finally:
        loop.close()


def test_a_sequence_number_holds_one_message(tmp_path):
    async def scenario() -> None:
        storage = Storage(tmp_path / "m.sqlite3")
        storage.open()
        storage.start(asyncio.get_running_loop())
        # a second message offered at seq 3 (an old owner's unacknowledged
        # write, say) is ignored: (channel, seq) is unique (issue 11)
        rows = [rec(7, 1, 1), rec(7, 2, 2), rec(7, 3, 3), rec(7, 3, 4), rec(7, 4, 5)]
        assert (await insert(storage, rows))[0] == 4
        seen: list[bytes] = []
        after = 0
        while page := await storage.fetch(7, after, 3):
            seen += [r.msg_id for r in page]
            after = page[-1].seq
        assert seen == [r.msg_id for r in rows if r != rows[3]]
        first = await storage.fetch(7, 0, 3)
        assert [r.seq for r in first] == [1, 2, 3]
        await storage.close()

    asyncio.run(scenario())


def test_whole_seqs_cuts_between_sequence_numbers():
    from plexichat.node.readers import whole_seqs

    rows = [rec(1, s, i) for i, s in enumerate([1, 2, 2, 2, 3, 4])]
    assert [r.seq for r in whole_seqs(rows, 3)] == [1]
    assert [r.seq for r in whole_seqs(rows, 4)] == [1, 2, 2, 2]
    assert [r.seq for r in whole_seqs(rows, 10)] == [1, 2, 2, 2, 3, 4]
    # a first sequence number larger than the limit is still returned whole
    assert [r.seq for r in whole_seqs(rows[1:], 1)] == [2, 2, 2]
    assert whole_seqs([], 5) == []
