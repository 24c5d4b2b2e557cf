"""Node-to-node links: one :class:`~plexichat.node.transport.Link` per peer
address, requests by member id, and the record of which peers answered.

The *answered* table maps a peer address to the clock time at which a
request it answered was *sent*; the node's lease counts it (a reply that
waited in a buffer while this node was paused does not renew the lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Coroutine
from typing import Any

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node.membership import Clock
from plexichat.node.transport import (
    ConnectionLost,
    Link,
    RemoteError,
    ReplyCallback,
)

Address = tuple[str, int]
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
    ) -> None:
        self.id = node_id
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
            hello = p.encode_json(
                {"version": p.PROTOCOL_VERSION, "role": "peer", "node_id": self.id}
            )
            source = self.source_address
            link = Link(
                address[0],
                address[1],
                max_payload=self.max_payload,
                hello=hello,
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
            except (OSError, TimeoutError, ConnectionLost) as exc:
                error = exc
            for item in self._connect_queue.pop(link, []):
                if error is None:
                    link.request(*item)
                else:
                    item[2](None, NotSent(f"connect to {node_id}: {error}"))

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
        with contextlib.suppress(OSError, TimeoutError, ConnectionLost):
            await link.connect(self.connect_timeout)
            link.post(type, payload)
