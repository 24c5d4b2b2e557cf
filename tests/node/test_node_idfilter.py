"""The node's filter of stored message ids (plexichat.node.idfilter)."""

from __future__ import annotations

import asyncio

import pytest

from plexichat.cache import LRUCache
from plexichat.node import protocol as p
from plexichat.node.idfilter import IdFilter
from plexichat.node.testing import InProcessCluster, admin_client
from plexichat.routing import key_of


def test_nothing_added_is_ever_reported_absent() -> None:
    ids = IdFilter(bits_log2=16)
    ids.ready = True
    added = [(c, p.message_id(c, i)) for c in range(5) for i in range(2000)]
    ids.add_many(added)
    assert ids.added == len(added)
    assert all(ids.may_hold(c, m) for c, m in added)
    others = [(c, p.message_id(c + 100, i)) for c in range(5) for i in range(2000)]
    false_positives = sum(ids.may_hold(c, m) for c, m in others)
    assert false_positives < len(others) // 2  # 64 Kib for 10k ids: ~17%


def test_the_same_id_in_another_channel_is_another_pair() -> None:
    ids = IdFilter()
    ids.ready = True
    ids.add(1, b"m" * 16)
    assert ids.may_hold(1, b"m" * 16)
    assert not ids.may_hold(2, b"m" * 16)


def test_until_ready_every_answer_is_maybe() -> None:
    ids = IdFilter(bits_log2=8)
    assert ids.may_hold(1, b"x" * 16)
    ids.ready = True
    assert not ids.may_hold(1, b"x" * 16)


@pytest.mark.parametrize("bits", [2, 33, -1])
def test_bad_sizes_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="bits_log2"):
        IdFilter(bits)


def test_records_add_the_same_pairs_as_single_adds() -> None:
    by_pair, by_record = IdFilter(bits_log2=12), IdFilter(bits_log2=12)
    records = [
        p.make_record((c, i + 1, p.message_id(c, i), 7, 0, b"x", 1))
        for c in (1, 2**64 - 1)
        for i in range(300)
    ]
    by_pair.add_many((rec.channel, rec.msg_id) for rec in records)
    by_record.add_records(records)
    assert by_record.added == by_pair.added == len(records)
    assert by_record._bits == by_pair._bits
    by_record.ready = True
    assert all(by_record.may_hold(rec.channel, rec.msg_id) for rec in records)


def test_a_retry_after_a_restart_finds_the_stored_seq(tmp_path):
    """The owner forgot its recent ACKs and its filter (as after a restart):
    loading the filter from the store makes a retry find its one seq."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            channel = key_of("retry-after-restart")
            owner = cluster.node(cluster.owners(channel)[0])
            client = admin_client(owner)
            await client.connect()
            assert await client.send(channel, p.message_id(4, 1), 4, b"a") == 1
            owner.recent = LRUCache(16)
            owner.ids = IdFilter()
            await owner._load_ids()
            assert owner.ids.ready
            assert owner.ids.may_hold(channel, p.message_id(4, 1))
            assert await client.send(channel, p.message_id(4, 1), 4, b"a") == 1
            assert await client.send(channel, p.message_id(4, 2), 4, b"b") == 2
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
