"""An attacker's eye on input validation (issue 12): out-of-range numbers and
poisoned gossip, sent over raw sockets to in-process nodes.

Each test plays a connection that speaks the protocol correctly but sends
values no honest node sends: u64 fields at or above 2**63 (SQLite stores
signed 64-bit integers) and member entries that are not members (an infinite
weight, port 99999, a host that is not one, hundreds of fakes).  The node
must answer ERROR ``MALFORMED`` (or drop the entry), store nothing, and keep
serving everyone else.

Authentication is not what these tests are about: the attacker says HELLO
the way the node asks for (:func:`open_as`, the one place that builds a
connection's first frames), as a client or as a peer of the cluster.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from plexichat import wire
from plexichat.load.client import NodeClient
from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p
from plexichat.node.server import Node
from plexichat.node.testing import InProcessCluster, wait_for
from plexichat.node.transport import RemoteError
from plexichat.routing import Ring, key_of

T = wire.MessageType
BIG = 2**63  # the first value outside the ranges of seq, term, commit, ts_us
SENDER = 7


class Raw:
    """A raw framed connection: write any frame, read the next one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.decoder = wire.FrameDecoder()
        self.frames: list[wire.Frame] = []
        self.next_id = 1

    async def read(self, timeout: float = 5.0) -> wire.Frame:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            assert data, "the node closed the connection"
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def call(self, type: int, payload: bytes) -> wire.Frame:
        """Send one request; its reply (ERROR included)."""
        rid = self.next_id
        self.next_id += 1
        self.writer.write(wire.encode_frame(type, rid, payload))
        frame = await self.read()
        assert frame.request_id == rid, frame
        return frame

    def close(self) -> None:
        self.writer.close()


async def open_as(node: Node, role: str) -> Raw:
    """A raw connection to *node* that said HELLO as *role* ("client" or
    "peer"): the only place that builds a connection's first frames.

    A node with credentials gets what it asks for: a client token, or the
    peer handshake (HELLO with a nonce, then HELLO with the proof).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", node.listen_port)
    raw = Raw(reader, writer)
    creds = getattr(node, "credentials", None)
    hello: dict[str, Any] = {"version": p.PROTOCOL_VERSION, "role": role}
    if role == "peer":
        hello["node_id"] = "intruder"
        if creds is not None:
            from plexichat.node.peers import peer_handshake

            await peer_handshake(creds, "intruder")(raw.call)
            return raw
    elif creds is not None:
        hello["token"] = creds.token(SENDER)
    welcome = await raw.call(T.HELLO, p.encode_json(hello))
    assert welcome.type == T.WELCOME, welcome
    return raw


async def client_of(node: Node) -> NodeClient:
    """An honest client of *node* (with a token when the node wants one)."""
    creds = getattr(node, "credentials", None)
    if creds is None:
        client = NodeClient("127.0.0.1", node.listen_port, timeout=5.0)
    else:
        token = creds.token(SENDER)
        client = NodeClient("127.0.0.1", node.listen_port, timeout=5.0, token=token)
    await client.connect()
    return client


def error_code(frame: wire.Frame) -> int | None:
    """The code of an ERROR frame, None for any other frame."""
    if frame.type != T.ERROR:
        return None
    return p.decode_error(frame.payload)[0]


MALFORMED = p.ErrorCode.MALFORMED


# -- decode ranges ---------------------------------------------------------------


def test_fetch_after_2_63_is_malformed(tmp_path, run):
    """Issue 12: FETCH ``after`` >= 2**63 reached SQLite (INTERNAL)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=1, replicas=1) as cluster:
            node = cluster.nodes[0]
            channel = key_of("ranges")
            honest = await client_of(node)
            await honest.send(channel, p.message_id(SENDER, 1), SENDER, b"m1")
            raw = await open_as(node, "client")
            for after in (BIG, 2**64 - 1):
                frame = await raw.call(T.FETCH, p.FETCH_BODY.pack(channel, after, 10))
                assert error_code(frame) == MALFORMED, (after, frame)
            # the connection is still served, and the highest valid value works
            frame = await raw.call(T.FETCH, p.encode_fetch(channel, BIG - 1, 10))
            assert frame.type == T.MESSAGES
            assert p.decode_messages(frame.payload) == (channel, [], False)
            raw.close()
            page, more = await honest.fetch(channel, 0, 10)
            assert [r.payload for r in page] == [b"m1"]
            assert not more
            await honest.close()

    run(scenario())


def _section_head(
    channel: int, term: int, prev_term: int, prev_seq: int, commit: int, count: int
) -> bytes:
    return pp.APPEND_HEAD.pack(channel, term, prev_term, prev_seq, commit, count)


def _log_record(term: int, seq: int, ts_us: int, payload: bytes = b"forged") -> bytes:
    mid = p.message_id(666, seq)
    return pp.LOG_RECORD.pack(term, seq, mid, 666, ts_us, len(payload)) + payload


def test_replicate_and_handoff_values_at_2_63_are_malformed_and_nothing_is_stored(
    tmp_path,
    run,
):
    """Issue 12: a REPLICATE with a seq (or a term) >= 2**63 raised
    OverflowError in the storage writer, and the channel never committed
    again.  Every such body is MALFORMED now, and the channel goes on."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2, replicas=2) as cluster:
            channel = key_of("forged")
            owner = cluster.node(cluster.owners(channel)[0])
            honest = await client_of(owner)
            assert (
                await honest.send(channel, p.message_id(SENDER, 1), SENDER, b"a") == 1
            )
            errors_before = {n.id: n.storage.stats.errors for n in cluster.nodes}
            one = p.COUNT.pack(1)
            bodies = {
                "term": one + _section_head(channel, BIG, 0, 0, 0, 0),
                "commit": one + _section_head(channel, 1, 0, 0, BIG, 0),
                "prev_seq": one + _section_head(channel, 1, 1, BIG, 0, 0),
                "seq": one
                + _section_head(channel, 9, 1, BIG - 1, 0, 1)
                + _log_record(9, BIG, 1),
                "ts_us": one
                + _section_head(channel, 9, 0, 0, 0, 1)
                + _log_record(9, 1, BIG),
            }
            handoffs = {
                "prepare term": p.encode_json(
                    {"channel": channel, "term": BIG, "epochs": [], "last": 0}
                ),
                "accept term": p.encode_json(
                    {"channel": channel, "term": BIG, "members": ["intruder"]}
                ),
            }
            kinds = {
                "prepare term": p.HandoffKind.PREPARE,
                "accept term": p.HandoffKind.ACCEPT,
            }
            got: dict[str, Any] = {}
            for node in cluster.nodes:
                raw = await open_as(node, "peer")
                for name, body in bodies.items():
                    got[f"{node.id} {name}"] = error_code(
                        await raw.call(T.REPLICATE, body)
                    )
                for name, body in handoffs.items():
                    payload = bytes([kinds[name]]) + body
                    got[f"{node.id} {name}"] = error_code(
                        await raw.call(T.HANDOFF, payload)
                    )
                log_req = pp.LOG_REQUEST.pack(p.HandoffKind.LOG, channel, BIG, 10)
                got[f"{node.id} log after"] = error_code(
                    await raw.call(T.HANDOFF, log_req)
                )
                raw.close()
            # the channel still takes writes, in order, on both nodes
            seqs = [
                await asyncio.wait_for(
                    honest.send(channel, p.message_id(SENDER, i), SENDER, b"b"), 10
                )
                for i in (2, 3)
            ]
            assert got == dict.fromkeys(got, MALFORMED)
            assert seqs == [2, 3]
            for node in cluster.nodes:
                meta = node.order.metas[channel]
                assert meta.promised < BIG
                assert node.storage.stats.errors == errors_before[node.id]
                stored = await node.storage.fetch(channel, 0, 100)
                assert [r.seq for r in stored] == [1, 2, 3]
                assert all(r.sender == SENDER for r in stored)
            await honest.close()

    run(scenario())


# -- gossip ------------------------------------------------------------------------


def _join(member: str) -> bytes:
    """A GOSSIP join body whose member entry is the raw JSON text *member*
    (JSON numbers such as ``Infinity`` cannot be written by json.dumps)."""
    return b'{"kind": "join", "member": ' + member.encode() + b"}"


def test_a_gossiped_infinite_weight_or_a_bad_address_is_dropped(tmp_path, run):
    """Issue 12: ``weight: Infinity`` was stored and re-gossiped, after which
    every ring rebuild raised; a member at port 99999 or at a host that is
    not one wedged the peer connect queue.  They are dropped now; the node
    answers the join, the valid member of the same message is kept (and
    forgotten later), and writes go on."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2, replicas=2) as cluster:
            node = cluster.nodes[0]
            raw = await open_as(node, "peer")
            bad = [
                '["inf", "127.0.0.1", 7001, 1, "alive", Infinity]',
                '["nan", "127.0.0.1", 7001, 1, "alive", NaN]',
                '["huge", "127.0.0.1", 7001, 1, "alive", 1e300]',
                '["port", "127.0.0.1", 99999, 1, "alive", 1.0]',
                '["host", "not a host", 7001, 1, "alive", 1.0]',
                '["long", "' + "a" * 300 + '", 7001, 1, "alive", 1.0]',
                '["' + "x" * 200 + '", "127.0.0.1", 7001, 1, "alive", 1.0]',
            ]
            for member in bad:
                frame = await raw.call(T.GOSSIP, _join(member))
                assert frame.type == T.GOSSIP, (member, frame)
                members = p.decode_json(frame.payload)["members"]
                assert sorted(m[0] for m in members) == ["n0", "n1"]
            # a sync: the valid entry beside the invalid ones applies
            sync = (
                b'{"kind": "sync", "members": [["port", "127.0.0.1", 0, 1, "alive", 1],'
                b' ["ghost", "127.0.0.1", 9, 1, "dead", 1.0],'
                b' ["inf", "127.0.0.1", 7001, 1, "suspect", -Infinity]]}'
            )
            frame = await raw.call(T.GOSSIP, sync)
            assert frame.type == T.GOSSIP
            # and a probe's piggyback is checked the same way
            ping = (
                b'{"from": "inf", "updates": '
                b'[["inf", "::1", 7001, 1, "alive", Infinity]]}'
            )
            frame = await raw.call(T.PING, ping)
            assert frame.type == T.PONG
            # a body that is not a JSON object is still MALFORMED
            assert error_code(await raw.call(T.GOSSIP, b"[1, 2]")) == MALFORMED
            assert error_code(await raw.call(T.GOSSIP, b'{"kind": "join"')) == MALFORMED
            raw.close()
            assert sorted(node.membership.members) == ["ghost", "n0", "n1"]
            assert node.membership.counters["invalid_updates"] == len(bad) + 3
            Ring(node.membership.live())  # builds
            honest = await client_of(node)
            for i, name in enumerate(("a", "b", "c", "d")):
                seq = await asyncio.wait_for(
                    honest.send(key_of(name), p.message_id(SENDER, i), SENDER, b"x"), 10
                )
                assert seq == 1
            await honest.close()
            # the dead member is forgotten once forget_after has passed
            cluster.advance(node.membership.config.forget_after)
            await wait_for(lambda: "ghost" not in node.membership.members, 10, "gc")

    run(scenario())


def test_fake_members_are_capped_and_forgotten_once_dead(tmp_path, run):
    """Issue 12: fake members joined without limit and stayed forever (the
    dead ones still count as voters: a single node lost its majority).  With
    the defaults: at most 256 members, forgotten 60 s after they died."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=1, replicas=1) as cluster:
            node = cluster.nodes[0]
            raw = await open_as(node, "peer")
            fakes = [[f"fake{i}", "127.0.0.1", 9, 1, "dead", 1.0] for i in range(300)]
            frame = await raw.call(
                T.GOSSIP, p.encode_json({"kind": "sync", "members": fakes})
            )
            assert frame.type == T.GOSSIP
            for i in range(300, 310):
                fake = [f"fake{i}", "127.0.0.1", 9, 1, "alive", 1.0]
                body = {"kind": "join", "member": fake}
                assert (await raw.call(T.GOSSIP, p.encode_json(body))).type == T.GOSSIP
            raw.close()
            members = node.membership.members
            assert len(members) == 256
            assert node.membership.counters["members_capped"] == 310 - 255
            # 255 dead fakes: this node is no majority and refuses writes...
            assert not node.membership.has_quorum()
            honest = await client_of(node)
            channel = key_of("after the fakes")
            with pytest.raises(RemoteError) as info:
                await honest.send(channel, p.message_id(SENDER, 1), SENDER, b"x")
            assert info.value.code == p.ErrorCode.UNAVAILABLE
            # ...until they are forgotten, 60 s (the default) after they died
            cluster.advance(59.0)
            await asyncio.sleep(0.2)  # a few probe rounds
            assert len(members) == 256
            cluster.advance(1.0)
            await wait_for(lambda: len(members) == 1, 10, "fakes forgotten")
            assert node.membership.counters["forgotten"] == 255
            await wait_for(node.membership.has_quorum, 10, "majority")
            seq = await asyncio.wait_for(
                honest.send(channel, p.message_id(SENDER, 2), SENDER, b"y"), 10
            )
            assert seq == 1
            await honest.close()

    run(scenario())
