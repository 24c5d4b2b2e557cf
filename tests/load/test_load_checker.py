"""The checker: pure verdicts, journal format, and planted faults in a live cluster."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from plexichat.load import journal as jr
from plexichat.load.checker import check, run_check
from plexichat.load.generator import LoadConfig, run_load
from plexichat.node import protocol as p
from plexichat.node.testing import InProcessCluster


def entry(
    sender: int, counter: int, channel: int = 1, seq: int | None = None
) -> jr.Entry:
    return jr.Entry(
        p.message_id(sender, counter), channel, sender, counter, seq or counter
    )


def rows(*entries: jr.Entry) -> dict[int, list[tuple[int, bytes]]]:
    out: dict[int, list[tuple[int, bytes]]] = {}
    for e in entries:
        out.setdefault(e.channel, []).append((e.seq, e.msg_id))
    return out


def test_clean_run_is_ok():
    acked = [entry(1, i) for i in range(1, 6)] + [
        entry(2, i, channel=2) for i in (1, 2)
    ]
    result = check(acked, rows(*acked))
    assert result.ok
    assert (result.acked, result.present, result.channels) == (7, 7, 2)
    assert result.as_dict()["ok"] is True


def test_loss_duplicate_reorder_and_mismatch_are_counted():
    acked = [entry(1, i) for i in range(1, 6)]
    stored = rows(*acked)
    stored[1].remove((2, acked[1].msg_id))  # lost
    stored[1].append((9, acked[2].msg_id))  # duplicated
    result = check(acked, stored)
    assert (result.lost, result.duplicated, result.reordered) == (1, 1, 0)
    assert not result.ok
    assert result.examples["lost"][0].startswith(acked[1].msg_id.hex())
    # counter 4 stored before counter 3: reordered; its ACK seq differs too
    swapped = rows(*acked[:2], entry(1, 3, seq=4), entry(1, 4, seq=3), acked[4])
    result = check(acked, swapped)
    assert (result.lost, result.duplicated, result.reordered) == (0, 0, 1)
    assert result.seq_mismatch == 2


def test_a_sequence_number_shared_with_an_unacknowledged_write_fails():
    acked = [entry(1, i) for i in range(1, 4)]
    stored = rows(*acked)
    stored[1].append((2, p.message_id(9, 1)))  # an old owner's unacked write
    result = check(acked, stored)
    assert result.shared_seq == 1
    assert not result.ok  # two messages at one position: readers disagree
    assert result.violations() == {"shared_seq": 1}
    assert result.as_dict()["violations"] == {"shared_seq": 1}
    assert check(acked, rows(*acked)).shared_seq == 0


def test_a_seq_other_than_the_acked_one_fails():
    acked = [entry(1, i) for i in range(1, 4)]
    stored = rows(*acked[:2], entry(1, 3, seq=4), entry(9, 1, seq=3))
    result = check(acked, stored)
    assert result.violations() == {"seq_mismatch": 1}
    assert result.examples["seq_mismatch"] == [
        f"{acked[2].msg_id.hex()} acked at 3, stored at [4]"
    ]


def test_a_hole_in_a_channel_fails():
    acked = [entry(1, 1), entry(1, 2, seq=4)]
    stored = rows(acked[0], entry(1, 2, seq=4))
    result = check(acked, stored)
    assert result.gaps == 2  # seqs 2 and 3 hold nothing
    assert result.violations() == {"gaps": 2}


def test_replica_copies_are_checked_when_given():
    acked = [entry(1, i) for i in range(1, 4)]
    result = check(acked, rows(*acked), [rows(*acked[:2])])
    assert result.replicas_checked
    assert result.replica_missing == 1
    assert result.divergence == 1  # seq 3 is on the owner only
    assert not result.ok  # a reader of the replica does not see message 3


def test_replicas_that_disagree_with_the_owner_fail():
    acked = [entry(1, i) for i in range(1, 4)]
    other = rows(*acked[:2], entry(7, 1, seq=3))  # another message at seq 3
    extra = rows(*acked, entry(7, 2, seq=4))  # a message the owner lacks
    moved = rows(acked[0], entry(1, 2, seq=3), entry(1, 3, seq=2))
    assert check(acked, rows(*acked), [rows(*acked)]).ok
    result = check(acked, rows(*acked), [other, extra, moved])
    assert result.replica_missing == 1
    assert result.divergence == 1 + 1 + 2
    assert result.violations() == {"replica_missing": 1, "divergence": 4}
    # a replica that does not hold the channel is not compared
    assert check(acked, rows(*acked), [{}]).ok


def test_journal_round_trip_and_bad_files(tmp_path):
    entries = [entry(2**63, 2**64 - 1, channel=2**64 - 1), entry(1, 0, seq=5)]
    path = tmp_path / "j.bin"
    jr.write(path, entries)
    assert list(jr.read(path)) == entries
    (tmp_path / "bad").write_bytes(b"NOPE")
    with pytest.raises(ValueError, match="magic"):
        list(jr.read(tmp_path / "bad"))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        list(jr.read(path))


def _signed(value: int) -> int:
    """A u64 as SQLite stores it (a signed 64-bit integer)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def test_checker_finds_a_deleted_row_and_a_planted_duplicate(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "nodes") as cluster:
            nodes = [("127.0.0.1", n.listen_port) for n in cluster.nodes]
            journal = tmp_path / "journal.bin"
            load = await run_load(
                LoadConfig(
                    nodes=nodes,
                    clients=3,
                    inflight=4,
                    count=300,
                    channels=8,
                    journal=journal,
                    seed=1,
                    credentials=cluster.credentials,
                )
            )
            assert load["acked"] == 300
            result = await run_check(
                nodes, journal, replicas=True, credentials=cluster.credentials
            )
            assert result.ok
            assert (result.acked, result.replica_missing) == (300, 0)

            victim, other = list(jr.read(journal))[:2]
            owner = cluster.node(cluster.owners(victim.channel)[0])
            db = sqlite3.connect(owner.storage.path)
            with db:
                db.execute("DELETE FROM messages WHERE msg_id = ?", (victim.msg_id,))
            result = await run_check(nodes, journal, credentials=cluster.credentials)
            assert (result.lost, result.duplicated) == (1, 0)

            # a reader sees committed seqs only: plant the duplicate over a
            # committed row of the same channel (that message is lost then)
            owner = cluster.node(cluster.owners(other.channel)[0])
            same = [
                e
                for e in jr.read(journal)
                if e.channel == other.channel
                and e.msg_id not in (other.msg_id, victim.msg_id)
            ]
            db = sqlite3.connect(owner.storage.path)
            with db:
                db.execute("DROP INDEX messages_by_msg_id")
                planted = db.execute(
                    "UPDATE messages SET msg_id = ? WHERE channel = ? AND seq = ?",
                    (other.msg_id, _signed(other.channel), same[0].seq),
                )
                assert planted.rowcount == 1
            result = await run_check(nodes, journal, credentials=cluster.credentials)
            assert (result.lost, result.duplicated) == (2, 1)
            assert not result.ok

    asyncio.run(asyncio.wait_for(scenario(), 60))
