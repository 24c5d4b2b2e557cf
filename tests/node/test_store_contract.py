"""The MessageStore contract, checked against every engine (issue 11).

Each test runs on ``sqlite`` and ``memory``; the last one runs a whole
in-process cluster on the memory engine, through the unchanged write path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from plexichat.node import protocol as p
from plexichat.node.store import (
    ENGINES,
    RECORD_COST,
    ChannelLog,
    ChannelState,
    MessageStore,
    open_store,
)
from plexichat.node.testing import InProcessCluster, admin_client
from plexichat.routing import key_of

BIG = 2**64 - 5  # u64 ids above the signed 64-bit range
TOP = 2**64 - 1

engines = pytest.mark.parametrize("engine", ENGINES)


def rec(
    channel: int,
    seq: int,
    counter: int,
    payload: bytes = b"x",
    *,
    sender: int = 1,
    term: int = 0,
) -> p.Record:
    return p.Record(
        channel, seq, p.message_id(1, counter), sender, 1000 + seq, payload, term
    )


@contextlib.asynccontextmanager
async def opened(engine: str, data_dir: Path) -> AsyncIterator[MessageStore]:
    store = open_store(engine, data_dir)
    store.open()
    store.start(asyncio.get_running_loop())
    try:
        yield store
    finally:
        await store.close()


async def insert(
    store: MessageStore,
    records: Sequence[p.Record],
    *,
    truncate: Mapping[int, int] | None = None,
    states: Sequence[ChannelState] = (),
) -> tuple[int, dict[int, int]]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, dict[int, int]]] = loop.create_future()

    def callback(
        inserted: int, corrections: dict[int, int], error: BaseException | None
    ) -> None:
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result((inserted, corrections))

    store.insert(records, callback, truncate=truncate, states=states)
    return await done


async def everything(store: MessageStore, channel: int) -> list[p.Record]:
    return await store.fetch(channel, 0, 1_000_000)


def xor(*records: p.Record) -> int:
    out = 0
    for r in records:
        out ^= int.from_bytes(r.msg_id, "big")
    return out


@engines
def test_an_empty_store(engine, tmp_path, run):
    async def scenario() -> None:
        store = open_store(engine, tmp_path)
        assert store.open() == {}
        store.start(asyncio.get_running_loop())
        assert await store.fetch(1, 0, 10) == []
        assert await store.digest(1, 16) == {}
        assert await store.max_rowid() == 0
        assert await store.rows_after(0, 100, 10) == []
        assert await store.count() == (0, 0)
        assert await store.delete_exact([rec(1, 1, 1)]) == 0
        assert await insert(store, []) == (0, {})
        assert store.stats.rows_inserted == 0
        await store.close()

    run(scenario())


@engines
def test_start_requires_open(engine, tmp_path):
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError):
            open_store(engine, tmp_path).start(loop)
    finally:
        loop.close()


def test_unknown_engine_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown store engine"):
        open_store("postgres", tmp_path)


@engines
def test_records_round_trip_with_unsigned_64_bit_ids(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            rows = [
                rec(BIG, 1, 1, b"a", sender=TOP),
                rec(BIG, 2, 2, b"", sender=2**63),
                rec(2**63, 1, 3, b"\x00" * 300, sender=0),
                rec(0, 1, 4, sender=2**63 - 1),
            ]
            assert await insert(store, rows) == (4, {})
            assert await everything(store, BIG) == rows[:2]
            assert await everything(store, 2**63) == [rows[2]]
            assert await everything(store, 0) == [rows[3]]
            assert await everything(store, 2**63 - 1) == []  # no sign mix-up
            assert await store.count() == (4, 3)
            top = await store.max_rowid()
            page = await store.rows_after(0, top, 10)
            assert [r for _, r in page] == rows
            assert await store.delete_exact([rows[0]]) == 1
            assert await everything(store, BIG) == [rows[1]]

    run(scenario())


@engines
def test_insert_is_insert_or_ignore_on_channel_and_msg_id(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            assert await insert(store, [rec(7, 1, 1), rec(7, 2, 2)]) == (2, {})
            # a resent id under another seq: ignored, the stored seq reported
            assert await insert(store, [rec(7, 3, 2), rec(7, 4, 3)]) == (1, {0: 2})
            # an exact duplicate: ignored, nothing to correct
            assert await insert(store, [rec(7, 1, 1)]) == (0, {})
            # the same id under another channel: another message, stored
            assert await insert(store, [rec(8, 9, 1)]) == (1, {})
            # a repeated id inside one batch: the first copy is stored
            assert await insert(store, [rec(7, 5, 4), rec(7, 6, 4), rec(7, 5, 4)]) == (
                1,
                {1: 5},
            )
            rows = await everything(store, 7)
            assert [(r.seq, r.msg_id) for r in rows] == [
                (1, p.message_id(1, 1)),
                (2, p.message_id(1, 2)),
                (4, p.message_id(1, 3)),
                (5, p.message_id(1, 4)),
            ]
            assert await everything(store, 8) == [rec(8, 9, 1)]
            assert await store.count() == (5, 2)
            assert store.stats.rows_inserted == 5
            assert store.stats.rows_ignored == 4
            assert store.stats.largest_group >= 3
            assert store.stats.commits >= 1

    run(scenario())


@engines
def test_callbacks_run_later_on_the_loop_in_call_order(engine, tmp_path, run):
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with opened(engine, tmp_path) as store:
            events: list[str] = []

            def note(name: str):
                def callback(inserted, corrections, error) -> None:
                    assert asyncio.get_running_loop() is loop
                    events.append(f"{name}:{inserted}")

                return callback

            store.insert([rec(1, 1, 1)], note("a"))
            assert events == []  # never inside insert
            store.insert([rec(1, 2, 2), rec(1, 3, 3)], note("b"))
            # a read called after the inserts sees them, and its result comes
            # after their callbacks
            rows = await store.fetch(1, 0, 10)
            events.append("fetch")
            assert [r.seq for r in rows] == [1, 2, 3]
            assert events == ["a:1", "b:2", "fetch"]
            # close finishes what is queued
            store.insert([rec(1, 4, 4)], note("c"))
        assert events[-1] == "c:1"

    run(scenario())


@engines
def test_concurrent_inserts_all_land(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            batches = [
                [rec(c, s, c * 1000 + s) for s in range(1, 51)] for c in range(20)
            ]
            results = await asyncio.gather(*(insert(store, b) for b in batches))
            assert all(r == (50, {}) for r in results)
            assert await store.count() == (1000, 20)
            assert store.stats.rows_inserted == 1000

    run(scenario())


@engines
def test_a_taken_seq_ignores_another_message(engine, tmp_path, run):
    """A (channel, seq) holds at most one message: another one offered at it
    is ignored, without a correction (its id is not stored anywhere)."""

    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            assert await insert(store, [rec(7, 3, 30, b"first")]) == (1, {})
            # seq 3 is taken: 31 is ignored, 10 and 20 are stored
            assert await insert(
                store, [rec(7, 1, 10), rec(7, 3, 31), rec(7, 2, 20)]
            ) == (2, {})
            # in one batch: the first message at a seq wins
            assert await insert(store, [rec(7, 4, 40), rec(7, 4, 41)]) == (1, {})
            # a taken seq and an id stored elsewhere: the id's seq is reported
            assert await insert(store, [rec(7, 3, 40)]) == (0, {0: 4})
            # the same seq in another channel is free
            assert await insert(store, [rec(8, 3, 31)]) == (1, {})
            rows = await everything(store, 7)
            assert [(r.seq, r.msg_id, r.payload) for r in rows] == [
                (1, p.message_id(1, 10), b"x"),
                (2, p.message_id(1, 20), b"x"),
                (3, p.message_id(1, 30), b"first"),
                (4, p.message_id(1, 40), b"x"),
            ]
            assert await store.lookup([(7, p.message_id(1, 31))]) == {}
            assert store.stats.rows_inserted == 5
            assert store.stats.rows_ignored == 3

    run(scenario())


@engines
def test_fetch_pages_by_seq_hold_at_most_limit(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            rows = [rec(7, s, s) for s in range(1, 10)]
            # stored out of order, read back by seq
            assert (await insert(store, rows[::-1]))[0] == len(rows)
            for limit in range(1, 11):
                seen: list[bytes] = []
                after = 0
                while page := await store.fetch(7, after, limit):
                    assert 1 <= len(page) <= limit
                    assert page[0].seq > after
                    seen += [r.msg_id for r in page]
                    after = page[-1].seq
                assert seen == [r.msg_id for r in rows], limit
            assert await store.fetch(7, 0, 3) == rows[:3]
            assert await store.fetch(7, 4, 1) == [rows[4]]
            assert await store.fetch(7, 5, 10) == rows[5:]
            assert await store.fetch(7, 9, 10) == []
            assert await store.fetch(7, 0, 0) == []

    run(scenario())


@engines
def test_fetch_stops_before_max_bytes_but_returns_at_least_one(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            sizes = [100, 100, 1000, 100]
            rows = [rec(7, s, s, b"x" * n) for s, n in enumerate(sizes, start=1)]
            await insert(store, rows)
            cost = RECORD_COST
            assert await store.fetch(7, 0, 10, 2 * (100 + cost)) == rows[:2]
            assert await store.fetch(7, 0, 10, 2 * (100 + cost) - 1) == rows[:1]
            assert await store.fetch(7, 2, 10, 10) == [rows[2]]  # one always
            assert await store.fetch(7, 0, 1, 10**9) == rows[:1]  # limit too
            assert await store.fetch(7, 0, 10, None) == rows

    run(scenario())


@engines
def test_digest_counts_and_xors_per_block(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            rows = [rec(BIG, s, s) for s in (1, 2, 3, 4, 5, 9)]
            await insert(store, rows)
            await insert(store, [rec(3, 1, 100)])  # another channel: not counted
            by_seq = {r.seq: r for r in rows}
            assert await store.digest(BIG, 4) == {
                0: (4, xor(*rows[:4])),
                1: (1, xor(by_seq[5])),
                2: (1, xor(by_seq[9])),
            }
            assert await store.digest(BIG, 1) == {
                0: (1, xor(by_seq[1])),
                1: (1, xor(by_seq[2])),
                2: (1, xor(by_seq[3])),
                3: (1, xor(by_seq[4])),
                4: (1, xor(by_seq[5])),
                8: (1, xor(by_seq[9])),
            }
            # the same rows stored in another order: the same digest
            async with opened(engine, tmp_path / "other") as other:
                await insert(other, list(reversed(rows)))
                assert await other.digest(BIG, 4) == await store.digest(BIG, 4)
                await other.delete_exact([rows[0]])
                assert await other.digest(BIG, 4) != await store.digest(BIG, 4)

    run(scenario())


@engines
def test_delete_exact_needs_channel_seq_and_msg_id(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            kept, gone, other = rec(5, 1, 1), rec(5, 2, 2), rec(5, 3, 3)
            await insert(store, [kept, gone, other, rec(6, 1, 4), rec(6, 2, 2)])
            wrong = [
                rec(5, 4, 1),  # right id, other seq
                rec(6, 5, 1),  # right id, other channel
                rec(5, 1, 99),  # right place, other id
            ]
            assert await store.delete_exact(wrong) == 0
            # other fields do not matter; a record listed twice goes once
            twin = gone._replace(payload=b"other", sender=7, ts_us=1)
            assert await store.delete_exact([twin, gone]) == 1
            assert await everything(store, 5) == [kept, other]
            # the same id in channel 6 stays
            assert await everything(store, 6) == [rec(6, 1, 4), rec(6, 2, 2)]
            assert await store.delete_exact([rec(6, 1, 4), rec(6, 2, 2)]) == 2
            assert await store.count() == (2, 1)  # channel 6 is empty now
            # the id is free again: storing it anew is an insert, not a dedup
            assert await insert(store, [rec(5, 7, 2)]) == (1, {})
            assert [r.seq for r in await everything(store, 5)] == [1, 3, 7]

    run(scenario())


@engines
def test_row_ids_grow_and_rows_after_bounds(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            rows = [rec(1 + i % 3, 1 + i // 3, i) for i in range(10)]
            for r in rows:
                await insert(store, [r])
            top = await store.max_rowid()
            page = await store.rows_after(0, top, 100)
            ids = [i for i, _ in page]
            assert [r for _, r in page] == rows  # by row id = insertion order
            assert ids == sorted(set(ids))
            assert ids[0] > 0
            assert ids[-1] == top
            # rowid < id <= upto, at most limit
            assert [i for i, _ in await store.rows_after(ids[2], ids[6], 100)] == ids[
                3:7
            ]
            assert [i for i, _ in await store.rows_after(ids[2], ids[6], 2)] == ids[3:5]
            assert await store.rows_after(top, top + 100, 10) == []
            assert await store.rows_after(ids[5], ids[5], 10) == []
            assert await store.rows_after(ids[5], ids[1], 10) == []
            assert await store.rows_after(0, top, 0) == []
            # a delete leaves a hole, later rows get larger ids
            await store.delete_exact([rows[4]])
            assert [i for i, _ in await store.rows_after(0, top, 100)] == (
                ids[:4] + ids[5:]
            )
            await insert(store, [rec(9, 1, 100)])
            assert await store.max_rowid() > top

    run(scenario())


@engines
def test_the_ids_of_deleted_newest_rows_are_not_reused(engine, tmp_path, run):
    """MessageStore.max_rowid: an id is never handed out twice (a reused id
    could fall inside a placement interval marked placed before the row was
    written, and the row would never be pushed)."""

    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            await insert(store, [rec(1, 1, 1), rec(1, 2, 2)])
            top = await store.max_rowid()
            await store.delete_exact([rec(1, 2, 2)])
            assert await store.max_rowid() < top
            await insert(store, [rec(1, 2, 3)])
            assert await store.max_rowid() > top
            page = await store.rows_after(0, top + 10, 10)
            assert len(page) == 2
            assert page[-1][1].msg_id == p.message_id(1, 3)

    run(scenario())


def test_sqlite_reopens_what_it_stored(tmp_path, run):
    async def first() -> int:
        async with opened("sqlite", tmp_path) as store:
            await insert(store, [rec(BIG, 1, 1), rec(BIG, 4, 2), rec(3, 2, 3)])
            await insert(store, [rec(3, 7, 4)])
            await store.delete_exact([rec(3, 7, 4)])
            return await store.max_rowid()

    top = run(first())

    async def second() -> None:
        store = open_store("sqlite", tmp_path)
        assert store.open() == {BIG: 4, 3: 2}
        store.start(asyncio.get_running_loop())
        assert await store.count() == (3, 2)
        assert [r.seq for r in await everything(store, BIG)] == [1, 4]
        assert await store.max_rowid() == top
        # a resent id is still recognised after the restart
        assert await insert(store, [rec(BIG, 9, 1)]) == (0, {0: 1})
        await store.close()

    run(second())


def test_memory_store_is_not_durable(tmp_path, run):
    async def scenario() -> None:
        async with opened("memory", tmp_path) as store:
            await insert(store, [rec(1, 1, 1)])
        assert list(tmp_path.iterdir()) == []  # no files at all
        fresh = open_store("memory", tmp_path)
        assert fresh.open() == {}
        # the same object reopened still holds its rows (one process)
        assert store.open() == {1: 1}
        store.start(asyncio.get_running_loop())
        assert await store.count() == (1, 1)
        await store.close()

    run(scenario())


def test_memory_store_refuses_work_after_close(tmp_path, run):
    async def scenario() -> None:
        async with opened("memory", tmp_path) as store:
            pass
        with pytest.raises(RuntimeError):
            await store.fetch(1, 0, 10)
        with pytest.raises(RuntimeError):
            store.insert([rec(1, 1, 1)], lambda *args: None)

    run(scenario())


def test_cluster_on_memory_stores_replicates_through_the_write_path(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, store="memory") as cluster:
            from plexichat.node.memstore import MemoryStore

            assert all(isinstance(n.storage, MemoryStore) for n in cluster.nodes)
            channel = key_of("memory-engine")
            owner, replica = cluster.owners(channel)
            other = next(n for n in cluster.nodes if n.id not in (owner, replica))
            client = admin_client(other)
            await client.connect()
            sender = 2**64 - 2
            seqs = [
                await client.send(
                    channel, p.message_id(42, i), sender, f"m{i}".encode()
                )
                for i in range(1, 11)
            ]
            assert seqs == list(range(1, 11))
            # a resend through the non-owner dedups to the stored seq
            assert await client.send(channel, p.message_id(42, 3), sender, b"m3") == 3
            for node_id in (owner, replica):
                rows = await everything(cluster.node(node_id).storage, channel)
                assert [r.seq for r in rows] == seqs
                assert [(r.sender, r.payload) for r in rows] == [
                    (sender, f"m{i}".encode()) for i in range(1, 11)
                ]
            assert await everything(other.storage, channel) == []
            assert other.counters["forwarded"] == 11
            assert cluster.node(owner).counters["acked"] == 10
            assert cluster.node(owner).storage.stats.rows_inserted == 10
            info, _ = await client.stats()
            assert info["node_id"] == other.id
            await client.close()
        assert not list(tmp_path.rglob("*.sqlite3*"))  # no database was made

    run(scenario())


def test_the_node_cli_chooses_the_engine(tmp_path, capsys):
    from plexichat.node import cli

    base = ["--node-id", "a", "--data-dir", str(tmp_path)]
    parser = cli.build_parser()
    assert cli.config_from_args(parser.parse_args(base)).store == "sqlite"
    args = parser.parse_args([*base, "--store", "memory"])
    assert cli.config_from_args(args).store == "memory"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--store", "postgres"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--store {sqlite,memory}" in help_text
    assert "NOT durable" in help_text


# The indexes of the schema before ownership terms (issue 11).
OLD_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS messages_msg_id ON messages (msg_id);
CREATE INDEX IF NOT EXISTS messages_channel_seq ON messages (channel, seq);
"""
# The whole schema before ownership terms: no term column, no channel_state.
OLD_SCHEMA = (
    """
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
    + OLD_INDEXES
)


def test_sqlite_rebuilds_a_table_without_autoincrement(tmp_path, run):
    """A data dir made before AUTOINCREMENT keeps its rows and ids, and no
    longer reuses an id."""
    import sqlite3

    from plexichat.node.storage import Storage

    path = tmp_path / "messages.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, channel INTEGER NOT NULL,"
        " seq INTEGER NOT NULL, msg_id BLOB NOT NULL, sender INTEGER NOT NULL,"
        " ts_us INTEGER NOT NULL, payload BLOB NOT NULL);" + OLD_INDEXES
    )
    old.executemany(
        "INSERT INTO messages VALUES (?, 7, ?, ?, 1, 0, x'00')",
        [(i, i, p.message_id(1, i)) for i in (1, 2, 3)],
    )
    old.commit()
    old.close()

    async def scenario() -> None:
        store = Storage(path)
        assert store.open() == {7: 3}
        store.start(asyncio.get_running_loop())
        try:
            await store.delete_exact([rec(7, 3, 3)])
            assert await store.max_rowid() == 2
            await insert(store, [rec(7, 3, 4)])
            assert await store.max_rowid() == 4  # not 3 again
            rows = await store.rows_after(0, 10, 10)
            assert [i for i, _ in rows] == [1, 2, 4]
        finally:
            await store.close()

    run(scenario())


# -- ownership terms, truncation and channel state (issue 11) -----------------


async def reopened(engine: str, store: MessageStore, data_dir: Path) -> MessageStore:
    """*store* closed and opened again, not started: a new object on the same
    files for SQLite, the same object for the memory engine (one process)."""
    await store.close()
    again = open_store(engine, data_dir) if engine == "sqlite" else store
    again.open()
    return again


def state(channel: int, promised: int = 3, **fields: Any) -> ChannelState:
    return ChannelState(channel, promised, "node-b", **fields)


@engines
def test_terms_round_trip(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            rows = [
                rec(BIG, 1, 1, term=0),
                rec(BIG, 2, 2, term=7),
                rec(BIG, 3, 3, term=2**63 - 1),
                rec(4, 1, 4, term=1),
            ]
            assert await insert(store, rows) == (4, {})
            assert await everything(store, BIG) == rows[:3]
            assert [r.term for r in await store.fetch(BIG, 1, 1)] == [7]
            page = await store.rows_after(0, await store.max_rowid(), 10)
            assert [r for _, r in page] == rows
            assert [r.term for _, r in page] == [0, 7, 2**63 - 1, 1]
            # a record whose term defaults to 0 reads back with term 0
            plain = p.Record(4, 2, p.message_id(1, 5), 1, 0, b"")
            await insert(store, [plain])
            assert (await store.fetch(4, 1, 10))[0].term == 0

    run(scenario())


@engines
def test_a_message_id_is_unique_per_channel_not_globally(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            one, two = rec(1, 1, 9, term=1), rec(BIG, 4, 9, term=2)
            assert await insert(store, [one, two]) == (2, {})
            assert await store.count() == (2, 2)
            assert await everything(store, 1) == [one]
            assert await everything(store, BIG) == [two]
            # per channel, the stored seq still wins
            assert await insert(store, [rec(1, 2, 9), rec(BIG, 5, 9)]) == (
                0,
                {0: 1, 1: 4},
            )
            mid = p.message_id(1, 9)
            assert await store.lookup([(1, mid), (BIG, mid)]) == {
                (1, mid): (1, 1),
                (BIG, mid): (4, 2),
            }

    run(scenario())


@engines
def test_truncate_states_and_records_in_one_write(engine, tmp_path, run):
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with opened(engine, tmp_path) as store:
            await insert(store, [rec(7, s, s, term=1) for s in range(1, 6)])
            await insert(store, [rec(8, s, 100 + s) for s in range(1, 4)])
            events: list[tuple[int, dict[int, int]]] = []
            # truncation runs first: seqs 4 and 5 are free again for new
            # messages, and msg 5 (cut from seq 5) may come back at seq 6
            store.insert(
                [
                    rec(7, 4, 40, term=2),
                    rec(7, 5, 50, term=2),
                    rec(7, 6, 5, term=2),
                    rec(7, 7, 1, term=2),  # id stored at seq 1: a correction
                ],
                lambda n, fixes, error: events.append((n, fixes)),
                truncate={7: 3, 8: 1, 9: 0},  # channel 9 holds nothing
                states=[state(7, accepted_term=2, accepted_members=("a", "b"))],
            )
            assert events == []  # never inside insert
            rows = await everything(store, 7)
            assert events == [(3, {3: 1})]
            assert [(r.seq, r.msg_id, r.term) for r in rows] == [
                (1, p.message_id(1, 1), 1),
                (2, p.message_id(1, 2), 1),
                (3, p.message_id(1, 3), 1),
                (4, p.message_id(1, 40), 2),
                (5, p.message_id(1, 50), 2),
                (6, p.message_id(1, 5), 2),
            ]
            assert [r.seq for r in await everything(store, 8)] == [1]
            assert store.stats.rows_truncated == 4
            # the states are written before the records: a record of the same
            # write is not affected by them, and the last state wins
            done = loop.create_future()
            store.insert(
                [rec(9, 1, 1)],
                lambda n, fixes, error: done.set_result(error),
                states=[state(9, promised=1), state(9, promised=2, commit=1)],
            )
            assert await done is None
            store = await reopened(engine, store, tmp_path)
            logs = store.channel_logs()
            assert logs[7].state == state(
                7, accepted_term=2, accepted_members=("a", "b")
            )
            assert logs[7].last == 6
            assert logs[7].epochs == [(1, 1), (2, 4)]
            assert logs[9].state == state(9, promised=2, commit=1)
            assert logs[8] == ChannelLog(1, [(0, 1)], ChannelState(8))
            store.start(loop)

    run(scenario())


@engines
def test_state_only_and_truncate_only_writes(engine, tmp_path, run):
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with opened(engine, tmp_path) as store:
            await insert(store, [rec(5, s, s) for s in range(1, 5)])
            commits = store.stats.commits
            # state only: an empty record list
            assert await insert(store, [], states=[state(6, commit=0)]) == (0, {})
            assert await insert(store, (), states=[state(5, promised=4)]) == (0, {})
            # truncate only
            assert await insert(store, [], truncate={5: 2}) == (0, {})
            assert [r.seq for r in await everything(store, 5)] == [1, 2]
            assert await insert(store, [], truncate={5: 2}) == (0, {})  # no-op
            assert store.stats.rows_truncated == 2
            assert store.stats.commits == commits + 4
            assert store.stats.rows_inserted == 4
            assert store.stats.rows_ignored == 0
            # a state is replaced, not merged
            await insert(store, [], states=[ChannelState(6, accepted_term=1)])
            store = await reopened(engine, store, tmp_path)
            logs = store.channel_logs()
            assert logs == {
                5: ChannelLog(2, [(0, 1)], state(5, promised=4)),
                6: ChannelLog(0, [], ChannelState(6, accepted_term=1)),
            }
            store.start(loop)

    run(scenario())


@engines
def test_channel_logs_after_reopening(engine, tmp_path, run):
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        store = open_store(engine, tmp_path)
        with pytest.raises(RuntimeError):
            store.channel_logs()  # before open
        store.open()
        assert store.channel_logs() == {}
        store.start(loop)
        with pytest.raises(RuntimeError):
            store.channel_logs()  # after start
        terms = [1, 1, 2, 2, 2, 5]
        # stored out of order and in several writes
        log = [rec(BIG, s, s, term=t) for s, t in enumerate(terms, 1)]
        await insert(store, log[3:])
        await insert(store, log[:3])
        await insert(store, [rec(2**63, 1, 100, term=3), rec(2**63, 2, 101, term=3)])
        members = ("node-a", "node-b", "ünïcode")
        saved = ChannelState(BIG, 6, "node-c", 5, members, 4)
        await insert(store, [], states=[saved, ChannelState(2**64 - 1, promised=9)])
        store = await reopened(engine, store, tmp_path)
        logs = store.channel_logs()
        assert logs == {
            BIG: ChannelLog(6, [(1, 1), (2, 3), (5, 6)], saved),
            2**63: ChannelLog(2, [(3, 1)], ChannelState(2**63)),
            2**64 - 1: ChannelLog(0, [], ChannelState(2**64 - 1, promised=9)),
        }
        assert logs[BIG].state.accepted_members == members  # a tuple again
        # what channel_logs returns is a copy
        logs[BIG].state.promised = 99
        assert store.channel_logs()[BIG].state.promised == 6
        store.start(loop)
        assert [r.term for r in await everything(store, BIG)] == terms
        await store.close()

    run(scenario())


@engines
def test_lookup_gives_seq_and_term_of_stored_ids(engine, tmp_path, run):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            assert await store.lookup([]) == {}
            rows = [rec(BIG, s, s, term=s // 2) for s in range(1, 1001)]
            store.insert(rows[:500], lambda *args: None)
            store.insert(rows[500:], lambda *args: None)
            # not awaited: the lookup still sees both inserts
            keys = [(r.channel, r.msg_id) for r in rows]
            absent = [(BIG, p.message_id(2, 1)), (BIG - 1, rows[0].msg_id)]
            found = await store.lookup(keys + absent + keys[:3])
            assert found == {(r.channel, r.msg_id): (r.seq, r.term) for r in rows}
            await store.delete_exact(rows[:1])
            await insert(store, [], truncate={BIG: 998})
            assert await store.lookup(keys) == {
                (r.channel, r.msg_id): (r.seq, r.term) for r in rows[1:998]
            }

    run(scenario())


@engines
def test_a_failed_write_applies_nothing(engine, tmp_path, run):
    """An operation whose records cannot be stored (a seq beyond signed 64
    bits) fails whole: no truncation, no state, no row; the writes queued
    beside it are applied."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with opened(engine, tmp_path) as store:
            rows = [rec(3, s, s, term=1) for s in range(1, 5)]
            await insert(store, rows, states=[state(3, promised=1)])
            results: list[tuple[int, BaseException | None]] = []

            def note(inserted, corrections, error) -> None:
                results.append((inserted, error))

            store.insert([rec(4, 1, 10)], note)
            store.insert(
                [rec(3, 3, 30, term=2), rec(3, 2**63, 31, term=2)],
                note,
                truncate={3: 2},
                states=[state(3, promised=2)],
            )
            store.insert([rec(4, 2, 11)], note, states=[state(4)])
            assert await everything(store, 3) == rows
            assert [r[0] for r in results] == [1, 0, 1]
            assert results[0][1] is None
            assert isinstance(results[1][1], OverflowError)
            assert results[2][1] is None
            assert [r.seq for r in await everything(store, 4)] == [1, 2]
            assert store.stats.rows_truncated == 0
            assert store.stats.rows_inserted == 6
            assert store.stats.errors == 1
            store = await reopened(engine, store, tmp_path)
            logs = store.channel_logs()
            assert logs[3].state == state(3, promised=1)
            assert logs[3].epochs == [(1, 1)]
            assert logs[4].state == state(4)
            store.start(loop)

    run(scenario())


def _old_file(path: Path, rows: list[tuple[int, int, int]]) -> None:
    """A data file as the schema before terms wrote it: (channel, seq, id)."""
    import sqlite3

    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    old.executemany(
        "INSERT INTO messages (channel, seq, msg_id, sender, ts_us, payload)"
        " VALUES (?, ?, ?, 1, 0, x'00')",
        [(c - 2**64 if c >= 2**63 else c, s, p.message_id(1, i)) for c, s, i in rows],
    )
    old.commit()
    old.close()


def test_sqlite_migrates_a_file_from_before_terms(tmp_path, run):
    import sqlite3

    path = tmp_path / "messages.sqlite3"
    _old_file(path, [(BIG, 1, 1), (BIG, 2, 2), (7, 1, 3)])

    async def scenario() -> None:
        store = open_store("sqlite", tmp_path)
        assert store.open() == {BIG: 2, 7: 1}
        assert store.channel_logs() == {
            BIG: ChannelLog(2, [(0, 1)], ChannelState(BIG)),
            7: ChannelLog(1, [(0, 1)], ChannelState(7)),
        }
        store.start(asyncio.get_running_loop())
        try:
            assert [r.term for r in await everything(store, BIG)] == [0, 0]
            # msg 1 in another channel is now another message; a taken seq
            # is refused
            assert await insert(store, [rec(7, 2, 1, term=3), rec(7, 1, 9)]) == (
                1,
                {},
            )
            assert await insert(store, [rec(BIG, 5, 2)]) == (0, {0: 2})
            await insert(store, [], states=[ChannelState(7, promised=3)])
        finally:
            await store.close()
        # opening the migrated file again changes nothing
        again = open_store("sqlite", tmp_path)
        assert again.open() == {BIG: 2, 7: 2}
        assert again.channel_logs()[7] == ChannelLog(
            2, [(0, 1), (3, 2)], ChannelState(7, promised=3)
        )
        again.start(asyncio.get_running_loop())
        await again.close()

    run(scenario())
    conn = sqlite3.connect(path)
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(messages)")}
    conn.close()
    assert not indexes & {"messages_msg_id", "messages_channel_seq"}


def test_sqlite_refuses_a_file_with_two_messages_at_one_seq(tmp_path):
    """The old schema let two messages share a (channel, seq): such a file
    cannot get the unique indexes; open says so and changes nothing."""
    import sqlite3

    path = tmp_path / "messages.sqlite3"
    _old_file(path, [(7, 1, 1), (7, 2, 2), (7, 2, 3)])
    store = open_store("sqlite", tmp_path)
    with pytest.raises(RuntimeError, match="remove the node's data directory") as err:
        store.open()
    assert str(path) in str(err.value)
    conn = sqlite3.connect(path)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(messages)")]
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(messages)")}
    count = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    conn.close()
    assert "term" not in columns
    assert indexes == {"messages_msg_id", "messages_channel_seq"}
    assert count == 3
