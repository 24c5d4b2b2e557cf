"""In-process clusters: convergence, forwarding, replication, handoff, bad input."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from plexichat import wire
from plexichat.load.client import NodeClient
from plexichat.node import protocol as p
from plexichat.node.membership import GossipConfig, ManualClock
from plexichat.node.testing import InProcessCluster, admin_client, wait_for
from plexichat.node.transport import RemoteError
from plexichat.routing import key_of

T = wire.MessageType


async def client_for(node) -> NodeClient:
    client = admin_client(node)
    await client.connect()
    return client


async def stored(node, channel: int) -> list[p.Record]:
    return await node.storage.fetch(channel, 0, 10_000)


def test_three_nodes_converge_and_expose_their_view(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            for node in cluster.nodes:
                view = node.membership.view()
                assert [m["id"] for m in view] == ["n0", "n1", "n2"]
                assert {m["status"] for m in view} == {"alive"}
            client = await client_for(cluster.nodes[1])
            info, hists = await client.stats()
            assert info["node_id"] == "n1"
            assert info["ring"] == ["n0", "n1", "n2"]
            assert info["backend"] in ("compiled", "python", "mixed")
            assert set(hists) == {"send", "forward", "replicate", "fetch", "relay"}
            assert client.welcome["replicas"] == 2
            await client.ping()
            await client.close()

    run(scenario())


def test_send_through_non_owner_lands_on_owner_and_replica(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            channel = key_of("general")
            owner, replica = cluster.owners(channel)
            other = next(n for n in cluster.nodes if n.id not in (owner, replica))
            client = await client_for(other)
            seqs = [
                await client.send(channel, p.message_id(42, i), 42, f"m{i}".encode())
                for i in range(1, 11)
            ]
            assert seqs == list(range(1, 11))
            # resending a message id is idempotent: same sequence number, no copy
            assert await client.send(channel, p.message_id(42, 3), 42, b"m3") == 3
            for node_id in (owner, replica):
                rows = await stored(cluster.node(node_id), channel)
                assert [r.seq for r in rows] == seqs
                assert [r.payload for r in rows] == [
                    f"m{i}".encode() for i in range(1, 11)
                ]
            assert await stored(other, channel) == []
            assert other.counters["forwarded"] == 11
            assert cluster.node(owner).counters["acked"] == 10
            fetched = await (await client_for(cluster.node(owner))).fetch_all(
                channel, page=3
            )
            assert [r.seq for r in fetched] == seqs
            await client.close()

    run(scenario())


def test_subscribe_delivers_committed_messages(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            channel = key_of("news")
            owner = cluster.node(cluster.owners(channel)[0])
            subscriber = await client_for(owner)
            assert await subscriber.subscribe(channel) == 0
            sender = await client_for(owner)
            await sender.send(channel, p.message_id(1, 1), 1, b"hello")
            frame = await asyncio.wait_for(subscriber.pushes.get(), 5)
            assert frame.type == T.DELIVER
            record = p.decode_deliver(frame.payload)
            assert (record.channel, record.seq, record.payload) == (
                channel,
                1,
                b"hello",
            )
            await subscriber.close()
            await wait_for(lambda: not owner.subscribers, 5, "unsubscribe on close")

    run(scenario())


def test_relay_reaches_every_node_once(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=4) as cluster:
            client = await client_for(cluster.nodes[2])
            relay = p.Relay(
                77, time.time_ns(), ttl=8, fanout=1, root="", payload=b"p2p"
            )
            await client.relay(relay)
            await client.relay(relay)  # a duplicate is counted, not forwarded
            await wait_for(
                lambda: all(n.counters["relays"] == 1 for n in cluster.nodes),
                5,
                "relay",
            )
            assert cluster.nodes[2].counters["relay_dups"] == 1
            total = sum(n.hist["relay"].count for n in cluster.nodes)
            assert total == 3  # every node but the root recorded a latency
            assert cluster.nodes[0].relay_children("n0", 2) == ["n1", "n2"]
            assert cluster.nodes[1].relay_children("n0", 2) == ["n3"]
            assert cluster.nodes[1].relay_children("nX", 2) == []
            await client.stats(reset=["relay"])
            assert cluster.nodes[2].hist["relay"].count == 0
            await client.close()

    run(scenario())


def test_join_hands_channels_off_and_keeps_sequences_increasing(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            channels = [key_of(f"room-{i}") for i in range(24)]
            client = await client_for(cluster.nodes[0])
            for channel in channels:
                for i in range(3):
                    await client.send(channel, p.message_id(channel, i), 9, b"x")
            newcomer = await cluster.add_node("n3")
            await cluster.wait_converged()
            moved = [c for c in channels if "n3" in cluster.owners(c)]
            assert moved, "with 4 nodes some channels must move to n3"

            async def handed_off() -> bool:
                counts = [len(await stored(newcomer, c)) for c in moved]
                return all(n == 3 for n in counts)

            while not await handed_off():
                await asyncio.sleep(0.02)
            got = newcomer.counters["log_pulled"] + newcomer.counters["replicated"]
            assert got == 3 * len(moved)  # each record reached it once
            owned = next(c for c in moved if cluster.owners(c)[0] == "n3")
            seq = await client.send(owned, p.message_id(owned, 99), 9, b"after join")
            assert seq == 4
            await client.close()

    run(scenario())


def test_failed_node_is_detected_and_writes_continue(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            victim = cluster.nodes[2]
            await victim.stop(leave=False)  # as if it crashed: no goodbye
            survivors = cluster.nodes[:2]
            await cluster.wait_dead("n2")
            await wait_for(
                lambda: all(set(n.ring_members) == {"n0", "n1"} for n in survivors),
                10,
                "failure detection",
            )
            statuses = {m["id"]: m["status"] for m in survivors[0].membership.view()}
            assert statuses["n2"] == "dead"
            assert sum(n.membership.counters["suspected"] for n in survivors) >= 1
            client = await client_for(survivors[0])
            for i in range(5):
                await client.send(key_of(f"c{i}"), p.message_id(5, i), 5, b"x")
            await client.close()

    run(scenario())


def test_graceful_leave_updates_every_view(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            await cluster.stop_node("n1")  # leave=True: tells the others
            await cluster.wait_converged(timeout=5)
            statuses = {
                m["id"]: m["status"] for m in cluster.nodes[0].membership.view()
            }
            assert statuses["n1"] == "left"

    run(scenario())


def test_unavailable_with_fewer_nodes_than_replicas(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=1) as cluster:
            client = await client_for(cluster.nodes[0])
            with pytest.raises(RemoteError) as info:
                await client.send(1, p.message_id(1, 1), 1, b"x")
            assert info.value.code == p.ErrorCode.UNAVAILABLE
            await client.close()

    run(scenario())


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_frame(reader: asyncio.StreamReader) -> wire.Frame:
    decoder = wire.FrameDecoder()
    while True:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, "connection closed before a frame arrived"
        frames = decoder.feed(data)
        if frames:
            return frames[0]


def error_code(frame: wire.Frame) -> int:
    assert frame.type == T.ERROR
    return p.decode_error(frame.payload)[0]


def test_bad_input_is_answered_and_other_clients_keep_working(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2, read_timeout=0.3) as cluster:
            node = cluster.nodes[0]
            good = await client_for(node)
            channel = key_of("busy")

            async def good_send(i: int) -> int:
                return await good.send(channel, p.message_id(8, i), 8, b"ok")

            assert await good_send(1) == 1
            # 1. garbage bytes: ERROR MALFORMED, then the connection is closed
            reader, writer = await raw(node.listen_port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            assert error_code(await read_frame(reader)) == p.ErrorCode.MALFORMED
            assert await asyncio.wait_for(reader.read(), 5) == b""
            # 2. a flipped checksum bit
            reader, writer = await raw(node.listen_port)
            frame = bytearray(wire.encode_frame(T.PING, 1, b""))
            frame[-1] ^= 1
            writer.write(bytes(frame))
            assert error_code(await read_frame(reader)) == p.ErrorCode.MALFORMED
            # 3. an oversized length is refused from the header alone
            reader, writer = await raw(node.listen_port)
            writer.write(b"PX\x01\x03" + struct.pack(">II", 1, wire.MAX_PAYLOAD + 1))
            assert error_code(await read_frame(reader)) == p.ErrorCode.MALFORMED
            # 4. wrong protocol version in HELLO
            reader, writer = await raw(node.listen_port)
            writer.write(wire.encode_frame(T.HELLO, 3, p.encode_json({"version": 99})))
            frame = await read_frame(reader)
            assert (error_code(frame), frame.request_id) == (p.ErrorCode.BAD_VERSION, 3)
            # 5. well-framed but wrong: the connection stays usable
            reader, writer = await raw(node.listen_port)
            hello = {"version": 1, "token": cluster.token(admin=True)}
            writer.write(wire.encode_frame(T.HELLO, 2, p.encode_json(hello)))
            assert (await read_frame(reader)).type == T.WELCOME
            writer.write(wire.encode_frame(T.WELCOME, 4, b"{}"))
            assert error_code(await read_frame(reader)) == p.ErrorCode.UNKNOWN_OP
            writer.write(wire.encode_frame(T.SEND, 5, b"short"))
            assert error_code(await read_frame(reader)) == p.ErrorCode.MALFORMED
            writer.write(wire.encode_frame(T.FETCH, 6, b"\x00"))
            assert error_code(await read_frame(reader)) == p.ErrorCode.MALFORMED
            writer.write(wire.encode_frame(T.SEND, 7, b"\x00" * 32 + b"x" * 300_000))
            assert error_code(await read_frame(reader)) == p.ErrorCode.TOO_LARGE
            writer.write(wire.encode_frame(T.ERROR, 8, p.encode_error(1, "x")))
            writer.write(wire.encode_frame(T.PING, 9, b""))
            pong = await read_frame(reader)  # the ERROR got no answer
            assert (pong.type, pong.request_id) == (T.PONG, 9)
            # 6. a sender that stalls inside a frame is cut off after read_timeout
            reader, writer = await raw(node.listen_port)
            writer.write(wire.encode_frame(T.PING, 1, b"")[:7])
            assert error_code(await read_frame(reader)) == p.ErrorCode.TIMEOUT
            assert node.counters["bad_frames"] == 3
            assert node.counters["timeouts_closed"] == 1
            assert [await good_send(i) for i in range(2, 5)] == [2, 3, 4]
            await good.close()

    run(scenario())


async def unread_fetches(node, channel: int, requests: int):
    """A raw client with a tiny receive window that sends FETCHes and reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", node.listen_port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    fetch = p.encode_fetch(channel, 0, 1000)
    hello = {"version": 1, "token": node.credentials.token(1)}
    writer.write(
        wire.encode_frame(T.HELLO, 0, p.encode_json(hello))
        + b"".join(wire.encode_frame(T.FETCH, i, fetch) for i in range(requests))
    )
    host, port = sock.getsockname()[:2]
    name = f"{host}:{port}"
    await wait_for(lambda: any(c.peername == name for c in node.conns), 10, "accept")
    return reader, writer, next(c for c in node.conns if c.peername == name)


def test_clients_that_do_not_read_are_paused_then_cut_off(tmp_path, run):
    async def scenario() -> None:
        # a slow detector: encoding ~80 MiB of replies keeps the shared event
        # loop busy for longer than the fast test lease
        calm = GossipConfig(interval=0.05, ping_timeout=0.5, suspect_timeout=3.0)
        async with InProcessCluster(tmp_path, size=2, gossip=calm) as cluster:
            channel = key_of("bulky")
            node = cluster.node(cluster.owners(channel)[0])
            other = await client_for(node)
            body = b"x" * 8192
            sends = (
                other.send(channel, p.message_id(4, i), 4, body) for i in range(100)
            )
            await asyncio.gather(*sends)
            # ~8 MiB of replies: reading pauses, memory stays bounded, all arrive
            reader, writer, conn = await unread_fetches(node, channel, 10)
            await wait_for(lambda: not conn.transport.is_reading(), 10, "pause")
            assert conn.transport.get_write_buffer_size() < 16 << 20
            assert await other.send(channel, p.message_id(4, 100), 4, b"y") == 101
            decoder, seen = wire.FrameDecoder(), 0
            while seen < 11:  # WELCOME and 10 MESSAGES
                data = await asyncio.wait_for(reader.read(1 << 20), 10)
                assert data
                seen += len(decoder.feed(data))
            writer.close()
            # ~80 MiB of replies: the node drops the connection instead
            reader, writer, conn = await unread_fetches(node, channel, 100)
            await wait_for(lambda: node.counters["slow_readers_closed"] == 1, 10, "cut")
            assert conn.closed
            assert conn not in node.conns
            assert await other.send(channel, p.message_id(4, 101), 4, b"z") == 102
            writer.close()
            await other.close()

    run(scenario())


def test_a_stalled_event_loop_does_not_lapse_the_in_process_lease(tmp_path, run):
    """The nodes share a manual clock: a stall of the one event loop that is
    longer than the lease (a busy 2-core machine) changes no verdict."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path) as cluster:
            channel = key_of("stall")
            owner = cluster.node(cluster.owners(channel)[0])
            client = await client_for(owner)
            assert await client.send(channel, p.message_id(6, 0), 6, b"x") == 1
            time.sleep(2 * owner.lease)  # blocks every node and their timers
            seqs = [
                await client.send(channel, p.message_id(6, i), 6, b"x")
                for i in range(1, 6)
            ]
            assert seqs == [2, 3, 4, 5, 6]
            assert all(n.counters["lease_lapses"] == 0 for n in cluster.nodes)
            # the time the test lets pass does lapse an idle owner's lease
            for node in cluster.nodes:
                for task in node._tasks:
                    if task.get_name() == f"{node.id}-lease":
                        task.cancel()
            cluster.advance(2 * owner.lease)
            with pytest.raises(RemoteError, match="lease lapsed"):
                await client.send(channel, p.message_id(6, 9), 6, b"x")
            await client.close()

    run(scenario())


def test_manual_clock_moves_only_forward_and_only_when_told():
    clock = ManualClock(5.0)
    assert clock.now() == clock.now() == 5.0
    clock.advance(0.25)
    assert clock.now() == 5.25
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)
