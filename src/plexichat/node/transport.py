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
import time
from collections.abc import Callable
from typing import Any

from plexichat import wire
from plexichat.node import protocol as p

FrameHandler = Callable[["FrameConnection", list[wire.Frame]], None]
ReplyCallback = Callable[[wire.Frame | None, BaseException | None], None]

MASK32 = 0xFFFFFFFF
MAX_BUFFERED = 32 << 20  # unsent reply bytes after which a server drops a peer


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
        self.last_rx = time.monotonic()
        self.rx_frames = 0
        self.role = "client"  # set to "peer" by a node-to-node HELLO
        self.peer_id = ""
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

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        try:
            frames = self.decoder.feed(data)
        except wire.WireError as exc:
            if self.on_wire_error is not None:
                self.on_wire_error(self, exc)
            self.close()
            return
        if frames:
            self.rx_frames += len(frames)
            self.on_frames(self, frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        if self.on_close is not None:
            self.on_close(self, exc)

    def pause_writing(self) -> None:
        # A server whose peer reads its replies slower than it sends requests
        # stops reading requests until the replies drain (bounded memory).  A
        # client side keeps reading: its replies are what drains the peer.
        if self.server_side and self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server_side and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- sending ------------------------------------------------------------

    def send(self, type: int, request_id: int, payload: bytes) -> None:
        """Queue one frame; all frames queued in this loop turn go out together.

        A frame that cannot be encoded raises ``ValueError`` here, before it is
        queued: it never blocks the frames after it.
        """
        if not wire.MIN_TYPE <= type <= wire.MAX_TYPE:
            raise ValueError(
                f"frame type {type} outside {wire.MIN_TYPE}..{wire.MAX_TYPE}"
            )
        if not 0 <= request_id <= MASK32:
            raise ValueError(f"request id {request_id} does not fit in 32 bits")
        if len(payload) > wire.HARD_MAX_PAYLOAD:
            raise ValueError(
                f"payload of {len(payload)} bytes exceeds {wire.HARD_MAX_PAYLOAD}"
            )
        if self.closed:
            return
        self._out.append((type, request_id, payload))
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Encode every queued frame into the reused buffer and write it."""
        self._flush_pending = False
        if not self._out or self.closed or self.transport is None:
            self._out.clear()
            return
        buffer = self._buffer
        del buffer[:]
        wire.encode_frames(self._out, buffer)
        self._out.clear()
        # bytes(): the transport may keep a reference past this call.
        self.transport.write(bytes(buffer))
        if self.server_side and self.transport.get_write_buffer_size() > MAX_BUFFERED:
            # Replies to requests read before reading paused still pile up;
            # a peer this far behind is cut off instead of eating memory.
            self.overflowed = True
            self.abort()

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
        local_addr: tuple[str, int] | None = None,
    ) -> None:
        self.hello = hello
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
        await asyncio.shield(self._connecting)

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
            ),
            timeout,
        )
        if self.closed:  # closed while connecting: keep no connection
            protocol.abort()
            raise ConnectionLost(f"link to {self.address} was closed while connecting")
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

        rid = self.request(type, payload, done)
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
