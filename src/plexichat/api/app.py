"""The FastAPI app: routes, authentication, errors (docs/http-api.md).

:func:`create_app` builds it on a :class:`~plexichat.api.gateway.Gateway`;
:func:`node_app` does that for an in-process node (what ``plexichat-node
--http-listen`` serves).  Every request maps to one binary operation:

* ``POST /channels/{channel}/messages``: SEND (the node forwards it to the
  owner); ``201`` once the node acknowledged it (committed on every replica);
* ``GET /channels/{channel}/messages``: one FETCH page at the owner;
* ``/channels/{channel}/ws``: SUBSCRIBE at the owner, the backlog read with
  FETCH first, records de-duplicated by seq, a bounded buffer per client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import FastAPI, Header, HTTPException, Path, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from plexichat import wire
from plexichat.api.gateway import (
    ConnectionLost,
    Gateway,
    NodeRoutes,
    RemoteError,
    Unavailable,
)
from plexichat.api.metrics import CONTENT_TYPE_LATEST, ApiMetrics, MetricsMiddleware
from plexichat.api.models import Accepted, Health, Message, NewMessage, Page, Problem
from plexichat.node import protocol as p
from plexichat.node.auth import AuthError, Credentials, Identity
from plexichat.node.transport import Link
from plexichat.routing import key_of

if TYPE_CHECKING:
    from plexichat.node.server import Node

T = wire.MessageType
E = p.ErrorCode

# WebSocket close codes (docs/http-api.md "Close codes")
CLOSE_SLOW: Final = 4008  # fell too far behind: reconnect with after=<last seq>
CLOSE_UNAUTHENTICATED: Final = 4401  # (servers without denial responses)
CLOSE_FORBIDDEN: Final = 4403
CLOSE_MOVED: Final = 1012  # the owner changed or its link dropped: resume
CLOSE_UNAVAILABLE: Final = 1013  # no owner now: try again later, resume

MAX_CHANNEL: Final = 256  # characters of a channel name
MAX_KEY: Final = 128  # characters of an Idempotency-Key
PAGE_MAX: Final = 1000  # FETCH's own cap


@dataclass
class ApiSettings:
    """What the API enforces and how it behaves (see docs/http-api.md)."""

    node_id: str = ""
    max_message: int = 256 * 1024  # payload bytes: the node's --max-message
    insecure: bool = False  # no credentials: every request is anonymous
    retry_after: int = 1  # seconds, the Retry-After of a 503
    default_limit: int = 100  # GET page size without ?limit=
    ws_queue: int = 1024  # live records buffered per WebSocket before 4008
    ws_send_timeout: float = 10.0  # seconds one WebSocket send may block
    ws_close_timeout: float = 10.0  # seconds a close frame may wait to be sent
    owner_check: float = 1.0  # seconds between a WebSocket's owner checks

    @property
    def max_body(self) -> int:
        """Request body bytes read at most: the payload as JSON-escaped text
        (at most 6 bytes per byte) or base64, plus the other fields."""
        return 6 * self.max_message + 4096


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Pure ASGI middleware: a request body above *limit* bytes gets ``413``
    before the app reads it whole (Content-Length, or counted as it streams)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if (
                name == b"content-length"
                and value.isdigit()
                and int(value) > self.limit
            ):
                await self._too_large(scope, receive, send)
                return
        seen = 0
        started = False

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def sending(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if started:
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"request body above {self.limit} bytes"}, status_code=413
        )
        await response(scope, receive, send)


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "bad input (Idempotency-Key, data)"},
    401: {"model": Problem, "description": "no valid bearer token"},
    403: {"model": Problem, "description": "the token's role forbids it"},
    413: {"model": Problem, "description": "payload above the node's max message"},
    503: {"model": Problem, "description": "channel unavailable; see Retry-After"},
}


Channel = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_CHANNEL,
        description="channel name (its routing key is XXH3-64 of the UTF-8)",
    ),
]
Authorization = Annotated[
    str | None, Header(description="Bearer <token> (the node's client JWT)")
]


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization is not 'Bearer <token>'")
    return token.strip()


def message_id(sender: int, key: str | None) -> bytes:
    """The binary msg_id of a POST: the sender (u64), then the first 8 bytes of
    SHA-256 of the Idempotency-Key, or 8 random bytes without one."""
    tail = (
        secrets.token_bytes(8)
        if key is None
        else hashlib.sha256(key.encode("utf-8")).digest()[:8]
    )
    return sender.to_bytes(8, "big") + tail


def create_app(
    gateway: Gateway,
    credentials: Credentials | None,
    settings: ApiSettings | None = None,
) -> FastAPI:
    """The API on *gateway*; tokens verify with *credentials* (None: only
    when ``settings.insecure``, then every request is anonymous)."""
    settings = settings or ApiSettings()
    if credentials is None and not settings.insecure:
        raise ValueError("the API needs the cluster's credentials unless insecure")
    metrics = ApiMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await gateway.close()

    app = FastAPI(
        title="PlexiChat",
        version="1",
        summary="HTTP and WebSocket API of a PlexiChat node (docs/http-api.md)",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.metrics = metrics
    app.state.settings = settings

    def unavailable(detail: str) -> HTTPException:
        return HTTPException(
            503, detail, headers={"Retry-After": str(settings.retry_after)}
        )

    def failure(exc: Exception) -> HTTPException:
        """The HTTP answer to a failed binary operation."""
        if isinstance(exc, RemoteError):
            detail = str(exc)
            if exc.code in (E.UNAVAILABLE, E.TIMEOUT, E.NOT_OWNER, E.SHUTTING_DOWN):
                return unavailable(detail)
            if exc.code == E.TOO_LARGE:
                return HTTPException(413, detail)
            if exc.code == E.FORBIDDEN:
                return HTTPException(403, detail)
            if exc.code == E.MALFORMED:
                return HTTPException(400, detail)
            return HTTPException(500 if exc.code == E.INTERNAL else 502, detail)
        if isinstance(exc, Unavailable):
            return unavailable(str(exc))
        return unavailable(f"node unreachable: {exc}")

    def identify(token: str | None) -> Identity | None:
        """The token's identity (None: anonymous, --insecure nodes only)."""
        if credentials is None:
            return None
        if token is None:
            raise AuthError("no bearer token")
        return credentials.verify_token(token)

    def authenticate(authorization: str | None) -> Identity | None:
        try:
            return identify(_bearer(authorization))
        except AuthError as exc:
            raise HTTPException(
                401, str(exc), headers={"WWW-Authenticate": "Bearer"}
            ) from exc

    @app.post(
        "/channels/{channel}/messages",
        status_code=201,
        response_model=Accepted,
        responses={**ERRORS, 422: {"description": "body does not validate"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": NewMessage.model_json_schema()}
                },
            }
        },
    )
    async def post_message(
        request: Request,
        channel: Channel,
        authorization: Authorization = None,
        idempotency_key: Annotated[
            str | None,
            Header(
                description="retries with the same key (same sender and channel) "
                "get the same seq; 1..128 printable ASCII characters"
            ),
        ] = None,
    ) -> Accepted:
        """Send a message; 201 with its seq once committed."""
        ident = authenticate(authorization)
        if idempotency_key is not None and not (
            0 < len(idempotency_key) <= MAX_KEY
            and idempotency_key.isascii()
            and idempotency_key.isprintable()
        ):
            raise HTTPException(
                400, f"Idempotency-Key must be 1..{MAX_KEY} printable ASCII characters"
            )
        try:
            body = NewMessage.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from exc
        try:
            payload = body.payload()
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        if len(payload) > settings.max_message:
            raise HTTPException(
                413,
                f"payload of {len(payload)} bytes above the node's max message "
                f"({settings.max_message})",
            )
        if ident is None:
            if body.sender is None:
                raise HTTPException(400, "an anonymous request names its sender")
            sender = body.sender
        elif body.sender is not None and body.sender != ident.sender:
            if not ident.any_sender:
                raise HTTPException(403, "a client token sends as its own sender only")
            sender = body.sender
        else:
            sender = ident.sender
        msg_id = message_id(sender, idempotency_key)
        try:
            seq = await gateway.send(key_of(channel), msg_id, sender, payload)
        except (RemoteError, Unavailable, ConnectionLost, OSError, TimeoutError) as e:
            raise failure(e) from e
        return Accepted(channel=channel, seq=seq, msg_id=msg_id.hex(), sender=sender)

    @app.get("/channels/{channel}/messages", response_model=Page, responses=ERRORS)
    async def get_messages(
        channel: Channel,
        authorization: Authorization = None,
        after: Annotated[
            int, Query(ge=0, lt=p.SEQ_END, description="messages with seq > after")
        ] = 0,
        limit: Annotated[int | None, Query(ge=1, le=PAGE_MAX)] = None,
    ) -> Page:
        """One page of committed messages after a seq, oldest first."""
        authenticate(authorization)
        count = settings.default_limit if limit is None else limit
        try:
            records, more = await gateway.fetch(key_of(channel), after, count)
        except (RemoteError, Unavailable, ConnectionLost, OSError, TimeoutError) as e:
            raise failure(e) from e
        messages = [Message.of(r) for r in records]
        following = (records[-1].seq if records else after) if more else None
        return Page(channel=channel, messages=messages, next=following)

    @app.get("/health", response_model=Health, responses={503: {"model": Problem}})
    async def health() -> Health:
        """200 while the node answers a PING on its binary port."""
        try:
            await gateway.link(gateway.routes.local()).call(
                T.PING, b"", gateway.timeout
            )
        except (RemoteError, ConnectionLost, OSError, TimeoutError) as exc:
            raise failure(exc) from exc
        return Health(status="ok", node_id=settings.node_id)

    @app.get("/metrics", response_class=Response)
    async def get_metrics() -> Response:
        """Prometheus text format."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/channels/{channel}/ws")
    async def live(
        websocket: WebSocket,
        channel: Channel,
        after: Annotated[int, Query(ge=0, lt=p.SEQ_END)] = 0,
        token: Annotated[str | None, Query(max_length=4096)] = None,
    ) -> None:
        """Committed messages with seq > after, then live, in seq order."""
        stream = _Stream(websocket, gateway, settings, metrics, key_of(channel))
        try:
            authorization = websocket.headers.get("authorization")
            # every role may read: the identity only has to verify
            identify(token if authorization is None else _bearer(authorization))
        except AuthError as exc:
            await stream.reject(401, str(exc), CLOSE_UNAUTHENTICATED)
            return
        await stream.run(after)

    app.add_middleware(BodyLimit, limit=settings.max_body)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


class _Stream:
    """One WebSocket: SUBSCRIBE at the owner, backlog, then live records.

    Live DELIVERs go to a bounded buffer.  Records are sent in seq order,
    each once (``last`` is the highest seq sent): one at or below ``last``
    is skipped, and a gap (a DELIVER above ``last + 1``; a buffer that
    overflowed while the backlog was read) is filled with FETCH from
    ``last``.  A buffer that overflows once live means the client reads
    too slowly: close ``4008`` with the seq to resume after.
    """

    def __init__(
        self,
        websocket: WebSocket,
        gateway: Gateway,
        settings: ApiSettings,
        metrics: ApiMetrics,
        channel: int,
    ) -> None:
        self.ws = websocket
        self.gateway = gateway
        self.settings = settings
        self.metrics = metrics
        self.channel = channel
        self.buffer: collections.deque[p.Record] = collections.deque()
        self.overflow = False
        self.lost = False
        self.gone = False
        self.wake = asyncio.Event()
        self.last = 0

    async def reject(self, status: int, detail: str, code: int) -> None:
        """Refuse the handshake: an HTTP answer where the server can send one
        (uvicorn, TestClient), else accept and close with *code*."""
        if "websocket.http.response" in self.ws.scope.get("extensions", {}):
            headers = {"Retry-After": str(self.settings.retry_after)}
            await self.ws.send_denial_response(
                JSONResponse(
                    {"detail": detail},
                    status_code=status,
                    headers=headers if status == 503 else None,
                )
            )
        else:
            await self.ws.close(code, detail[:120])
        self.metrics.ws_closed.labels(str(status)).inc()

    def on_push(self, frame: wire.Frame) -> None:
        if frame.type != T.DELIVER:
            return
        try:
            record = p.decode_deliver(frame.payload)
        except p.ProtocolError:
            return
        if record.channel != self.channel:
            return
        if len(self.buffer) >= self.settings.ws_queue:
            self.buffer.clear()  # a FETCH from `last` brings them back
            self.overflow = True
        else:
            self.buffer.append(record)
        self.wake.set()

    def on_close(self, link: Link) -> None:
        self.lost = True
        self.wake.set()

    async def run(self, after: int) -> None:
        gateway = self.gateway
        try:
            address = gateway.owner(self.channel)
        except Unavailable as exc:
            await self.reject(503, str(exc), CLOSE_UNAVAILABLE)
            return
        link = gateway.new_link(address, self.on_push, self.on_close)
        try:
            try:
                await link.call(
                    T.SUBSCRIBE, p.encode_channel(self.channel), gateway.timeout
                )
            except (RemoteError, ConnectionLost, OSError, TimeoutError) as exc:
                await self.reject(503, f"cannot subscribe: {exc}", CLOSE_UNAVAILABLE)
                return
            await self.ws.accept()
            self.metrics.ws_open.inc()
            try:
                code, reason = await self._serve(link, address, after)
            finally:
                self.metrics.ws_open.dec()
            self.metrics.ws_closed.labels(str(code)).inc()
            if not self.gone and self.ws.client_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.ws.close(code, reason), self.settings.ws_close_timeout
                    )
        finally:
            await link.aclose()

    async def _serve(
        self, link: Link, address: tuple[str, int], after: int
    ) -> tuple[int, str]:
        """Send until something ends the stream; the close code and reason."""
        self.last = after
        reader = asyncio.create_task(self._read_client())
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.settings.owner_check
        try:
            await self._catch_up(link)
            while True:
                if self.gone:
                    return 1000, ""
                if self.overflow:
                    return CLOSE_SLOW, f"slow consumer: resume with after={self.last}"
                if self.lost:
                    return CLOSE_MOVED, f"node link lost: resume with after={self.last}"
                if loop.time() >= next_check:
                    next_check = loop.time() + self.settings.owner_check
                    now = self.gateway.routes.owner(self.channel)
                    if now is None:
                        return (
                            CLOSE_UNAVAILABLE,
                            f"no owner: resume with after={self.last}",
                        )
                    if now != address:
                        return (
                            CLOSE_MOVED,
                            f"owner moved: resume with after={self.last}",
                        )
                while self.buffer and not self.overflow:
                    record = self.buffer.popleft()
                    if record.seq <= self.last:
                        continue
                    if record.seq > self.last + 1:
                        await self._catch_up(link)
                        continue
                    await self._send(record)
                if not self.buffer and not self.overflow:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self.wake.wait(), self.settings.owner_check
                        )
        except _ClientGone:
            return 1000, ""
        except TimeoutError:
            return CLOSE_SLOW, f"slow consumer: resume with after={self.last}"
        except (RemoteError, ConnectionLost, OSError) as exc:
            return CLOSE_MOVED, f"{exc}"[:60] + f"; resume after={self.last}"
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _catch_up(self, link: Link) -> None:
        """FETCH from ``last`` at the owner until no committed record follows;
        an overflow of the live buffer meanwhile only means more to FETCH."""
        while True:
            self.overflow = False
            frame = await link.call(
                T.FETCH,
                p.encode_fetch(self.channel, self.last, PAGE_MAX),
                self.gateway.timeout,
            )
            _, records, more = p.decode_messages(frame.payload)
            before = self.last
            for record in records:
                if record.seq == self.last + 1:
                    await self._send(record)
            if self.overflow:
                continue  # (live records were dropped: they are in the store)
            if not more or self.last == before:
                return

    async def _send(self, record: p.Record) -> None:
        if self.gone:
            raise _ClientGone
        text = json.dumps(Message.of(record).model_dump(exclude_none=True))
        try:
            await asyncio.wait_for(
                self.ws.send_text(text), self.settings.ws_send_timeout
            )
        except (WebSocketDisconnect, RuntimeError) as exc:
            raise _ClientGone from exc
        self.last = record.seq
        self.metrics.ws_sent.inc()

    async def _read_client(self) -> None:
        """Read (and ignore) what the client sends; note when it leaves."""
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except Exception:
            pass
        self.gone = True
        self.wake.set()


class _ClientGone(Exception):
    pass


def node_app(node: Node, **options: Any) -> FastAPI:
    """The API of in-process *node* (its credentials, limits and ring);
    *options* override :class:`ApiSettings` fields."""
    gateway = Gateway(
        NodeRoutes(node), node.credentials, max_frame=node.config.max_frame
    )
    settings = ApiSettings(
        node_id=node.id,
        max_message=node.config.max_message,
        insecure=node.credentials is None,
        **options,
    )
    return create_app(gateway, node.credentials, settings)


__all__ = [
    "CLOSE_MOVED",
    "CLOSE_SLOW",
    "CLOSE_UNAVAILABLE",
    "ApiSettings",
    "create_app",
    "message_id",
    "node_app",
]
