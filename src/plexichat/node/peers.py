"""Node-to-node links: one :class:`~plexichat.node.transport.Link` per peer
address, requests by member id, and the record of which peers answered.

The *answered* table maps a peer address to the clock time at which a
request it answered was *sent*; the node's lease counts it (a reply that
waited in a buffer while this node was paused does not renew the lease).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

from plexichat import wire
from plexichat.node import auth
from plexichat.node import protocol as p
from plexichat.node.auth import Credentials
from plexichat.node.membership import Clock
from plexichat.node.transport import (
    ConnectionLost,
    Exchange,
    Handshake,
    Link,
    RemoteError,
    ReplyCallback,
)

Address = tuple[str, int]
log = logging.getLogger("plexichat.node.peers")
# what a failed connect usually raises; anything else (a port outside
# 0 .. 65535 or a host the resolver refuses, from a member entry that
# slipped past validation, or a bug) is logged as well, and handled the same
EXPECTED: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionLost)
Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


class NotSent(ConnectionLost):
    """A peer request that never left this node (no connection could be made)."""


class PeerLinks:
    """The links of node *node_id* to its peers (also its ``GossipTransport``).

    *resolve* maps a member id to its address (None: unknown), *spawn* runs
    a background task the node owns, *stopping* tells whether the node is
    stopping (then only a ``leave`` gossip still goes out).
    """

    def __init__(
        self,
        node_id: str,
        *,
        clock: Clock,
        resolve: Callable[[str], Address | None],
        spawn: Spawn,
        stopping: Callable[[], bool],
        max_payload: int = wire.MAX_PAYLOAD,
        source_address: str | None = None,
        connect_timeout: float = 5.0,
        credentials: Credentials | None = None,
    ) -> None:
        self.id = node_id
        self.credentials = credentials
        self.clock = clock
        self.resolve = resolve
        self.spawn = spawn
        self.stopping = stopping
        self.max_payload = max_payload
        self.source_address = source_address
        self.connect_timeout = connect_timeout
        self.links: dict[Address, Link] = {}
        # peer address -> clock time a request that it answered was sent
        self.answered: dict[Address, float] = {}
        # requests waiting for a link to connect, in the order they were made
        self._connect_queue: dict[Link, list[tuple[int, bytes, ReplyCallback]]] = {}

    def link(self, address: Address) -> Link:
        """The link to *address* (a new one when there is none or it closed)."""
        link = self.links.get(address)
        if link is None or link.closed:
            hello: bytes | None = None
            handshake: Handshake | None = None
            if self.credentials is None:  # an insecure cluster: say who we are
                hello = p.encode_json(
                    {"version": p.PROTOCOL_VERSION, "role": "peer", "node_id": self.id}
                )
            else:
                handshake = peer_handshake(self.credentials, self.id)
            source = self.source_address
            link = Link(
                address[0],
                address[1],
                max_payload=self.max_payload,
                hello=hello,
                handshake=handshake,
                local_addr=(source, 0) if source else None,
            )
            self.links[address] = link
        return link

    def close(self) -> None:
        """Close every link."""
        for link in self.links.values():
            link.close()

    # -- answers (the lease) ------------------------------------------------

    def note_answer(self, address: Address, sent: float) -> None:
        """*address* answered a request sent at clock time *sent*."""
        previous = self.answered.get(address)
        if previous is None or previous < sent:
            self.answered[address] = sent

    def last_answer(self, address: Address) -> float:
        """When the latest request *address* answered was sent (-inf: never)."""
        return self.answered.get(address, -math.inf)

    def answered_since(self, since: float, need: int) -> bool:
        """True when at least *need* peers answered a request sent at or
        after clock time *since*."""
        fresh = 0
        for at in self.answered.values():
            if at >= since:
                fresh += 1
                if fresh >= need:
                    return True
        return False

    # -- requests -------------------------------------------------------------

    async def gossip_call(
        self, host: str, port: int, type: int, body: dict[str, Any], timeout: float
    ) -> dict[str, Any] | None:
        """GossipTransport: one PING/GOSSIP round trip, None on any failure."""
        if self.stopping() and body.get("kind") != "leave":
            return None
        link = self.link((host, port))
        sent = self.clock.now()
        try:
            frame = await link.call(type, p.encode_json(body), timeout)
            self.note_answer((host, port), sent)
            return p.decode_json(frame.payload)
        except (OSError, TimeoutError, RemoteError, p.ProtocolError, ConnectionLost):
            return None
        except Exception as exc:  # never let a bad address break the caller
            log.debug("gossip call to %s:%s failed: %r", host, port, exc)
            return None

    def request(
        self,
        node_id: str,
        type: int,
        payload: bytes,
        callback: ReplyCallback,
    ) -> None:
        """Send a request to a member by id (connecting first if needed).

        Requests made while a link connects go out in order once it is up;
        if it cannot connect they fail with :class:`NotSent`.
        """
        address = self.resolve(node_id)
        if address is None:
            callback(None, NotSent(f"unknown member {node_id}"))
            return
        link = self.link(address)
        sent = self.clock.now()

        def noted(frame: wire.Frame | None, error: BaseException | None) -> None:
            if frame is not None:
                self.note_answer(address, sent)
            callback(frame, error)

        queued = self._connect_queue.get(link)
        if queued is not None:  # keep the order of requests behind a connect
            queued.append((type, payload, noted))
            return
        if link.connected:
            link.request(type, payload, noted)
            return
        self._connect_queue[link] = [(type, payload, noted)]

        async def connect_then_send() -> None:
            error: BaseException | None = None
            try:
                await link.connect(self.connect_timeout)
            except BaseException as exc:  # a cancel is re-raised below
                # whatever it is, the queued requests (and every later one to
                # this link, queued behind them) must not wait forever
                error = exc
                if isinstance(exc, Exception) and not isinstance(exc, EXPECTED):
                    log.warning(
                        "connect to %s at %s:%s failed: %r", node_id, *address, exc
                    )
            for item in self._connect_queue.pop(link, []):
                if error is None:
                    link.request(*item)
                else:
                    item[2](None, NotSent(f"connect to {node_id}: {error}"))
            if error is not None and not isinstance(error, Exception):
                raise error  # cancelled (the node stops)

        self.spawn(connect_then_send(), f"connect-{node_id}")

    def post(self, address: Address, type: int, payload: bytes, name: str) -> None:
        """Send a frame that expects no reply to *address*, connecting first
        in a task called *name* if needed (a failed connect drops it)."""
        link = self.link(address)
        if link.connected:
            link.post(type, payload)
        else:
            self.spawn(self._post_later(link, type, payload), name)

    async def _post_later(self, link: Link, type: int, payload: bytes) -> None:
        try:
            await link.connect(self.connect_timeout)
            link.post(type, payload)
        except EXPECTED:
            pass
        except Exception as exc:  # a bad address: dropped like an unreachable one
            log.warning("post to %s failed: %r", link.address, exc)


def peer_handshake(credentials: Credentials, node_id: str) -> Handshake:
    """The connecting side of the peer handshake of node *node_id*
    (docs/protocol.md, "Authentication"): send a nonce, check the node's
    proof over both nonces, prove the key back."""

    async def handshake(exchange: Exchange) -> None:
        client_nonce = auth.new_nonce()
        hello = {"version": p.PROTOCOL_VERSION, "role": "peer", "node_id": node_id}
        frame = await exchange(
            wire.MessageType.HELLO,
            p.encode_json({**hello, "nonce": client_nonce.hex()}),
        )
        welcome = _welcome_body(frame)
        server_nonce = auth.parse_nonce(welcome.get("nonce"))
        ids = auth.peer_ids(node_id, str(welcome.get("node_id", "")))
        credentials.check(
            welcome.get("proof"),
            credentials.server_proof(client_nonce, server_nonce, ids),
        )
        proof = credentials.client_proof(client_nonce, server_nonce, ids)
        frame = await exchange(
            wire.MessageType.HELLO, p.encode_json({**hello, "proof": proof})
        )
        if _welcome_body(frame).get("peer") is not True:
            raise auth.AuthError("the node did not admit this peer")

    return handshake


def _welcome_body(frame: wire.Frame) -> dict[str, Any]:
    if frame.type != wire.MessageType.WELCOME:
        raise auth.AuthError(f"expected WELCOME, got frame type {frame.type}")
    return p.decode_json(frame.payload)
