"""Unit tests of a node's peer links (:mod:`plexichat.node.peers`) against
real framed servers on 127.0.0.1 port 0, with a manual clock for the
*answered* bookkeeping the lease reads."""

from __future__ import annotations

import asyncio
import math
import socket
from typing import Any

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node.membership import ManualClock
from plexichat.node.peers import NotSent, PeerLinks
from plexichat.node.transport import ConnectionLost, FrameConnection

T = wire.MessageType
Frame = wire.Frame
LOOPBACK = "127.0.0.1"


def nowhere() -> tuple[str, int]:
    """A loopback address nothing listens on."""
    spare = socket.socket()
    spare.bind((LOOPBACK, 0))
    address = spare.getsockname()
    spare.close()
    return address


class Server:
    """Framed server on 127.0.0.1:0; *reply* (if set) answers each request."""

    def __init__(self, reply: Any = None) -> None:
        self.reply = reply
        self.frames: asyncio.Queue[tuple[FrameConnection, Frame]] = asyncio.Queue()
        self.conns: list[FrameConnection] = []
        self.server: asyncio.Server | None = None
        self.address = (LOOPBACK, 0)

    def _make(self) -> FrameConnection:
        conn = FrameConnection(self._on_frames, server_side=True)
        self.conns.append(conn)
        return conn

    def _on_frames(self, conn: FrameConnection, frames: list[Frame]) -> None:
        for frame in frames:
            if self.reply is not None and frame.type != T.HELLO and frame.request_id:
                self.reply(conn, frame)
            self.frames.put_nowait((conn, frame))

    async def __aenter__(self) -> Server:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._make, LOOPBACK, 0)
        self.address = self.server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            conn.abort()
        await self.server.wait_closed()

    async def next(self) -> Frame:
        return (await asyncio.wait_for(self.frames.get(), 5))[1]


def echo(conn: FrameConnection, frame: Frame) -> None:
    conn.send(T.PONG, frame.request_id, frame.payload)


class Harness:
    def __init__(self, members: dict[str, tuple[str, int]] | None = None) -> None:
        self.clock = ManualClock(100.0)
        self.members = dict(members or {})
        self.stopping = False
        self.tasks: list[asyncio.Task[Any]] = []
        self.peers = PeerLinks(
            "me",
            clock=self.clock,
            resolve=self.members.get,
            spawn=self.spawn,
            stopping=lambda: self.stopping,
            connect_timeout=2.0,
        )

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.append(task)
        return task

    async def settle(self) -> None:
        await asyncio.gather(*self.tasks)

    def request(
        self, node_id: str, type: int, payload: bytes
    ) -> asyncio.Future[tuple[Frame | None, BaseException | None]]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(frame: Frame | None, error: BaseException | None) -> None:
            if not future.done():
                future.set_result((frame, error))

        self.peers.request(node_id, type, payload, done)
        return future


# -- links ---------------------------------------------------------------------------


def test_a_link_is_reused_and_says_hello_as_a_peer(run):
    async def scenario() -> None:
        async with Server(reply=echo) as server:
            h = Harness()
            link = h.peers.link(server.address)
            assert h.peers.link(server.address) is link
            assert h.peers.links == {server.address: link}
            await link.call(T.PING, b"x", timeout=5)
            hello = await server.next()
            assert hello.type == T.HELLO
            assert p.decode_json(hello.payload) == {
                "version": p.PROTOCOL_VERSION,
                "role": "peer",
                "node_id": "me",
            }
            link.close()
            again = h.peers.link(server.address)
            assert again is not link
            assert not again.closed
            h.peers.close()
            assert again.closed

    run(scenario())


def test_links_bind_the_source_address(run):
    async def scenario() -> None:
        async with Server(reply=echo) as server:
            h = Harness()
            h.peers.source_address = LOOPBACK
            link = h.peers.link(server.address)
            assert link.local_addr == (LOOPBACK, 0)
            await link.call(T.PING, b"x", timeout=5)
            h.peers.close()

    run(scenario())


# -- answered (the lease) ------------------------------------------------------------


def test_answers_keep_the_latest_send_time():
    h = Harness()
    a, b, c = ("h", 1), ("h", 2), ("h", 3)
    assert h.peers.last_answer(a) == -math.inf
    h.peers.note_answer(a, 10.0)
    h.peers.note_answer(a, 5.0)  # an older request answered late
    assert h.peers.last_answer(a) == 10.0
    h.peers.note_answer(b, 7.0)
    h.peers.note_answer(c, 3.0)
    assert h.peers.answered_since(7.0, 2)
    assert not h.peers.answered_since(7.0, 3)
    assert h.peers.answered_since(3.0, 3)
    assert not h.peers.answered_since(11.0, 1)
    assert h.peers.answered_since(0.0, 0)


# -- requests by member id -----------------------------------------------------------


def test_an_unknown_member_fails_at_once_with_not_sent(run):
    async def scenario() -> None:
        h = Harness()
        frame, error = await h.request("ghost", T.SEND, b"x")
        assert frame is None
        assert isinstance(error, NotSent)
        assert "unknown member ghost" in str(error)
        assert h.peers.links == {}
        assert h.tasks == []

    run(scenario())


def test_requests_behind_a_connect_go_out_in_order_and_count_from_their_send(run):
    async def scenario() -> None:
        async with Server(reply=echo) as server:
            h = Harness({"n1": server.address})
            first = h.request("n1", T.SEND, b"1")
            h.clock.advance(1.0)
            second = h.request("n1", T.SEND, b"2")
            assert [t.get_name() for t in h.tasks] == ["connect-n1"]
            h.clock.advance(5.0)  # replies arrive later on the clock
            replies = [await first, await second]
            assert [f.payload for f, _ in replies if f is not None] == [b"1", b"2"]
            assert [e for _, e in replies] == [None, None]
            assert h.peers.answered == {server.address: 101.0}
            got = [await server.next() for _ in range(3)]
            assert [f.type for f in got] == [T.HELLO, T.SEND, T.SEND]
            assert [f.payload for f in got[1:]] == [b"1", b"2"]
            # connected now: the next request needs no task
            third = h.request("n1", T.SEND, b"3")
            assert len(h.tasks) == 1
            assert (await third)[0] is not None
            await h.settle()
            h.peers.close()

    run(scenario())


def test_an_error_reply_is_an_answer_and_silence_is_not(run):
    async def scenario() -> None:
        def refuse(conn: FrameConnection, frame: Frame) -> None:
            conn.send_error(frame.request_id, p.ErrorCode.NOT_OWNER, "no")

        async with Server(reply=refuse) as server:
            h = Harness({"n1": server.address})
            frame, error = await h.request("n1", T.SEND, b"x")
            assert frame is not None
            assert frame.type == T.ERROR
            assert error is None
            assert h.peers.last_answer(server.address) == 100.0
            h.peers.close()
        async with Server() as mute:
            h = Harness({"n2": mute.address})
            pending = h.request("n2", T.SEND, b"x")
            await mute.next()
            await mute.next()
            h.peers.close()  # fails the pending request
            frame, error = await pending
            assert frame is None
            assert isinstance(error, ConnectionLost)
            assert h.peers.answered == {}

    run(scenario())


def test_a_failed_connect_fails_every_queued_request_with_not_sent(run):
    async def scenario() -> None:
        h = Harness({"n1": nowhere()})
        futures = [h.request("n1", T.SEND, bytes([i])) for i in range(3)]
        results = [await f for f in futures]
        assert all(f is None for f, _ in results)
        assert all(isinstance(e, NotSent) for _, e in results)
        assert all("connect to n1" in str(e) for _, e in results)
        assert h.peers.answered == {}
        await h.settle()

    run(scenario())


# -- gossip transport ----------------------------------------------------------------


def test_gossip_call_returns_the_reply_and_notes_the_answer(run):
    async def scenario() -> None:
        def pong(conn: FrameConnection, frame: Frame) -> None:
            body = p.decode_json(frame.payload)
            conn.send(T.PONG, frame.request_id, p.encode_json({"got": body}))

        async with Server(reply=pong) as server:
            h = Harness()
            host, port = server.address
            reply = await h.peers.gossip_call(host, port, T.PING, {"kind": "x"}, 5)
            assert reply == {"got": {"kind": "x"}}
            assert h.peers.answered == {server.address: 100.0}
            h.peers.close()

    run(scenario())


def test_gossip_call_is_none_on_failure_and_while_stopping_but_for_leave(run):
    async def scenario() -> None:
        h = Harness()
        host, port = nowhere()
        assert await h.peers.gossip_call(host, port, T.PING, {}, 1) is None
        assert h.peers.answered == {}
        async with Server(reply=echo) as server:
            host, port = server.address
            h.stopping = True
            assert await h.peers.gossip_call(host, port, T.GOSSIP, {}, 5) is None
            assert server.address not in h.peers.links
            body = {"kind": "leave"}
            assert await h.peers.gossip_call(host, port, T.GOSSIP, body, 5) == body
            h.peers.close()

    run(scenario())


# -- one-way frames ------------------------------------------------------------------


def test_post_connects_first_when_needed_then_sends_directly(run):
    async def scenario() -> None:
        async with Server() as server:
            h = Harness()
            h.peers.post(server.address, T.RELAY, b"a", "relay")
            assert [t.get_name() for t in h.tasks] == ["relay"]
            await h.settle()
            h.peers.post(server.address, T.RELAY, b"b", "relay")
            assert len(h.tasks) == 1
            got = [await server.next() for _ in range(3)]
            assert [(f.type, f.request_id, f.payload) for f in got[1:]] == [
                (T.RELAY, 0, b"a"),
                (T.RELAY, 0, b"b"),
            ]
            h.peers.close()

    run(scenario())


def test_post_to_an_unreachable_peer_is_dropped_quietly(run):
    async def scenario() -> None:
        h = Harness()
        h.peers.post(nowhere(), T.RELAY, b"a", "relay")
        await h.settle()  # no exception escapes the task

    run(scenario())


def test_close_without_links_is_harmless():
    h = Harness()
    h.peers.close()
    assert h.peers.links == {}


# -- bad addresses (issue 12: gossip can name any host and port) -----------------

BAD_ADDRESSES = [
    ("127.0.0.1", 99999),  # OverflowError from connect()
    ("127.0.0.1", -1),
    ("a" * 300, 7000),  # UnicodeError from the idna codec
    ("a\x00b", 7000),  # ValueError: embedded null character
]


def test_a_connect_to_a_bad_address_fails_its_requests_and_keeps_the_queue(run):
    """Any exception from connecting (not only OSError and timeouts) fails the
    queued requests with NotSent; later requests to that member are not stuck
    behind a connect that never ends, and other members keep working."""

    async def scenario() -> None:
        async with Server(reply=echo) as server:
            members = {f"bad{i}": a for i, a in enumerate(BAD_ADDRESSES)}
            h = Harness({**members, "good": server.address})
            for node_id in members:
                for attempt in range(2):
                    futures = [h.request(node_id, T.PING, bytes([i])) for i in range(2)]
                    results = await asyncio.wait_for(asyncio.gather(*futures), 5)
                    for frame, error in results:
                        assert frame is None, (node_id, attempt)
                        assert isinstance(error, NotSent), (node_id, error)
                        assert f"connect to {node_id}" in str(error)
                assert h.peers._connect_queue == {}
            frame, error = await asyncio.wait_for(h.request("good", T.PING, b"x"), 5)
            assert error is None
            assert frame is not None
            assert frame.payload == b"x"
            await asyncio.wait_for(h.settle(), 5)  # no task ended with an error
            h.peers.close()

    run(scenario())


def test_gossip_call_and_post_to_a_bad_address_fail_quietly(run):
    async def scenario() -> None:
        h = Harness()
        for host, port in BAD_ADDRESSES:
            reply = await asyncio.wait_for(
                h.peers.gossip_call(host, port, T.PING, {"from": "me"}, 1), 5
            )
            assert reply is None
            h.peers.post((host, port), T.RELAY, b"a", "relay")
        await asyncio.wait_for(h.settle(), 5)  # no exception escapes the tasks
        h.peers.close()

    run(scenario())
