"""Unit tests of the framed transport against real asyncio sockets on 127.0.0.1.

Each test runs a :class:`Server` of :class:`FrameConnection` on port 0 whose
replies the test scripts frame by frame (nothing answers unless told to), and
talks to it through a :class:`Link` or a raw stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node import transport
from plexichat.node.transport import (
    MASK32,
    ConnectionLost,
    FrameConnection,
    Link,
    RemoteError,
)

T = wire.MessageType
Frame = wire.Frame
LOOPBACK = "127.0.0.1"


def _corrupt_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


class Server:
    """Framed server on 127.0.0.1:0; the test reads requests and replies itself."""

    def __init__(self, *, max_payload: int = wire.MAX_PAYLOAD, echo: bool = False):
        self.max_payload = max_payload
        self.echo = echo
        self.conns: list[FrameConnection] = []
        self.frames: asyncio.Queue[tuple[FrameConnection, Frame]] = asyncio.Queue()
        self.closed: asyncio.Queue[FrameConnection] = asyncio.Queue()
        self.wire_errors: list[wire.WireError] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    def _make(self) -> FrameConnection:
        conn = FrameConnection(
            self._on_frames,
            max_payload=self.max_payload,
            on_wire_error=lambda c, exc: self.wire_errors.append(exc),
            on_close=lambda c, exc: self.closed.put_nowait(c),
            server_side=True,
        )
        self.conns.append(conn)
        return conn

    def _on_frames(self, conn: FrameConnection, frames: list[Frame]) -> None:
        for frame in frames:
            if self.echo and frame.type != T.HELLO:
                conn.send(T.PONG, frame.request_id, frame.payload)
            self.frames.put_nowait((conn, frame))

    async def __aenter__(self) -> Server:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._make, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            conn.abort()
        await self.server.wait_closed()

    async def next(self) -> tuple[FrameConnection, Frame]:
        return await asyncio.wait_for(self.frames.get(), 5)

    def link(self, **kwargs: Any) -> Link:
        return Link(LOOPBACK, self.port, **kwargs)


# -- request and reply ------------------------------------------------------------


def test_call_returns_the_reply_carrying_its_request_id(run):
    async def scenario() -> None:
        async with Server(echo=True) as server:
            link = server.link()
            assert not link.connected
            assert link.address == f"{LOOPBACK}:{server.port}"
            first = await link.call(T.PING, b"one", timeout=5)
            second = await link.call(T.SEND, b"two", timeout=5)
            assert first == Frame(T.PONG, 1, b"one")
            assert second == Frame(T.PONG, 2, b"two")
            assert link.pending == {}
            assert link.connected
            got = [(await server.next())[1] for _ in range(2)]
            assert got == [Frame(T.PING, 1, b"one"), Frame(T.SEND, 2, b"two")]
            assert len(server.conns) == 1
            await link.aclose()

    run(scenario())


def test_replies_out_of_order_reach_their_own_callers(run):
    async def scenario() -> None:
        async with Server() as server:
            link = server.link()
            await link.connect()
            calls = [
                asyncio.ensure_future(link.call(T.FETCH, f"q{i}".encode(), timeout=5))
                for i in range(4)
            ]
            held = [await server.next() for _ in range(4)]
            assert [f.request_id for _, f in held] == [1, 2, 3, 4]
            assert sorted(link.pending) == [1, 2, 3, 4]
            # answer 3, 1, 4, 2: each reply names its request by id only
            for index in (2, 0, 3, 1):
                conn, frame = held[index]
                conn.send(T.MESSAGES, frame.request_id, b"a" + frame.payload)
            replies = await asyncio.gather(*calls)
            assert replies == [
                Frame(T.MESSAGES, rid, f"aq{rid - 1}".encode()) for rid in (1, 2, 3, 4)
            ]
            assert link.pending == {}
            link.close()

    run(scenario())


def test_request_callback_api_and_cancel(run):
    async def scenario() -> None:
        async with Server() as server:
            pushes: asyncio.Queue[Frame] = asyncio.Queue()
            link = server.link(on_push=pushes.put_nowait)
            await link.connect()
            loop = asyncio.get_running_loop()
            answered: asyncio.Future[tuple[Any, Any]] = loop.create_future()
            rid = link.request(
                T.STATS, b"s", lambda frame, exc: answered.set_result((frame, exc))
            )
            other = link.request(T.STATS, b"t", lambda frame, exc: None)
            assert (rid, other) == (1, 2)
            link.cancel(other)
            link.cancel(12345)  # unknown ids are fine
            assert list(link.pending) == [1]
            (c1, f1), (c2, f2) = await server.next(), await server.next()
            c2.send(T.STATS_REPLY, f2.request_id, b"cancelled")
            c1.send(T.STATS_REPLY, f1.request_id, b"answered")
            assert await answered == (Frame(T.STATS_REPLY, 1, b"answered"), None)
            # the reply to the cancelled request matched nothing: a push
            assert pushes.get_nowait() == Frame(T.STATS_REPLY, 2, b"cancelled")
            assert pushes.empty()
            link.close()

    run(scenario())


def test_pushes_and_posts_use_request_id_zero(run):
    async def scenario() -> None:
        async with Server() as server:
            pushes: asyncio.Queue[Frame] = asyncio.Queue()
            link = server.link(on_push=pushes.put_nowait)
            await link.connect()
            link.post(T.RELAY, b"fire and forget")
            conn, frame = await server.next()
            assert frame == Frame(T.RELAY, 0, b"fire and forget")
            assert link.pending == {}
            conn.send(T.DELIVER, 0, b"d1")
            conn.send(T.DELIVER, 77, b"d2")
            got = [await asyncio.wait_for(pushes.get(), 5) for _ in range(2)]
            assert got == [Frame(T.DELIVER, 0, b"d1"), Frame(T.DELIVER, 77, b"d2")]
            link.close()

    run(scenario())


def test_frames_matching_nothing_are_dropped_without_on_push(run):
    async def scenario() -> None:
        async with Server() as server:
            link = server.link()
            await link.connect()
            link.post(T.PING, b"")
            conn, _ = await server.next()
            conn.send(T.DELIVER, 0, b"nobody listens")
            conn.send(T.DELIVER, 9, b"nor here")
            # a call sent after the pushes is answered after them, on one stream
            reply_task = asyncio.ensure_future(link.call(T.PING, b"x", timeout=5))
            c, frame = await server.next()
            c.send(T.PONG, frame.request_id, b"y")
            assert await reply_task == Frame(T.PONG, frame.request_id, b"y")
            link.close()

    run(scenario())


def test_hello_is_the_first_frame_on_every_connection(run):
    async def scenario() -> None:
        async with Server(echo=True) as server:
            link = server.link(hello=b'{"role":"peer"}')
            await link.connect()
            conn, frame = await server.next()
            assert frame == Frame(T.HELLO, 0, b'{"role":"peer"}')
            assert await link.call(T.PING, b"p", timeout=5) == Frame(T.PONG, 1, b"p")
            assert (await server.next())[1] == Frame(T.PING, 1, b"p")
            # after a reconnect the new connection greets first, too
            conn.close()
            assert await asyncio.wait_for(server.closed.get(), 5) is conn
            await asyncio.wait_for(_until_disconnected(link), 5)
            assert await link.call(T.PING, b"q", timeout=5) == Frame(T.PONG, 2, b"q")
            conn2, hello = await server.next()
            assert conn2 is not conn
            assert hello == Frame(T.HELLO, 0, b'{"role":"peer"}')
            assert (await server.next())[1] == Frame(T.PING, 2, b"q")
            link.close()

    run(scenario())


def test_without_hello_the_first_frame_is_the_request(run):
    async def scenario() -> None:
        async with Server(echo=True) as server:
            link = server.link()
            await link.call(T.PING, b"p", timeout=5)
            assert (await server.next())[1] == Frame(T.PING, 1, b"p")
            link.close()

    run(scenario())


def test_request_ids_wrap_around_32_bits_and_skip_zero():
    link = Link(LOOPBACK, 1)
    assert [link.next_id() for _ in range(3)] == [1, 2, 3]
    link._next_id = MASK32 - 1
    assert [link.next_id() for _ in range(3)] == [MASK32 - 1, MASK32, 1]


# -- errors ----------------------------------------------------------------------


def test_error_reply_raises_remote_error_with_code_and_message(run):
    async def scenario() -> None:
        async with Server() as server:
            link = server.link()
            call = asyncio.ensure_future(link.call(T.SEND, b"m", timeout=5))
            conn, frame = await server.next()
            conn.send_error(frame.request_id, p.ErrorCode.NOT_OWNER, "ask n2 instead")
            with pytest.raises(RemoteError) as caught:
                await call
            assert caught.value.code == p.ErrorCode.NOT_OWNER == 7
            assert caught.value.message == "ask n2 instead"
            assert str(caught.value) == "NOT_OWNER: ask n2 instead"
            assert link.pending == {}
            # the link is still usable after an ERROR reply
            call = asyncio.ensure_future(link.call(T.SEND, b"m2", timeout=5))
            conn, frame = await server.next()
            conn.send_error(frame.request_id, 250, "új")
            with pytest.raises(RemoteError) as caught:
                await call
            assert (caught.value.code, caught.value.message) == (250, "új")
            assert str(caught.value) == "250: új"
            link.close()

    run(scenario())


def test_remote_error_names_known_codes():
    err = RemoteError(int(p.ErrorCode.TOO_LARGE), "big")
    assert (err.code, err.message, str(err)) == (4, "big", "TOO_LARGE: big")
    assert str(RemoteError(0, "")) == "0: "
    assert issubclass(ConnectionLost, ConnectionError)


def test_call_timeout_raises_and_the_late_reply_is_ignored(run):
    async def scenario() -> None:
        async with Server() as server:
            link = server.link()
            await link.connect()
            with pytest.raises(TimeoutError):
                await link.call(T.FETCH, b"slow", timeout=0.2)
            assert link.pending == {}
            slow_conn, slow = await server.next()
            assert slow == Frame(T.FETCH, 1, b"slow")
            call = asyncio.ensure_future(link.call(T.FETCH, b"fast", timeout=5))
            conn, fast = await server.next()
            assert fast == Frame(T.FETCH, 2, b"fast")
            # the late reply arrives first on the stream, then the real one
            slow_conn.send(T.MESSAGES, slow.request_id, b"late")
            conn.send(T.MESSAGES, fast.request_id, b"on time")
            assert await call == Frame(T.MESSAGES, 2, b"on time")
            assert link.connected
            link.close()

    run(scenario())


def test_late_reply_goes_to_on_push_when_there_is_one(run):
    async def scenario() -> None:
        async with Server() as server:
            pushes: asyncio.Queue[Frame] = asyncio.Queue()
            link = server.link(on_push=pushes.put_nowait)
            await link.connect()
            with pytest.raises(TimeoutError):
                await link.call(T.FETCH, b"slow", timeout=0.2)
            conn, slow = await server.next()
            conn.send(T.MESSAGES, slow.request_id, b"late")
            assert await asyncio.wait_for(pushes.get(), 5) == Frame(
                T.MESSAGES, 1, b"late"
            )
            link.close()

    run(scenario())


def test_peer_closing_fails_pending_calls_and_the_link_reconnects(run):
    async def scenario() -> None:
        async with Server() as server:
            lost: list[Link] = []
            link = server.link(on_close=lost.append)
            calls = [
                asyncio.ensure_future(link.call(T.PING, b"a", timeout=5)),
                asyncio.ensure_future(link.call(T.PING, b"b", timeout=5)),
            ]
            conn, _ = await server.next()
            await server.next()
            assert len(link.pending) == 2
            conn.close()
            for call in calls:
                with pytest.raises(ConnectionLost, match="lost"):
                    await call
            assert link.pending == {}
            assert lost == [link]
            assert not link.connected
            assert link.conn is None
            assert not link.closed
            # not closed by us: the next call opens a new connection
            call = asyncio.ensure_future(link.call(T.PING, b"c", timeout=5))
            conn2, frame = await server.next()
            assert conn2 is not conn
            assert len(server.conns) == 2
            conn2.send(T.PONG, frame.request_id, b"back")
            assert await call == Frame(T.PONG, 3, b"back")
            link.close()

    run(scenario())


def test_closing_the_link_fails_pending_calls_and_refuses_new_ones(run):
    async def scenario() -> None:
        async with Server() as server:
            lost: list[Link] = []
            link = server.link(on_close=lost.append)
            call = asyncio.ensure_future(link.call(T.PING, b"a", timeout=5))
            conn, _ = await server.next()
            link.close()
            with pytest.raises(ConnectionLost, match="closed"):
                await call
            assert link.closed
            assert await asyncio.wait_for(server.closed.get(), 5) is conn
            await asyncio.wait_for(_until_disconnected(link), 5)
            assert lost == [link]
            with pytest.raises(ConnectionLost, match="is closed"):
                await link.connect()
            with pytest.raises(ConnectionLost, match="is closed"):
                await link.call(T.PING, b"b", timeout=5)
            errors: list[BaseException | None] = []
            assert link.request(T.PING, b"c", lambda f, exc: errors.append(exc)) == 0
            assert len(errors) == 1
            assert isinstance(errors[0], ConnectionLost)
            link.post(T.PING, b"dropped")  # not connected: a no-op
            assert link.pending == {}
            await link.aclose()  # closing twice is harmless

    run(scenario())


def test_concurrent_connects_share_one_connection(run):
    async def scenario() -> None:
        async with Server(echo=True) as server:
            link = server.link()
            await asyncio.gather(*(link.connect() for _ in range(5)))
            conn = link.conn
            await link.connect()  # already connected: nothing new
            assert link.conn is conn
            assert await link.call(T.PING, b"x", timeout=5) == Frame(T.PONG, 1, b"x")
            (server_conn, _) = await server.next()
            assert server.conns == [server_conn]
            link.close()

    run(scenario())


def test_loss_of_a_connection_that_is_no_longer_current_is_ignored(run):
    async def scenario() -> None:
        async with Server() as server:
            lost: list[Link] = []
            link = server.link(on_close=lost.append)
            call = asyncio.ensure_future(link.call(T.PING, b"", timeout=5))
            conn, frame = await server.next()
            stale = FrameConnection(lambda c, f: None)
            link._lost(stale, None)
            assert link.connected
            assert list(link.pending) == [1]
            assert lost == []
            conn.send(T.PONG, frame.request_id, b"still here")
            assert await call == Frame(T.PONG, 1, b"still here")
            link.close()

    run(scenario())


def test_cancelled_call_forgets_its_request(run):
    async def scenario() -> None:
        async with Server() as server:
            link = server.link()
            call = asyncio.ensure_future(link.call(T.FETCH, b"q", timeout=5))
            await server.next()
            assert list(link.pending) == [1]
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            try:
                assert link.pending == {}
            finally:
                link.close()

    run(scenario())


def test_connect_to_a_closed_port_fails_and_can_be_retried(run):
    async def scenario() -> None:
        async with Server() as server:
            port = server.port
        link = Link(LOOPBACK, port)
        with pytest.raises(ConnectionRefusedError):
            await link.connect(timeout=5)
        assert not link.connected
        with pytest.raises(ConnectionRefusedError):
            await link.call(T.PING, b"", timeout=5)  # a fresh attempt, same result
        assert link.pending == {}

    run(scenario())


# -- payload limits and bad input -------------------------------------------------


def test_oversize_request_is_rejected_by_the_server(run):
    async def scenario() -> None:
        async with Server(max_payload=64) as server:
            link = server.link()
            assert await _round_trip(server, link, b"x" * 64) == b"x" * 64
            with pytest.raises(ConnectionLost):
                await link.call(T.SEND, b"x" * 65, timeout=5)
            assert [e.reason for e in server.wire_errors] == ["oversized"]
            assert server.conns[0].closed

    run(scenario())


def test_oversize_reply_is_rejected_by_the_link(run):
    async def scenario() -> None:
        async with Server() as server:
            link = server.link(max_payload=16)
            call = asyncio.ensure_future(link.call(T.FETCH, b"", timeout=5))
            conn, frame = await server.next()
            conn.send(T.MESSAGES, frame.request_id, b"y" * 16)
            assert await call == Frame(T.MESSAGES, 1, b"y" * 16)
            call = asyncio.ensure_future(link.call(T.FETCH, b"", timeout=5))
            conn, frame = await server.next()
            conn.send(T.MESSAGES, frame.request_id, b"y" * 17)
            with pytest.raises(ConnectionLost):
                await call
            assert not link.connected
            link.close()

    run(scenario())


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"XX" + bytes(14), "bad-magic"),
        (wire.MAGIC + bytes([9]) + bytes(13), "bad-version"),
        (_corrupt_last_byte(wire.encode_frame(T.PING, 1, b"abc")), "bad-checksum"),
    ],
)
def test_bad_bytes_close_the_connection_and_report_the_wire_error(data, reason, run):
    async def scenario() -> None:
        async with Server() as server:
            reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
            good = wire.encode_frame(T.PING, 5, b"ok")
            writer.write(good)
            conn, frame = await server.next()
            assert frame == Frame(T.PING, 5, b"ok")
            # separately: frames decoded before an error in the same read are
            # dropped with the connection (the peer is cut off either way)
            writer.write(data)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us
            assert [(e.reason, e.offset) for e in server.wire_errors] == [
                (reason, len(good))
            ]
            assert conn.closed
            assert conn.rx_frames == 1
            writer.close()

    run(scenario())


def test_an_unencodable_frame_does_not_poison_the_connection(run):
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
        async with Server(echo=True) as server:
            link = server.link()
            await link.connect()
            conn = link.conn
            assert conn is not None
            try:
                with contextlib.suppress(ValueError, TimeoutError):
                    await link.call(0, b"type 0 does not exist", timeout=0.3)
                try:
                    after = await link.call(T.PING, b"after", timeout=1.0)
                except TimeoutError:
                    after = None
                assert after is not None
                assert (after.type, after.payload) == (T.PONG, b"after")
            finally:
                conn._out.clear()
                conn.abort()

    run(scenario())


def test_close_during_connect_leaves_no_connection(run):
    async def scenario() -> None:
        async with Server() as server:
            loop = asyncio.get_running_loop()
            started, gate = asyncio.Event(), asyncio.Event()
            original = loop.create_connection

            async def gated(*args: Any, **kwargs: Any) -> Any:
                started.set()
                await gate.wait()
                return await original(*args, **kwargs)

            loop.create_connection = gated  # type: ignore[method-assign]
            link = server.link()
            connecting = asyncio.ensure_future(link.connect())
            await started.wait()
            link.close()
            gate.set()
            with contextlib.suppress(ConnectionLost):
                await connecting
            try:
                assert link.closed
                assert not link.connected
            finally:
                if link.conn is not None:
                    link.conn.abort()

    run(scenario())


# -- FrameConnection --------------------------------------------------------------


def test_frames_queued_in_one_loop_turn_go_out_in_one_write(run):
    async def scenario() -> None:
        async with Server() as server:
            link = server.link()
            await link.connect()
            conn = link.conn
            assert conn is not None
            assert conn.transport is not None
            writes: list[bytes] = []
            real_write = conn.transport.write

            def counting(data: bytes) -> None:
                writes.append(data)
                real_write(data)

            conn.transport.write = counting  # type: ignore[method-assign]
            for i in range(3):
                conn.send(T.RELAY, 0, f"r{i}".encode())
            assert writes == []  # nothing until the loop turns
            got = [(await server.next())[1] for _ in range(3)]
            assert got == [Frame(T.RELAY, 0, f"r{i}".encode()) for i in range(3)]
            assert len(writes) == 1
            assert wire.decode_frames(writes[0]) == got
            conn.flush()  # nothing queued: no write
            assert len(writes) == 1
            link.close()

    run(scenario())


def test_close_flushes_queued_frames_and_later_sends_are_dropped(run):
    async def scenario() -> None:
        async with Server() as server:
            link = server.link()
            await link.connect()
            conn = link.conn
            assert conn is not None
            conn.send(T.RELAY, 0, b"one")
            conn.send(T.RELAY, 0, b"two")
            conn.close()
            conn.send(T.RELAY, 0, b"three")
            assert conn.closed
            got = [(await server.next())[1] for _ in range(2)]
            assert got == [Frame(T.RELAY, 0, b"one"), Frame(T.RELAY, 0, b"two")]
            server_conn = await asyncio.wait_for(server.closed.get(), 5)
            assert server_conn.rx_frames == 2
            assert server.frames.empty()
            conn.close()  # twice is harmless

    run(scenario())


def test_abort_drops_the_connection_at_once(run):
    async def scenario() -> None:
        async with Server() as server:
            lost: list[Link] = []
            link = server.link(on_close=lost.append)
            call = asyncio.ensure_future(link.call(T.PING, b"", timeout=5))
            await server.next()
            assert link.conn is not None
            link.conn.abort()
            with pytest.raises(ConnectionLost):
                await call
            assert await asyncio.wait_for(server.closed.get(), 5) is server.conns[0]
            assert lost == [link]

    run(scenario())


def test_connection_bookkeeping(run):
    async def scenario() -> None:
        async with Server(echo=True) as server:
            link = server.link()
            await link.call(T.PING, b"", timeout=5)
            client = link.conn
            server_conn, _ = await server.next()
            assert client is not None
            host, port = client.transport.get_extra_info("sockname")
            assert server_conn.peername == f"{host}:{port}"
            assert client.peername == f"{LOOPBACK}:{server.port}"
            assert (client.rx_frames, server_conn.rx_frames) == (1, 1)
            assert (client.role, client.peer_id, client.data) == ("client", "", {})
            assert (server_conn.server_side, client.server_side) == (True, False)
            assert server_conn.overflowed is False
            link.close()

    run(scenario())


def test_only_the_server_side_stops_reading_when_writes_back_up(run):
    async def scenario() -> None:
        async with Server(echo=True) as server:
            link = server.link()
            await link.call(T.PING, b"", timeout=5)
            server_conn, _ = await server.next()
            client = link.conn
            assert client is not None
            assert server_conn.transport.is_reading()
            server_conn.pause_writing()
            assert not server_conn.transport.is_reading()
            server_conn.resume_writing()
            assert server_conn.transport.is_reading()
            client.pause_writing()
            assert client.transport.is_reading()
            client.resume_writing()
            assert client.transport.is_reading()
            # after close nothing is touched
            server_conn.closed = True
            server_conn.pause_writing()
            assert server_conn.transport.is_reading()
            server_conn.closed = False
            link.close()

    run(scenario())


def test_server_drops_a_peer_whose_replies_pile_up(monkeypatch, run):
    monkeypatch.setattr(transport, "MAX_BUFFERED", 1000)  # the default max_output

    async def scenario() -> None:
        async with Server(echo=True) as server:
            link = server.link()
            assert await link.call(T.PING, b"x", timeout=5) == Frame(T.PONG, 1, b"x")
            # a reply that would leave more than max_output bytes unsent is
            # not queued: the server cuts the peer off instead
            with pytest.raises(ConnectionLost):
                await link.call(T.PING, b"x" * 2000, timeout=5)
            await asyncio.wait_for(_until_disconnected(link), 5)
            server_conn = server.conns[0]
            assert server_conn.overflowed is True
            assert server_conn.closed is True
            assert await asyncio.wait_for(server.closed.get(), 5) is server_conn
            link.close()

    run(scenario())


async def _until_disconnected(link: Link) -> None:
    """Wait (bounded by the caller) for the link to notice its connection closed."""
    while link.connected or link.conn is not None:
        await asyncio.sleep(0.005)


async def _round_trip(server: Server, link: Link, payload: bytes) -> bytes:
    call = asyncio.ensure_future(link.call(T.SEND, payload, timeout=5))
    conn, frame = await server.next()
    conn.send(T.ACK, frame.request_id, frame.payload)
    return (await call).payload


async def _hello_handshake(exchange: Any) -> None:
    await exchange(T.HELLO, b"{}")


def test_a_handshake_fails_at_once_when_the_server_hangs_up(run):
    """A lab relay that refuses a partitioned pair accepts and closes at once:
    the handshake must fail then, not wait out its timeout (it held every
    probe of the failure detector for 5 s, so a partitioned node was never
    suspected within a 5 s fault)."""

    async def scenario() -> None:
        async def hang_up(reader: Any, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(hang_up, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            link = Link(LOOPBACK, port, handshake=_hello_handshake)
            loop = asyncio.get_running_loop()
            for _ in range(5):
                start = loop.time()
                with pytest.raises(ConnectionError):
                    await link.connect(5.0)
                assert loop.time() - start < 1.0
            link.close()

    run(scenario())


def test_a_connect_waits_no_longer_than_its_own_timeout(run):
    """Callers share one connect attempt, but each waits only its own timeout
    (a 0.3 s probe must not wait for a 5 s attempt another caller began)."""

    async def scenario() -> None:
        async def silent(reader: asyncio.StreamReader, writer: Any) -> None:
            await reader.read()  # never answers the HELLO

        server = await asyncio.start_server(silent, LOOPBACK, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            link = Link(LOOPBACK, port, handshake=_hello_handshake)
            slow = asyncio.ensure_future(link.connect(5.0))
            await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(TimeoutError):
                await link.connect(0.3)
            assert loop.time() - start < 1.0
            link.close()
            with contextlib.suppress(Exception):
                await slow

    run(scenario())
