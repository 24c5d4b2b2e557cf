"""Framed connections over asyncio: stream reassembly and batched writes.

:class:`FrameConnection` is an ``asyncio.Protocol``: incoming bytes go
through one :class:`plexichat.wire.FrameDecoder` per connection and whole
frames are handed to a callback in batches (everything one ``recv`` held).
Outgoing frames are queued and encoded together with ``encode_frames`` into
a reused buffer once per event-loop iteration, so a burst of replies costs
one ``write`` system call.

:class:`Link` is the client side (used by load generators, the checker and
node-to-node links): it correlates replies with requests by request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import Any

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node.auth import TLS_SERVER_NAME

log = logging.getLogger("plexichat.node")

FrameHandler = Callable[["FrameConnection", list[wire.Frame]], None]
ReplyCallback = Callable[[wire.Frame | None, BaseException | None], None]
# One request/reply of a handshake: (type, payload) -> the reply frame.
Exchange = Callable[[int, bytes], Awaitable[wire.Frame]]
Handshake = Callable[[Exchange], Awaitable[None]]

MASK32 = 0xFFFFFFFF
MAX_BUFFERED = 32 << 20  # unsent reply bytes after which a server drops a peer
UNLIMITED = 1 << 62  # a limit that is never reached (client-side connections)
_NEVER = -UNLIMITED  # ``inflight < _NEVER`` is never true
_REUSE = 1 << 16  # a flush up to this size reuses the encode buffer
_rid = operator.itemgetter(1)  # a Frame's request id


def _cut(frames: list[wire.Frame], room: int) -> int:
    """How many leading *frames* hold at most *room* requests (request id != 0)."""
    taken = 0
    for index, frame in enumerate(frames):
        if frame[1]:
            if taken >= room:
                return index
            taken += 1
    return len(frames)


class RemoteError(Exception):
    """The peer answered with an ERROR frame."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        name = (
            p.ErrorCode(code).name if code in p.ErrorCode._value2member_map_ else code
        )
        super().__init__(f"{name}: {message}")


class ConnectionLost(ConnectionError):
    """The connection closed before the reply arrived."""


class FrameConnection(asyncio.Protocol):
    """One framed TCP connection (either side)."""

    def __init__(
        self,
        on_frames: FrameHandler,
        *,
        max_payload: int = wire.MAX_PAYLOAD,
        on_wire_error: Callable[[FrameConnection, wire.WireError], None] | None = None,
        on_close: Callable[[FrameConnection, BaseException | None], None] | None = None,
        server_side: bool = False,
        max_inflight: int = UNLIMITED,
        max_output: int | None = None,
    ) -> None:
        self.on_frames = on_frames
        self.server_side = server_side
        self.overflowed = False
        self.on_wire_error = on_wire_error
        self.on_close = on_close
        self.decoder = wire.FrameDecoder(max_payload)
        self.transport: asyncio.Transport | None = None
        self.peername: str = "?"
        self.closed = False
        # Limits (docs/protocol.md "Limits").  A server side sends no frame
        # larger than it reads (*max_payload*: a larger reply becomes ERROR
        # TOO_LARGE), keeps at most *max_output* reply bytes unsent (then it
        # drops the peer: ``overflowed``) and stops reading while more than
        # *max_inflight* requests (request id != 0) it read are unanswered.
        self.max_send = max_payload if server_side else wire.HARD_MAX_PAYLOAD
        if max_output is None:
            max_output = MAX_BUFFERED if server_side else UNLIMITED
        self.max_output = max_output
        self.max_inflight = max_inflight
        self.inflight = 0  # requests read and not yet answered (server side)
        self._room = max_output  # reply bytes that may still be queued
        self._held: list[wire.Frame] | None = None  # read, waiting for room
        self._wake = _NEVER  # release held frames once inflight drops below
        self._write_paused = False
        # last_rx: monotonic time of the last whole frame (or of the start);
        # partial_since: of the first byte of the frame being received (the
        # start, until the first frame is whole; 0.0: nothing pending).
        self.last_rx = time.monotonic()
        self.partial_since = self.last_rx if server_side else 0.0
        self.rx_frames = 0
        self.role = "client"  # set to "peer" by a node-to-node HELLO
        self.peer_id = ""
        # What the connection may do (set by the node; HELLO widens it), the
        # authenticated sender (0: none) and its 8-byte msg_id prefix.
        self.allowed: frozenset[int] = frozenset()
        self.admin = False
        self.sender = 0
        self.sender_prefix: bytes | None = None
        self.data: dict[str, Any] = {}  # per-connection state of the handler
        self._out: list[tuple[int, int, bytes]] = []
        self._buffer = bytearray()
        self._flush_pending = False
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peername = f"{peer[0]}:{peer[1]}"
        if self.closed:  # closed by a deadline before the transport came up
            transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        try:
            frames = self.decoder.feed(data)
        except wire.WireError as exc:
            if self.on_wire_error is not None:
                self.on_wire_error(self, exc)
            self.close()
            return
        if frames:
            self.last_rx = now
            # a frame left partial by this read started in it
            self.partial_since = now if self.decoder.pending else 0.0
            self.rx_frames += len(frames)
            if self.server_side:
                if self._held is not None:  # (a read that raced the pause)
                    self._held += frames
                    return
                inflight = self.inflight + sum(map(bool, map(_rid, frames)))
                if inflight > self.max_inflight:
                    self._hold(frames)
                    return
                self.inflight = inflight
            self.on_frames(self, frames)
        elif not self.partial_since:
            self.partial_since = now

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self._held = None
        self.inflight = 0
        if self.on_close is not None:
            self.on_close(self, exc)

    def pause_writing(self) -> None:
        # A server whose peer reads its replies slower than it sends requests
        # stops reading requests until the replies drain (bounded memory).  A
        # client side keeps reading: its replies are what drains the peer.
        if self.server_side and self.transport is not None and not self.closed:
            self._write_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server_side and self.transport is not None and not self.closed:
            self._write_paused = False
            if self._held is None:
                self._resume_reading()
            else:
                self._loop.call_soon(self._release)

    # -- backpressure on requests (server side) -------------------------------

    @property
    def paused(self) -> bool:
        """True while this (server-side) connection does not read: its peer
        does not read its replies, or too many of its requests are in flight."""
        return self._write_paused or self._held is not None

    @property
    def holding(self) -> bool:
        """True while requests read from this connection wait for in-flight room."""
        return self._held is not None

    def _hold(self, frames: list[wire.Frame]) -> None:
        """More requests than ``max_inflight`` would be in flight: dispatch
        those that fit, hold the rest and stop reading until replies make room."""
        cut = _cut(frames, self.max_inflight - self.inflight)
        self._held = frames[cut:]
        self._wake = self.max_inflight // 2 + 1
        if self.transport is not None:
            self.transport.pause_reading()
        if cut:
            self._dispatch(frames[:cut])

    def _dispatch(self, frames: list[wire.Frame]) -> None:
        self.inflight += sum(map(bool, map(_rid, frames)))
        self.on_frames(self, frames)

    def _wake_up(self) -> None:
        """In-flight requests fell to half the limit: release held frames."""
        self._wake = _NEVER
        self._loop.call_soon(self._release)

    def _release(self) -> None:
        held = self._held
        if held is None or self.closed or self._write_paused:
            return  # (resume_writing releases them)
        cut = _cut(held, self.max_inflight - self.inflight)
        if cut < len(held):  # dispatching the first *cut* fills the limit
            self._held = held[cut:]
            self._wake = self.max_inflight // 2 + 1
        else:
            self._held = None
            self._wake = _NEVER
            self._resume_reading()
        if cut:
            self._dispatch(held[:cut])

    def _resume_reading(self) -> None:
        if self.transport is None or self.closed:
            return
        if self.partial_since:  # the time spent paused does not count
            self.partial_since = time.monotonic()
        self.transport.resume_reading()

    def reset_inflight(self) -> None:
        """Forget the requests in flight (the node's last resort for a count
        that stopped moving: a request it never answered)."""
        self.inflight = 0
        if self._held is not None:
            self._wake_up()

    # -- sending ------------------------------------------------------------

    def send(self, type: int, request_id: int, payload: bytes) -> None:
        """Queue one frame; all frames queued in this loop turn go out together.

        A frame that cannot be encoded raises ``ValueError`` here, before it is
        queued: it never blocks the frames after it.  On a server side, a
        reply larger than the connection reads is answered with ERROR
        TOO_LARGE instead (a push is dropped), and a reply that would take the
        unsent bytes past ``max_output`` drops the connection.
        """
        if not wire.MIN_TYPE <= type <= wire.MAX_TYPE:
            raise ValueError(
                f"frame type {type} outside {wire.MIN_TYPE}..{wire.MAX_TYPE}"
            )
        if not 0 <= request_id <= MASK32:
            raise ValueError(f"request id {request_id} does not fit in 32 bits")
        size = len(payload)
        if size > self.max_send:
            self._too_large(type, request_id, size)
            return
        if self.closed:
            return
        room = self._room = self._room - size
        if room < 0:
            self._overflow()
            return
        if request_id:  # a reply: one request less in flight
            inflight = self.inflight = self.inflight - 1
            if inflight < self._wake:
                self._wake_up()
        self._out.append((type, request_id, payload))
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def _too_large(self, type: int, request_id: int, size: int) -> None:
        if not self.server_side:
            raise ValueError(f"payload of {size} bytes exceeds {self.max_send}")
        log.warning(
            "reply of %d bytes (type %d) to %s exceeds the frame limit %d",
            size,
            type,
            self.peername,
            self.max_send,
            extra={"event": "reply_too_large", "peer": self.peername, "bytes": size},
        )
        if request_id and type != wire.MessageType.ERROR:
            self.send_error(
                request_id,
                p.ErrorCode.TOO_LARGE,
                f"reply of {size} bytes exceeds the frame limit {self.max_send}",
            )

    def _overflow(self) -> None:
        """The peer is this far behind on its replies: cut it off instead of
        keeping them in memory (``overflowed``; the node logs and counts it)."""
        self.overflowed = True
        self.abort()

    def flush(self) -> None:
        """Encode every queued frame into the reused buffer and write it."""
        self._flush_pending = False
        transport = self.transport
        if not self._out or self.closed or transport is None:
            self._out.clear()
            return
        buffer = self._buffer
        del buffer[:]
        wire.encode_frames(self._out, buffer)
        self._out.clear()
        if len(buffer) > _REUSE:
            # a large batch: hand the buffer over (no copy) and start a new one
            self._buffer = bytearray()
            transport.write(buffer)
        else:
            # bytes(): the transport may keep a reference past this call.
            transport.write(bytes(buffer))
        self._room = self.max_output - transport.get_write_buffer_size()

    def send_error(self, request_id: int, code: int, message: str) -> None:
        self.send(wire.MessageType.ERROR, request_id, p.encode_error(code, message))

    def close(self) -> None:
        """Flush what is queued, then close."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Refused(asyncio.Protocol):
    """A connection the node does not take (over ``max_connections``): it
    gets *frame* (an ERROR with request id 0) and is closed."""

    def __init__(self, frame: bytes) -> None:
        self.frame = frame

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.frame)
        transport.close()


class Link:
    """Client side of a framed connection with request/reply correlation.

    ``request`` takes a callback (cheap, for pipelined hot paths); ``call``
    awaits one reply.  Frames whose request id matches no pending request
    (DELIVER pushes, for example) go to *on_push*.  *local_addr* binds the
    outgoing socket (a node's ``--source-address``: a lab link layer tells
    nodes apart by it).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_payload: int = wire.MAX_PAYLOAD,
        on_push: Callable[[wire.Frame], None] | None = None,
        on_close: Callable[[Link], None] | None = None,
        hello: bytes | None = None,
        handshake: Handshake | None = None,
        local_addr: tuple[str, int] | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        self.ssl = ssl
        self.hello = hello
        self.handshake = handshake
        self._handshaking: FrameConnection | None = None
        self.local_addr = local_addr
        self.host = host
        self.port = port
        self.max_payload = max_payload
        self.on_push = on_push
        self.on_close_cb = on_close
        self.conn: FrameConnection | None = None
        self.pending: dict[int, ReplyCallback] = {}
        self._next_id = 1
        self._connecting: asyncio.Future[None] | None = None
        self.closed = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    async def connect(self, timeout: float = 5.0) -> None:
        """Open the connection (idempotent; concurrent callers share one attempt)."""
        if self.connected:
            return
        if self.closed:
            raise ConnectionLost(f"link to {self.address} is closed")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open(timeout))
            self._connecting.add_done_callback(_retrieve)
        # each caller waits its own timeout at most, whoever began the attempt
        await asyncio.wait_for(asyncio.shield(self._connecting), timeout)

    async def _open(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(
                lambda: FrameConnection(
                    self._on_frames, max_payload=self.max_payload, on_close=self._lost
                ),
                self.host,
                self.port,
                local_addr=self.local_addr,
                ssl=self.ssl,
                server_hostname=None if self.ssl is None else TLS_SERVER_NAME,
            ),
            timeout,
        )
        if self.closed:  # closed while connecting: keep no connection
            protocol.abort()
            raise ConnectionLost(f"link to {self.address} was closed while connecting")
        if self.handshake is not None:
            # Requests wait (the link is not connected) until the handshake
            # is done; a failed one leaves no connection behind.  A peer that
            # hung up already (before this coroutine resumed) fails it now.
            if protocol.closed:
                raise ConnectionLost(f"{self.address} closed the connection at once")
            self._handshaking = protocol
            try:
                await self.handshake(
                    lambda type, payload: self._exchange(
                        protocol, type, payload, timeout
                    )
                )
            except BaseException:
                protocol.abort()
                raise
            finally:
                self._handshaking = None
            if protocol.closed:
                raise ConnectionLost(f"{self.address} closed during the handshake")
        self.conn = protocol
        if self.hello is not None:
            protocol.send(wire.MessageType.HELLO, 0, self.hello)

    def _on_frames(self, conn: FrameConnection, frames: list[wire.Frame]) -> None:
        pending = self.pending
        for frame in frames:
            callback = pending.pop(frame.request_id, None)
            if callback is not None:
                callback(frame, None)
            elif self.on_push is not None:
                self.on_push(frame)

    def _lost(self, conn: FrameConnection, exc: BaseException | None) -> None:
        if conn is self._handshaking:
            self.fail_pending(
                ConnectionLost(f"{self.address} lost in handshake: {exc}")
            )
            return
        if conn is not self.conn:
            return
        self.conn = None
        self.fail_pending(ConnectionLost(f"connection to {self.address} lost: {exc}"))
        if self.on_close_cb is not None:
            self.on_close_cb(self)

    def fail_pending(self, error: BaseException) -> None:
        pending, self.pending = self.pending, {}
        for callback in pending.values():
            callback(None, error)

    def next_id(self) -> int:
        rid = self._next_id
        self._next_id = rid + 1 if rid < MASK32 else 1
        return rid

    def request(self, type: int, payload: bytes, callback: ReplyCallback) -> int:
        """Send a request now (the link must be connected); reply goes to *callback*."""
        conn = self.conn
        if conn is None or conn.closed:
            callback(None, ConnectionLost(f"not connected to {self.address}"))
            return 0
        rid = self.next_id()
        conn.send(type, rid, payload)  # raises on a frame that cannot be encoded
        self.pending[rid] = callback
        return rid

    def cancel(self, rid: int) -> None:
        self.pending.pop(rid, None)

    def post(self, type: int, payload: bytes) -> None:
        """Send a frame that expects no reply (request id 0)."""
        if self.conn is not None and not self.conn.closed:
            self.conn.send(type, 0, payload)

    async def call(self, type: int, payload: bytes, timeout: float = 5.0) -> wire.Frame:
        """Send one request and await its reply; ERROR replies raise RemoteError."""
        await self.connect(timeout)
        conn = self.conn
        if conn is None or conn.closed:
            raise ConnectionLost(f"not connected to {self.address}")
        return await self._exchange(conn, type, payload, timeout)

    async def _exchange(
        self, conn: FrameConnection, type: int, payload: bytes, timeout: float
    ) -> wire.Frame:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[wire.Frame] = loop.create_future()

        def done(frame: wire.Frame | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                assert frame is not None
                future.set_result(frame)

        rid = self.next_id()
        conn.send(type, rid, payload)  # raises on a frame that cannot be encoded
        self.pending[rid] = done
        try:
            frame = await asyncio.wait_for(future, timeout)
        except (TimeoutError, asyncio.CancelledError):
            self.cancel(rid)  # a late reply then matches nothing
            raise
        if frame.type == wire.MessageType.ERROR:
            code, message = p.decode_error(frame.payload)
            raise RemoteError(code, message)
        return frame

    def close(self) -> None:
        self.closed = True
        if self.conn is not None:
            self.conn.close()
        self.fail_pending(ConnectionLost(f"link to {self.address} closed"))

    async def aclose(self) -> None:
        """Close and let the transport finish."""
        self.close()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a connect attempt's failure as seen: its callers may all have
    given up (timed out, cancelled) and each gets the error it awaited.  An
    unseen one is logged with its traceback when the task is collected, in
    whatever code the garbage collector interrupts."""
    if not task.cancelled():
        task.exception()
