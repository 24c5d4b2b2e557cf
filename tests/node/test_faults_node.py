"""Node behaviour that fault runs depend on (in-process clusters, frozen views).

The failure detectors are stopped so that each test sets the membership
views itself: a node that briefly believes a peer dead, then learns better.
Each test reads histories through FETCH (what a reader sees: committed
records only) and checks one order per channel.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from plexichat import wire
from plexichat.load.client import NodeClient
from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p
from plexichat.node.peers import peer_handshake
from plexichat.node.server import Node
from plexichat.node.testing import InProcessCluster, admin_client, wait_for
from plexichat.node.transport import Link, RemoteError
from plexichat.routing import Ring, key_of

T = wire.MessageType


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


def cut_off(node: Node, peer: str, to: tuple[str, int] | None = None):
    """Point *node*'s view of *peer* at a port nothing listens on, or at *to*
    (its link closed); returns the member and its real address to restore it."""
    if to is None:
        spare = socket.socket()
        spare.bind(("127.0.0.1", 0))
        to = spare.getsockname()
        spare.close()
    member = node.membership.members[peer]
    real = (member.host, member.port)
    member.host, member.port = to
    link = node.links.pop(real, None)
    if link is not None:
        link.close()
    return member, real


async def history(node: Node, channel: int) -> list[tuple[int, bytes]]:
    """``(seq, payload)`` of *channel* as a reader of *node* sees it."""
    client = await client_for(node)
    try:
        rows, after = [], 0
        while True:
            page, more = await client.fetch(channel, after, 1000)
            rows += [(r.seq, r.payload) for r in page]
            if not more or not page:
                return rows
            after = page[-1].seq
    finally:
        await client.close()


def channel_where(prefix: str, test) -> int:
    return next(c for c in (key_of(f"{prefix}-{i}") for i in range(10_000)) if test(c))


async def client_for(node: Node) -> NodeClient:
    client = admin_client(node)
    await client.connect()
    return client


def test_a_write_under_a_transient_view_reaches_the_settled_owners(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            _, n1, n2 = cluster.nodes
            full = Ring({"n0": 1.0, "n1": 1.0, "n2": 1.0})
            partial = Ring({"n0": 1.0, "n1": 1.0})
            # owned by n2 (then n1) in the real ring, by n1 (then n0) while n1
            # thinks n2 is dead: the write lands on n1 and n0, not on n2
            channel = channel_where(
                "transient",
                lambda c: (
                    full.owners(c, 2) == ["n2", "n1"]
                    and partial.owners(c, 2) == ["n1", "n0"]
                ),
            )
            set_status(n1, n2, "dead")
            assert sorted(n1.ring_members) == ["n0", "n1"]
            client = await client_for(n1)
            seq = await client.send(channel, p.message_id(7, 1), 7, b"while-split")
            await client.close()
            assert await history(n1, channel) == [(seq, b"while-split")]
            assert await history(n2, channel) == []
            # n2 refutes: the full ring gives the channel back to n2, which
            # takes it over from the last config's log (n1's)
            set_status(n1, n2, "alive", bump=1)
            await wait_for(
                lambda: n1.settled and n2.order.meta(channel).owns(("n2", "n1")),
                10,
                "n2 owning the channel again",
            )
            assert await history(n2, channel) == [(seq, b"while-split")]
            client = await client_for(n2)
            assert await client.send(channel, p.message_id(7, 2), 7, b"b") == seq + 1
            await client.close()

    run(scenario())


def test_a_higher_term_deposes_the_owner_and_its_writes_are_not_acked(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, n1, _ = cluster.nodes
            channel = channel_where("depose", lambda c: n0.owners(c) == ("n0", "n1"))
            client = await client_for(n0)
            assert await client.send(channel, p.message_id(9, 1), 9, b"a") == 1
            # another node (speaking as n2) wins a later term at n1
            handshake = peer_handshake(cluster.credentials, "n2")
            peer = Link("127.0.0.1", n1.listen_port, handshake=handshake)
            prepare = pp.Prepare(channel, 50, ((1, 1),), 1)
            reply = await peer.call(T.HANDOFF, pp.encode_prepare(prepare))
            promise = pp.decode_promise(reply.payload)
            assert (promise.ok, promise.promised, promise.last) == (True, 50, 1)
            peer.close()
            # n0's APPEND of term 1 is refused: its write is not acknowledged
            with pytest.raises(RemoteError, match="REFUSED") as info:
                await client.send(channel, p.message_id(9, 2), 9, b"b")
            assert info.value.code == p.ErrorCode.UNAVAILABLE
            assert n1.counters["append_refused"] == 1
            assert not n0.order.meta(channel).owns(("n0", "n1"))
            # the next write takes the channel over above term 50; the
            # refused record is installed and committed at its one seq
            assert await client.send(channel, p.message_id(9, 2), 9, b"b") == 2
            assert n0.order.meta(channel).term > 50
            assert await client.send(channel, p.message_id(9, 3), 9, b"c") == 3
            await client.close()
            expected = [(1, b"a"), (2, b"b"), (3, b"c")]
            assert await history(n0, channel) == expected
            await wait_for(lambda: n1.order.meta(channel).commit == 3)
            assert await history(n1, channel) == expected

    run(scenario())


def test_forwards_queued_behind_a_reconnect_keep_their_order(tmp_path, run):
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


def test_pipelined_sends_keep_their_order_while_the_owner_steps_down(tmp_path, run):
    """A sender pipelines SENDs to one channel while its owner loses the
    channel again and again (as after failed writes): whatever is in flight
    (being looked up, gated behind a takeover) is numbered in send order."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            channel = key_of("pipelined")
            owner = cluster.node(cluster.owners(channel)[0])
            client = await client_for(owner)
            sender = 21
            futures = []
            for i in range(400):
                futures.append(
                    asyncio.ensure_future(
                        client.send(channel, p.message_id(sender, i), sender, b"x")
                    )
                )
                if i % 4 == 3:  # a few per read: several batches in flight
                    await asyncio.sleep(0)
                if i % 40 == 39:
                    owner.order.meta(channel).step_down()
            seqs = [await fut for fut in futures]
            await client.close()
            assert seqs == sorted(seqs)
            assert len(set(seqs)) == len(seqs)

    run(scenario())


def test_pipelined_sends_keep_their_order_when_the_channel_moves_away(tmp_path, run):
    """Mid-stream the ring gives the channel to another node: SENDs still
    being looked up on the old owner are forwarded before the newer ones."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, _, n2 = cluster.nodes
            short = Ring({"n0": 1.0, "n1": 1.0})
            full = Ring({"n0": 1.0, "n1": 1.0, "n2": 1.0})
            channel = channel_where(
                "moving",
                lambda c: (
                    short.owners(c, 2)[0] == "n0" and full.owners(c, 2)[0] == "n2"
                ),
            )
            set_status(n0, n2, "dead")
            client = await client_for(n0)
            sender = 22
            futures = []
            for i in range(300):
                futures.append(
                    asyncio.ensure_future(
                        client.send(channel, p.message_id(sender, i), sender, b"x")
                    )
                )
                if i % 4 == 3:  # a few per read: several batches in flight
                    await asyncio.sleep(0)
                if i == 150:
                    set_status(n0, n2, "alive", bump=1)
            results = await asyncio.gather(*futures, return_exceptions=True)
            await client.close()
            seqs = [r for r in results if isinstance(r, int)]
            assert len(seqs) > 150
            assert seqs == sorted(seqs)
            assert len(set(seqs)) == len(seqs)

    run(scenario())


def test_sends_held_for_a_takeover_are_routed_again_after_a_ring_change(tmp_path, run):
    async def scenario() -> None:
        ghost = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, _, n2 = cluster.nodes
            with_ghost = Ring({"n0": 1.0, "n1": 1.0, "ghost": 1.0})
            full = Ring({"n0": 1.0, "n1": 1.0, "n2": 1.0})
            channel = channel_where(
                "reroute",
                lambda c: (
                    with_ghost.owners(c, 2) == ["n0", "n1"]
                    and full.owners(c, 1) == ["n2"]
                ),
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
            # the SEND waits for the takeover, which waits for the ghost's
            # PROMISE; the ring changes meanwhile: n2 owns the channel now
            await wait_for(lambda: channel in n0.gates, 5, "the SEND to be held")
            n0.membership.merge(
                [["ghost", "127.0.0.1", ghost.getsockname()[1], 1, "dead", 1.0]]
            )
            set_status(n0, n2, "alive", bump=1)
            assert n0.owners(channel)[0] == "n2"
            seq = await send
            await client.close()
            assert await history(n2, channel) == [(seq, b"held")]
            assert n2.counters["acked"] == 1
        ghost.close()

    run(scenario())


def test_the_minority_side_refuses_writes_and_the_majority_keeps_them(tmp_path, run):
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


def test_an_owner_without_a_lease_stops_writing_then_takes_over_again(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, n1, n2 = cluster.nodes
            channel = channel_where(
                "lease",
                lambda c: (
                    n0.owners(c) == ("n0", "n1")
                    and Ring({"n1": 1.0, "n2": 1.0}).owners(c, 2)[0] == "n1"
                ),
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
            # a fresh answer renews the lease; n0 takes the channel over in a
            # new term from n1's log and numbers after n1's write
            assert await n0.membership.ping("n1")
            assert await client0.send(channel, p.message_id(8, 4), 8, b"d") == 3
            expected = [(1, b"a"), (2, b"b"), (3, b"d")]
            assert await history(n0, channel) == expected
            # n1, deposed, learns the commit from n0 and shows the same order
            await wait_for(lambda: n1.order.meta(channel).commit == 3)
            assert await history(n1, channel) == expected
            await client0.close()
            await client1.close()

    run(scenario())


def test_a_write_no_replica_received_is_not_acked_and_keeps_one_seq(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, _, _ = cluster.nodes
            channel = channel_where("undo", lambda c: n0.owners(c) == ("n0", "n1"))
            client = await client_for(n0)
            for i in range(1, 11):
                assert await client.send(channel, p.message_id(3, i), 3, b"a") == i
            # n1 becomes unreachable from n0: nothing listens at its address
            member, real = cut_off(n0, "n1")
            with pytest.raises(RemoteError, match="replica"):
                await client.send(channel, p.message_id(3, 11), 3, b"b")
            # not committed: no reader sees it, on either node
            assert len(await history(n0, channel)) == 10
            assert n0.order.meta(channel).last == 11  # kept, not rolled back
            # reachable again: the retry takes the channel over, installs only
            # the record n1 lacks and acknowledges it at its one seq
            member.host, member.port = real
            installed = n0.counters["log_installed"]
            assert await client.send(channel, p.message_id(3, 11), 3, b"b") == 11
            assert n0.counters["log_installed"] - installed == 1
            assert await client.send(channel, p.message_id(3, 12), 3, b"c") == 12
            await client.close()
            seqs = [s for s, _ in await history(n0, channel)]
            assert seqs == list(range(1, 13))

    run(scenario())


def test_an_old_owners_unacked_tail_never_shares_a_seq_with_the_new_owners(
    tmp_path,
    run,
):
    """Issue 11's shared-seq trace: an owner stores m1 at S but its replica
    never answers (the outcome is unknown: the frame went out, no reply came);
    the others route around it and a new owner acknowledges m2 at S; after
    the heal the old owner comes back.  One history must win: m2 at S
    everywhere, m1 never at S (a retry gets a seq of its own)."""

    async def scenario() -> None:
        ghost = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
        async with InProcessCluster(tmp_path, replicate_timeout=1.0) as cluster:
            await freeze(cluster)
            n0, n1, n2 = cluster.nodes
            channel = channel_where(
                "shared",
                lambda c: (
                    n0.owners(c) == ("n0", "n1")
                    and Ring({"n1": 1.0, "n2": 1.0}).owners(c, 2)[0] == "n1"
                ),
            )
            client0 = await client_for(n0)
            assert await client0.send(channel, p.message_id(6, 1), 6, b"a") == 1
            # n0 is cut off: m1 is stored on n0 only, not acked
            cuts = [cut_off(n0, "n1", to=ghost.getsockname())]
            with pytest.raises(RemoteError):
                await client0.send(channel, p.message_id(6, 2), 6, b"m1")
            # the others route around n0 (and cannot reach it): n1 owns the
            # channel and acks m2
            for node in (n1, n2):
                set_status(node, n0, "dead")
                cuts.append(cut_off(node, "n0"))
            client1 = await client_for(n1)
            assert await client1.send(channel, p.message_id(7, 1), 7, b"m2") == 2
            # heal: n0 is back in every view and reaches n1 again
            for member, real in cuts:
                member.host, member.port = real
            for node in (n1, n2):
                set_status(node, n0, "alive", bump=1)
            await wait_for(
                lambda: all(n.settled for n in cluster.nodes), 20, "the rebalance"
            )
            # the owner under the healed ring numbers after m2; m1's retry
            # gets a seq of its own
            owner = next(n for n in cluster.nodes if n.id == n0.owners(channel)[0])
            client = await client_for(owner)
            after = await client.send(channel, p.message_id(6, 2), 6, b"m1")
            assert after == 3
            await client.close()
            for node in (n0, n1):
                await wait_for(lambda n=node: n.order.meta(channel).commit == 3)
                assert await history(node, channel) == [
                    (1, b"a"),
                    (2, b"m2"),
                    (3, b"m1"),
                ]
            await client0.close()
            await client1.close()
        ghost.close()

    run(scenario())


def test_no_write_before_every_replica_promised_the_new_term(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await freeze(cluster)
            n0, _, _ = cluster.nodes
            channel = channel_where("blind", lambda c: n0.owners(c) == ("n0", "n1"))
            # n1 cannot be reached and n0 does not own the channel yet (as
            # after a restart): without n1's log n0 could reuse its seqs
            member, real = cut_off(n0, "n1")
            client = await client_for(n0)
            with pytest.raises(RemoteError, match="no promise from replica n1"):
                await client.send(channel, p.message_id(5, 1), 5, b"a")
            assert n0.counters["takeover_failed"] >= 1
            assert n0.order.meta(channel).last == 0
            member.host, member.port = real
            assert await client.send(channel, p.message_id(5, 2), 5, b"b") == 1
            await client.close()

    run(scenario())


def test_a_takeover_of_a_channel_of_big_messages_moves_it_in_frames(tmp_path, run):
    """Log pulls and installs used to take up to handoff_batch records
    whatever their size: 8 messages of 250 KiB made a 2 MiB APPEND that the
    replica refused as oversized, and the channel could never be taken over."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=3) as cluster:
            channel = key_of("bigtake")
            first = cluster.owners(channel)[0]
            owner = cluster.node(first)
            client = await client_for(owner)
            big = [bytes([i]) * (250 << 10) for i in range(8)]
            for i, body in enumerate(big):
                assert await client.send(channel, p.message_id(1, i), 1, body) == i + 1
            await client.close()
            await owner.stop(leave=False)
            await cluster.wait_dead(first)
            new_owner = cluster.node(cluster.owners(channel)[0])
            client = await client_for(new_owner)
            assert await client.send(channel, p.message_id(1, 9), 1, b"after") == 9
            await client.close()
            for node in cluster.running():
                assert node.counters["bad_frames"] == 0
            assert await history(new_owner, channel) == [
                *((i + 1, body) for i, body in enumerate(big)),
                (9, b"after"),
            ]

    run(scenario())
