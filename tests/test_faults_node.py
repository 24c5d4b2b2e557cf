"""Node behaviour that fault runs depend on (in-process clusters, frozen views).

The failure detectors are stopped so that each test sets the membership
views itself: a node that briefly believes a peer dead, then learns better.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from plexichat import wire
from plexichat.load.client import NodeClient
from plexichat.node import protocol as p
from plexichat.node.server import Node
from plexichat.node.testing import InProcessCluster, wait_for
from plexichat.node.transport import Link, RemoteError
from plexichat.routing import Ring, key_of

T = wire.MessageType


def run(coro, timeout: float = 60.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def freeze(cluster: InProcessCluster) -> None:
    """Stop every failure detector: views change only when a test says so."""
    for node in cluster.nodes:
        node.membership._running = False  # the loop ends at its next round
        task = node.membership._task
        # (asyncio.wait_for in 3.11 can swallow a cancel: repeat until done)
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)
        node.membership._task = None


def set_status(node: Node, about: Node, status: str, bump: int = 0) -> None:
    """Tell *node* that *about* has *status* (at its incarnation + *bump*)."""
    update = about.membership.me.update()
    update[3] += bump
    update[4] = status
    node.membership.merge([update])


def cut_off(node: Node, peer: str):
    """Point *node*'s view of *peer* at a port nothing listens on (its link
    closed); returns the member and its real address to restore it."""
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    nowhere = spare.getsockname()
    spare.close()
    member = node.membership.members[peer]
    real = (member.host, member.port)
    member.host, member.port = nowhere
    link = node.links.pop(real, None)
    if link is not None:
        link.close()
    return member, real


async def client_for(node: Node) -> NodeClient:
    client = NodeClient("127.0.0.1", node.listen_port, timeout=5.0)
    await client.connect()
    return client


def test_a_write_under_a_transient_view_reaches_the_settled_owners(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            _, n1, n2 = cluster.nodes
            full = Ring({"n0": 1.0, "n1": 1.0, "n2": 1.0})
            partial = Ring({"n0": 1.0, "n1": 1.0})
            # owned by n2 (then n1) in the real ring, by n1 (then n0) while n1
            # thinks n2 is dead: the write lands on n1 and n0, not on n2
            channel = next(
                c
                for c in (key_of(f"transient-{i}") for i in range(10_000))
                if full.owners(c, 2) == ["n2", "n1"]
                and partial.owners(c, 2) == ["n1", "n0"]
            )
            set_status(n1, n2, "dead")
            assert sorted(n1.ring_members) == ["n0", "n1"]
            client = await client_for(n1)
            seq = await client.send(channel, p.message_id(7, 1), 7, b"while-split")
            await client.close()
            assert [r.seq for r in await n1.storage.fetch(channel, 0, 10)] == [seq]
            assert await n2.storage.fetch(channel, 0, 10) == []
            # n2 refutes: n1's ring is the full ring again, as at its last
            # handoff, so only the transient push can place the message
            set_status(n1, n2, "alive", bump=1)
            assert sorted(n1.ring_members) == ["n0", "n1", "n2"]
            await wait_for(
                lambda: n1.settled and n1.counters["transient_pushed"] > 0,
                10,
                "n1's transient handoff",
            )
            rows = await n2.storage.fetch(channel, 0, 10)
            assert [(r.seq, r.payload) for r in rows] == [(seq, b"while-split")]

    run(scenario())


def test_a_pull_from_a_new_owner_fences_the_old_one(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, _, n2 = cluster.nodes
            channel = next(
                c
                for c in (key_of(f"fence-{i}") for i in range(10_000))
                if n0.owners(c) == ("n0", "n1")
            )
            client = await client_for(n0)
            assert await client.send(channel, p.message_id(9, 1), 9, b"a") == 1
            # n2 claims the channel (as after a view change on its side)
            hello = p.encode_json(
                {"version": p.PROTOCOL_VERSION, "role": "peer", "node_id": "n2"}
            )
            peer = Link("127.0.0.1", n0.listen_port, hello=hello)
            reply = await peer.call(T.HANDOFF, p.encode_handoff_pull(channel))
            kind, _, last, _ = p.decode_handoff(reply.payload)
            assert (kind, last) == (p.HandoffKind.SEQ, 1)
            with pytest.raises(RemoteError, match="claimed") as info:
                await client.send(channel, p.message_id(9, 2), 9, b"b")
            assert info.value.code == p.ErrorCode.UNAVAILABLE
            assert n0.counters["fenced"] == 1
            # other channels are not affected
            other = next(
                c
                for c in (key_of(f"free-{i}") for i in range(10_000))
                if n0.owners(c) == ("n0", "n1")
            )
            assert await client.send(other, p.message_id(9, 3), 9, b"c") == 1
            # once n0's own view changes it owns the channel again, after a sync
            set_status(n0, n2, "dead")
            set_status(n0, n2, "alive", bump=1)
            assert await client.send(channel, p.message_id(9, 4), 9, b"d") == 2
            peer.close()
            await client.close()

    run(scenario())


def test_forwards_queued_behind_a_reconnect_keep_their_order(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            channel = key_of("order")
            owner, replica = cluster.owners(channel)
            other = next(n for n in cluster.nodes if n.id not in (owner, replica))
            address = other.membership.address(owner)
            sender = 5
            acks: list[tuple[int, int]] = []
            client = await client_for(other)
            for round_ in range(20):
                # the forwarding link to the owner is gone: the next forward
                # reconnects while more SENDs keep arriving
                other.links.pop(address).close()
                futures = []
                for i in range(20):
                    counter = round_ * 100 + i
                    futures.append(
                        asyncio.ensure_future(
                            client.send(
                                channel, p.message_id(sender, counter), sender, b"x"
                            )
                        )
                    )
                    await asyncio.sleep(0)
                for i, fut in enumerate(futures):
                    acks.append((round_ * 100 + i, await fut))
            await client.close()
            seqs = [seq for _, seq in sorted(acks)]
            assert seqs == sorted(seqs)
            assert len(set(seqs)) == len(seqs)

    run(scenario())


def test_sends_held_for_a_sync_are_routed_again_after_a_ring_change(tmp_path):
    async def scenario() -> None:
        ghost = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, _, n2 = cluster.nodes
            with_ghost = Ring({"n0": 1.0, "n1": 1.0, "ghost": 1.0})
            full = Ring({"n0": 1.0, "n1": 1.0, "n2": 1.0})
            channel = next(
                c
                for c in (key_of(f"reroute-{i}") for i in range(10_000))
                if with_ghost.owners(c, 2) == ["n0", "n1"]
                and full.owners(c, 1) == ["n2"]
            )
            # n0's view: n2 gone, a member that never answers in its place
            set_status(n0, n2, "dead")
            n0.membership.merge(
                [["ghost", "127.0.0.1", ghost.getsockname()[1], 1, "alive", 1.0]]
            )
            assert sorted(n0.ring_members) == ["ghost", "n0", "n1"]
            client = await client_for(n0)
            send = asyncio.ensure_future(
                client.send(channel, p.message_id(3, 1), 3, b"held")
            )
            # the SEND waits for the ghost's HANDOFF SEQ (sync_timeout); the
            # ring changes meanwhile: n2 owns the channel now
            await wait_for(lambda: channel in n0.gates, 5, "the SEND to be held")
            # n0's sync asks n2 (the channel's owner before) for its last seq:
            # n2 fences the channel
            await wait_for(lambda: channel in n2.fenced, 5, "n2 fenced by the sync")
            n0.membership.merge(
                [["ghost", "127.0.0.1", ghost.getsockname()[1], 1, "dead", 1.0]]
            )
            set_status(n0, n2, "alive", bump=1)
            assert n0.owners(channel)[0] == "n2"
            # n2's fence lasts two leases: let them pass before the held SEND
            # reaches n2 (no await between here and there).  The SEND stays
            # held until n0's sync gives up on the ghost (sync_timeout, 1 s on
            # the loop); n2's lease keeper (every lease/3) renews n2's lease at
            # the new clock time long before that.
            cluster.advance(2 * n2.lease)
            seq = await send
            await client.close()
            rows = await n2.storage.fetch(channel, 0, 10)
            assert [(r.seq, r.payload) for r in rows] == [(seq, b"held")]
            assert n2.counters["acked"] == 1
        ghost.close()

    run(scenario())


def test_the_minority_side_refuses_writes_and_the_majority_keeps_them(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=5) as cluster:
            await wait_for(lambda: all(len(n.ring_members) == 5 for n in cluster.nodes))
            await freeze(cluster)
            minority, majority = cluster.nodes[:2], cluster.nodes[2:]
            for node in minority:  # the split as each side's detector sees it
                for other in majority:
                    set_status(node, other, "dead")
            for node in majority:
                for other in minority:
                    set_status(node, other, "dead")
            # two live nodes are enough for R=2 but not a majority of five
            assert all(len(n.ring_members) == 2 for n in minority)
            assert all(not n.has_quorum for n in minority)
            assert all(n.has_quorum for n in majority)
            channels = [key_of(f"split-{i}") for i in range(40)]
            small = await client_for(minority[0])
            for i, channel in enumerate(channels):
                with pytest.raises(RemoteError, match="no quorum: 2 of 5") as info:
                    await small.send(channel, p.message_id(5, i + 1), 5, b"x")
                assert info.value.code == p.ErrorCode.UNAVAILABLE
            await small.close()
            for node in minority:
                for channel in channels:
                    assert await node.storage.fetch(channel, 0, 5) == []
            large = await client_for(majority[0])
            for i, channel in enumerate(channels):
                assert await large.send(channel, p.message_id(6, i + 1), 6, b"y") >= 1
            await large.close()
            # healed: the minority regains its quorum and serves again
            for node in minority:
                for other in majority:
                    set_status(node, other, "alive", bump=1)
            assert all(n.has_quorum for n in minority)
            small = await client_for(minority[0])
            assert await small.send(channels[0], p.message_id(5, 99), 5, b"z") >= 1
            await small.close()

    run(scenario())


def test_an_owner_without_a_lease_stops_writing_then_resyncs(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, n1, n2 = cluster.nodes
            channel = next(
                c
                for c in (key_of(f"lease-{i}") for i in range(10_000))
                if n0.owners(c) == ("n0", "n1")
                and Ring({"n1": 1.0, "n2": 1.0}).owners(c, 2)[0] == "n1"
            )
            client0 = await client_for(n0)
            assert await client0.send(channel, p.message_id(8, 1), 8, b"a") == 1
            # n0 stalls (a pause): n1 and n2 route around it and n1 writes
            for node in (n1, n2):
                set_status(node, n0, "dead")
            client1 = await client_for(n1)
            assert await client1.send(channel, p.message_id(8, 2), 8, b"b") == 2
            # n0 wakes up without a recent answer from a majority: no write
            keeper = next(t for t in n0._tasks if t.get_name() == "n0-lease")
            keeper.cancel()
            n0.answered.clear()
            with pytest.raises(RemoteError, match="lease lapsed"):
                await client0.send(channel, p.message_id(8, 3), 8, b"c")
            assert n0.counters["lease_lapses"] == 1
            # a fresh answer renews the lease; n0 syncs the channel first, and
            # n1 refuses the copy of a node it believes dead
            assert await n0.membership.ping("n1")
            with pytest.raises(RemoteError, match="n0 is dead here"):
                await client0.send(channel, p.message_id(8, 4), 8, b"d")
            assert n1.counters["replicate_refused"] == 1
            # n0 refutes: it is the owner again and numbers after n1's write
            for node in (n1, n2):
                set_status(node, n0, "alive", bump=1)
            assert await client0.send(channel, p.message_id(8, 5), 8, b"e") >= 3
            rows = await n1.storage.fetch(channel, 0, 10)
            seqs = [r.seq for r in rows if r.msg_id != p.message_id(8, 4)]
            assert seqs == sorted(set(seqs)), "no sequence number given twice"
            await client0.close()
            await client1.close()

    run(scenario())


def test_a_write_no_replica_received_is_rolled_back(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, _, _ = cluster.nodes
            channel = next(
                c
                for c in (key_of(f"undo-{i}") for i in range(10_000))
                if n0.owners(c) == ("n0", "n1")
            )
            client = await client_for(n0)
            assert await client.send(channel, p.message_id(3, 1), 3, b"a") == 1
            # n1 becomes unreachable from n0: nothing listens at its address
            member, real = cut_off(n0, "n1")
            with pytest.raises(RemoteError, match="replica"):
                await client.send(channel, p.message_id(3, 2), 3, b"b")
            await wait_for(lambda: n0.counters["rolled_back"] == 1)
            await n0.storage.call(lambda conn: None)  # the delete has run
            rows = await n0.storage.fetch(channel, 0, 10)
            assert [r.msg_id for r in rows] == [p.message_id(3, 1)]
            # reachable again: the next write gets a fresh number
            member.host, member.port = real
            assert await client.send(channel, p.message_id(3, 3), 3, b"c") == 3
            await client.close()

    run(scenario())


def test_a_returning_owner_gets_only_the_blocks_it_lacks(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, handoff_block=4) as cluster:
            await freeze(cluster)
            n0, n1, _ = cluster.nodes
            channel = key_of("digest")
            recs = [
                p.make_record((channel, s, p.message_id(2, s), 2, s, b"m", 0))
                for s in range(1, 13)
            ]

            def insert(node: Node, records: list[p.Record]) -> asyncio.Future[None]:
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                node.storage.insert(
                    records, lambda *_: done.done() or done.set_result(None)
                )
                return done

            await insert(n0, recs)
            # n1 has blocks 0 and 2 (seqs 1-4, 9-12) but lacks seq 6 of block 1
            await insert(n1, recs[:5] + recs[6:])
            sent, ok = await n0._push_channel(channel, "n1")
            assert ok
            assert sent == 4  # block 1 only (seqs 5-8), idempotent on msg_id
            assert n0.counters["handoff_blocks_same"] == 2
            assert n0.counters["handoff_blocks_pushed"] == 1
            have = await n1.storage.fetch(channel, 0, 100)
            assert sorted(r.seq for r in have) == list(range(1, 13))
            # nothing differs any more: nothing is sent
            assert await n0._push_channel(channel, "n1") == (0, True)

    run(scenario())


def test_handoff_blocks_round_trip_and_bad_bodies():
    digest = {0: (3, (1 << 127) | 5), 7: (1, 9)}
    body = p.encode_handoff_blocks(42, digest)
    assert p.decode_handoff_blocks(body) == (42, digest)
    with pytest.raises(p.ProtocolError):
        p.decode_handoff_blocks(body[:-1])
    with pytest.raises(p.ProtocolError):
        p.decode_handoff_blocks(p.encode_handoff_pull(42))
    kind, channel, block, _ = p.decode_handoff(p.encode_handoff_digest(42, 256))
    assert (kind, channel, block) == (p.HandoffKind.DIGEST, 42, 256)


def test_rows_written_under_a_ring_no_handoff_started_from_still_reach_owners(
    tmp_path,
):
    async def scenario() -> None:
        # the handoff worker waits 4 s of a stable ring: the short view below
        # never becomes a handoff base, yet writes land under it
        async with InProcessCluster(tmp_path, handoff_delay=4.0) as cluster:
            await wait_for(lambda: all(n.settled for n in cluster.nodes), 20)
            await freeze(cluster)
            n0, n1, n2 = cluster.nodes
            short = Ring({"n0": 1.0, "n1": 1.0})
            full = Ring({"n0": 1.0, "n1": 1.0, "n2": 1.0})
            channel = next(
                c
                for c in (key_of(f"unbased-{i}") for i in range(10_000))
                if short.owners(c, 2) == ["n0", "n1"] and full.owners(c, 2)[0] == "n2"
            )
            for node in (n0, n1):
                set_status(node, n2, "dead")
            client = await client_for(n0)

            async def placement_rounds(count: int) -> None:
                # the tracker gets *count* chances to look at the short ring
                # (a round, not a sleep: a busy loop cannot make it miss them)
                start = n0.counters["placement_rounds"]
                await wait_for(
                    lambda: n0.counters["placement_rounds"] >= start + count,
                    20,
                    "placement rounds",
                )

            await placement_rounds(2)  # the tracker sees the short ring
            seq = await client.send(channel, p.message_id(4, 1), 4, b"short")
            await placement_rounds(2)  # and what was written under it
            for node in (n0, n1):
                set_status(node, n2, "alive", bump=1)
            await client.close()

            async def n2_holds() -> list[int]:
                return [r.seq for r in await n2.storage.fetch(channel, 0, 10)]

            deadline = time.monotonic() + 30  # handoff_delay 4 s, then the push
            while await n2_holds() != [seq] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await n2_holds() == [seq], "n2 never got the row"

    run(scenario(), timeout=90)


def test_no_write_before_the_replicas_told_their_last_sequence(tmp_path):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, _, _ = cluster.nodes
            channel = next(
                c
                for c in (key_of(f"blind-{i}") for i in range(10_000))
                if n0.owners(c) == ("n0", "n1")
            )
            # n1 cannot be reached, and n0 has not synced the channel yet (as
            # after a restart that lost its last commits in a power cut)
            member, real = cut_off(n0, "n1")
            n0.synced.clear()
            client = await client_for(n0)
            with pytest.raises(RemoteError, match="no answer from replica n1"):
                await client.send(channel, p.message_id(5, 1), 5, b"a")
            assert n0.counters["sync_failed"] == 1
            assert await n0.storage.fetch(channel, 0, 10) == []
            member.host, member.port = real
            assert await client.send(channel, p.message_id(5, 2), 5, b"b") == 1
            await client.close()

    run(scenario())
