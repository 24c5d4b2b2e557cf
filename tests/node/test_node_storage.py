"""SQLite storage: group commit, idempotence on message id, restart."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading

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


# -- the writer thread survives anything (issue 12) --------------------------------


class Boom(BaseException):
    """Not an Exception: what a plain ``except Exception`` lets through."""


async def started(tmp_path) -> Storage:
    storage = Storage(tmp_path / "m.sqlite3")
    storage.open()
    storage.start(asyncio.get_running_loop())
    return storage


async def bounded(awaitable, seconds: float = 5.0):
    """A storage operation must answer: a dead writer would never."""
    return await asyncio.wait_for(awaitable, seconds)


def test_an_out_of_range_seq_fails_its_write_and_the_writer_lives(tmp_path):
    """Issue 12: a seq >= 2**63 raised OverflowError (not a sqlite3.Error) in
    the writer thread.  Called directly, bypassing the protocol decoders."""

    async def run() -> None:
        storage = await started(tmp_path)
        with pytest.raises(OverflowError):
            await bounded(insert(storage, [rec(1, 2**63, 1)]))
        with pytest.raises(OverflowError):
            await bounded(insert(storage, [rec(1, 1, 2)._replace(term=2**63)]))
        assert await bounded(insert(storage, [rec(1, 1, 3)])) == (1, {})
        assert [r.seq for r in await bounded(storage.fetch(1, 0, 10))] == [1]
        assert storage.stats.errors == 2
        await storage.close()

    asyncio.run(run())


def test_a_call_that_raises_a_base_exception_fails_alone(tmp_path):
    async def run() -> None:
        storage = await started(tmp_path)

        def boom(conn: sqlite3.Connection) -> None:
            raise Boom("not an Exception")

        with pytest.raises(RuntimeError, match="Boom") as info:
            await bounded(storage.call(boom))
        assert isinstance(info.value.__cause__, Boom)
        assert await bounded(insert(storage, [rec(1, 1, 1)])) == (1, {})
        await storage.close()

    asyncio.run(run())


def test_an_unexpected_error_in_a_batch_fails_its_waiters_and_the_writer_lives(
    tmp_path, monkeypatch, caplog
):
    """Any exception escaping a batch (here: injected into the group commit)
    fails that batch's inserts and calls with an error, logged with its
    traceback; the next batch is written."""

    async def run() -> None:
        storage = await started(tmp_path)
        real = storage._write
        failures = [Boom("injected")]

        def failing_write(conn, inserts):
            if failures:
                raise failures.pop()
            return real(conn, inserts)

        monkeypatch.setattr(storage, "_write", failing_write)
        with pytest.raises(RuntimeError, match="unexpected error"):
            await bounded(insert(storage, [rec(1, 1, 1)]))
        assert await bounded(insert(storage, [rec(1, 1, 1)])) == (1, {})
        assert await bounded(storage.count()) == (1, 1)
        await storage.close()

    with caplog.at_level(logging.ERROR, logger="plexichat.node.storage"):
        asyncio.run(run())
    logged = [r for r in caplog.records if r.exc_info is not None]
    assert logged
    assert logged[0].exc_info[0] is Boom


def test_an_insert_callback_that_raises_does_not_starve_the_others(tmp_path, caplog):
    """Callbacks of one group commit run one after the other on the loop: one
    that raises is logged, and the others still run."""

    async def run() -> None:
        storage = await started(tmp_path)
        gate = threading.Event()
        held = storage.call(lambda conn: gate.wait(5))  # the writer waits here
        got: list[tuple[int, BaseException | None]] = []

        def bad(inserted, corrections, error) -> None:
            raise RuntimeError("a caller's bug")

        storage.insert([rec(1, 1, 1)], bad)
        done = asyncio.get_running_loop().create_future()

        def good(inserted, corrections, error) -> None:
            got.append((inserted, error))
            done.set_result(None)

        storage.insert([rec(1, 2, 2)], good)  # same group commit as the bad one
        gate.set()
        await bounded(held)
        await bounded(done)
        assert got == [(1, None)]
        await storage.close()

    with caplog.at_level(logging.ERROR, logger="plexichat.node.storage"):
        asyncio.run(run())
    assert any("callback" in r.getMessage() for r in caplog.records)


def test_a_dead_writer_fails_every_operation_loudly(tmp_path, caplog):
    """If the writer thread itself ends (here: its loop crashes at once), the
    failure is logged as critical, every operation fails at once instead of
    waiting forever, and the node is told (``on_dead``)."""

    async def run() -> None:
        storage = Storage(tmp_path / "m.sqlite3")
        storage.open()
        told: list[BaseException] = []
        storage.on_dead = told.append

        def crash() -> None:
            raise Boom("the writer loop crashed")

        storage._serve = crash  # what the writer thread runs
        storage.start(asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="storage writer"):
            await bounded(insert(storage, [rec(1, 1, 1)]))
        with pytest.raises(RuntimeError, match="storage writer"):
            await bounded(storage.count())
        assert len(told) == 1
        assert isinstance(told[0].__cause__, Boom)
        await bounded(storage.close())

    with caplog.at_level(logging.CRITICAL, logger="plexichat.node.storage"):
        asyncio.run(run())
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
