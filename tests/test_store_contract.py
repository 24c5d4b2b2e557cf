"""The MessageStore contract, checked against every engine (issue 11).

Each test runs on ``sqlite`` and ``memory``; the last one runs a whole
in-process cluster on the memory engine, through the unchanged write path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest

from plexichat.node import protocol as p
from plexichat.node.store import ENGINES, MessageStore, open_store
from plexichat.node.testing import InProcessCluster
from plexichat.routing import key_of

BIG = 2**64 - 5  # u64 ids above the signed 64-bit range
TOP = 2**64 - 1

engines = pytest.mark.parametrize("engine", ENGINES)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def rec(
    channel: int,
    seq: int,
    counter: int,
    payload: bytes = b"x",
    *,
    sender: int = 1,
) -> p.Record:
    return p.Record(channel, seq, p.message_id(1, counter), sender, 1000 + seq, payload)


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
    store: MessageStore, records: list[p.Record]
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

    store.insert(records, callback)
    return await done


async def everything(store: MessageStore, channel: int) -> list[p.Record]:
    return await store.fetch(channel, 0, 1_000_000)


def xor(*records: p.Record) -> int:
    out = 0
    for r in records:
        out ^= int.from_bytes(r.msg_id, "big")
    return out


@engines
def test_an_empty_store(engine, tmp_path):
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
def test_records_round_trip_with_unsigned_64_bit_ids(engine, tmp_path):
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
def test_insert_is_insert_or_ignore_on_msg_id(engine, tmp_path):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            assert await insert(store, [rec(7, 1, 1), rec(7, 2, 2)]) == (2, {})
            # a resent id under another seq: ignored, the stored seq reported
            assert await insert(store, [rec(7, 3, 2), rec(7, 4, 3)]) == (1, {0: 2})
            # an exact duplicate: ignored, nothing to correct
            assert await insert(store, [rec(7, 1, 1)]) == (0, {})
            # the same id under another channel: the stored seq still wins
            assert await insert(store, [rec(8, 9, 1)]) == (0, {0: 1})
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
            assert await everything(store, 8) == []
            assert await store.count() == (4, 1)
            assert store.stats.rows_inserted == 4
            assert store.stats.rows_ignored == 5
            assert store.stats.largest_group >= 3
            assert store.stats.commits >= 1

    run(scenario())


@engines
def test_callbacks_run_later_on_the_loop_in_call_order(engine, tmp_path):
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
def test_concurrent_inserts_all_land(engine, tmp_path):
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
def test_two_messages_at_one_seq_keep_their_storage_order(engine, tmp_path):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            await insert(store, [rec(7, 3, 30)])
            await insert(store, [rec(7, 1, 10), rec(7, 3, 31), rec(7, 2, 20)])
            await insert(store, [rec(7, 3, 29)])
            rows = await everything(store, 7)
            assert [(r.seq, r.msg_id) for r in rows] == [
                (1, p.message_id(1, 10)),
                (2, p.message_id(1, 20)),
                (3, p.message_id(1, 30)),
                (3, p.message_id(1, 31)),
                (3, p.message_id(1, 29)),
            ]

    run(scenario())


@engines
def test_fetch_pages_never_end_inside_a_seq(engine, tmp_path):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            # seq 3 is held by two messages, seq 5 by three
            rows = [
                rec(7, 1, 1),
                rec(7, 2, 2),
                rec(7, 3, 3),
                rec(7, 3, 4),
                rec(7, 4, 5),
                rec(7, 5, 6),
                rec(7, 5, 7),
                rec(7, 5, 8),
                rec(7, 6, 9),
            ]
            assert (await insert(store, rows))[0] == len(rows)
            for limit in range(1, 11):
                seen: list[bytes] = []
                after = 0
                while page := await store.fetch(7, after, limit):
                    assert len(page) >= min(limit, 1)
                    seqs = [r.seq for r in page]
                    assert seqs == sorted(seqs)
                    assert seqs[0] > after
                    seen += [r.msg_id for r in page]
                    after = page[-1].seq
                assert seen == [r.msg_id for r in rows], limit
            assert [r.seq for r in await store.fetch(7, 0, 3)] == [1, 2, 3, 3]
            assert [r.seq for r in await store.fetch(7, 2, 1)] == [3, 3]
            assert [r.seq for r in await store.fetch(7, 4, 1)] == [5, 5, 5]
            assert [r.seq for r in await store.fetch(7, 4, 2)] == [5, 5, 5]
            # a page that fits exactly is not extended
            assert [r.seq for r in await store.fetch(7, 0, 2)] == [1, 2]
            assert [r.seq for r in await store.fetch(7, 5, 10)] == [6]
            assert await store.fetch(7, 6, 10) == []
            assert await store.fetch(7, 0, 0) == []

    run(scenario())


@engines
def test_digest_counts_and_xors_per_block(engine, tmp_path):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            rows = [rec(BIG, s, s) for s in (1, 2, 4, 5, 9)] + [rec(BIG, 4, 40)]
            await insert(store, rows)
            await insert(store, [rec(3, 1, 100)])  # another channel: not counted
            by_seq = {s: [r for r in rows if r.seq == s] for s in (1, 2, 4, 5, 9)}
            assert await store.digest(BIG, 4) == {
                0: (4, xor(*by_seq[1], *by_seq[2], *by_seq[4])),
                1: (1, xor(*by_seq[5])),
                2: (1, xor(*by_seq[9])),
            }
            assert await store.digest(BIG, 1) == {
                0: (1, xor(*by_seq[1])),
                1: (1, xor(*by_seq[2])),
                3: (2, xor(*by_seq[4])),
                4: (1, xor(*by_seq[5])),
                8: (1, xor(*by_seq[9])),
            }
            # the same rows stored in another order: the same digest
            async with opened(engine, tmp_path / "other") as other:
                await insert(other, list(reversed(rows)))
                assert await other.digest(BIG, 4) == await store.digest(BIG, 4)
                await other.delete_exact([rows[0]])
                assert await other.digest(BIG, 4) != await store.digest(BIG, 4)

    run(scenario())


@engines
def test_delete_exact_needs_channel_seq_and_msg_id(engine, tmp_path):
    async def scenario() -> None:
        async with opened(engine, tmp_path) as store:
            kept, gone, shared = rec(5, 1, 1), rec(5, 2, 2), rec(5, 2, 3)
            await insert(store, [kept, gone, shared, rec(6, 1, 4)])
            wrong = [
                rec(5, 3, 1),  # right id, other seq
                rec(6, 1, 1),  # right id, other channel
                rec(5, 1, 99),  # right place, other id
            ]
            assert await store.delete_exact(wrong) == 0
            # other fields do not matter; a record listed twice goes once
            twin = gone._replace(payload=b"other", sender=7, ts_us=1)
            assert await store.delete_exact([twin, gone]) == 1
            assert await everything(store, 5) == [kept, shared]
            assert await store.delete_exact([rec(6, 1, 4)]) == 1
            assert await store.count() == (2, 1)  # channel 6 is empty now
            # the id is free again: storing it anew is an insert, not a dedup
            assert await insert(store, [rec(5, 7, 2)]) == (1, {})
            assert [r.seq for r in await everything(store, 5)] == [1, 2, 7]

    run(scenario())


@engines
def test_row_ids_grow_and_rows_after_bounds(engine, tmp_path):
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
def test_the_ids_of_deleted_newest_rows_are_not_reused(engine, tmp_path):
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


def test_sqlite_reopens_what_it_stored(tmp_path):
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


def test_memory_store_is_not_durable(tmp_path):
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


def test_memory_store_refuses_work_after_close(tmp_path):
    async def scenario() -> None:
        async with opened("memory", tmp_path) as store:
            pass
        with pytest.raises(RuntimeError):
            await store.fetch(1, 0, 10)
        with pytest.raises(RuntimeError):
            store.insert([rec(1, 1, 1)], lambda *args: None)

    run(scenario())


def test_cluster_on_memory_stores_replicates_through_the_write_path(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, store="memory") as cluster:
            from plexichat.load.client import NodeClient
            from plexichat.node.memstore import MemoryStore

            assert all(isinstance(n.storage, MemoryStore) for n in cluster.nodes)
            channel = key_of("memory-engine")
            owner, replica = cluster.owners(channel)
            other = next(n for n in cluster.nodes if n.id not in (owner, replica))
            client = NodeClient("127.0.0.1", other.listen_port, timeout=5.0)
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


def test_sqlite_rebuilds_a_table_without_autoincrement(tmp_path):
    """A data dir made before AUTOINCREMENT keeps its rows and ids, and no
    longer reuses an id."""
    import sqlite3

    from plexichat.node.storage import INDEXES, Storage

    path = tmp_path / "messages.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, channel INTEGER NOT NULL,"
        " seq INTEGER NOT NULL, msg_id BLOB NOT NULL, sender INTEGER NOT NULL,"
        " ts_us INTEGER NOT NULL, payload BLOB NOT NULL);" + INDEXES
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
