"""The API's way into the cluster: pooled binary links, reads routed to owners.

Every HTTP request becomes one operation of docs/protocol.md on a pooled
:class:`~plexichat.node.transport.Link` authenticated with a ``service``
token of the cluster (made from the node's credentials; none when the node
runs ``--insecure``):

* SEND goes to the node the API runs next to (it forwards to the owner);
* FETCH and SUBSCRIBE go to the channel's owner (a node answers reads from
  its own store and does not forward them, docs/protocol.md "FETCH"), found
  in the node's ring (:class:`NodeRoutes`).

A link that drops reconnects on its next call and says HELLO again.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node.auth import Credentials
from plexichat.node.transport import ConnectionLost, Link, RemoteError

if TYPE_CHECKING:
    from plexichat.node.server import Node

T = wire.MessageType

__all__ = [
    "ConnectionLost",
    "Gateway",
    "NodeRoutes",
    "RemoteError",
    "Routes",
    "StaticRoutes",
    "Unavailable",
]

SERVICE_SENDER = 1  # the sub of the gateway's own service token (never a sender)


class Unavailable(Exception):
    """No node can serve this channel now (no owner known, or unreachable)."""


class Routes(Protocol):
    """Where the API sends its operations."""

    def local(self) -> tuple[str, int]:
        """The binary address of the node the API runs next to."""

    def owner(self, channel: int) -> tuple[str, int] | None:
        """The binary address of *channel*'s owner; None when unknown."""


class NodeRoutes:
    """:class:`Routes` of an in-process :class:`~plexichat.node.server.Node`."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def local(self) -> tuple[str, int]:
        host = self.node.config.listen_host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return host, self.node.listen_port

    def owner(self, channel: int) -> tuple[str, int] | None:
        owners = self.node.owners(channel)
        if not owners:
            return None
        if owners[0] == self.node.id:
            return self.local()
        membership = self.node.membership
        return None if membership is None else membership.address(owners[0])


class StaticRoutes:
    """:class:`Routes` to one node for everything (a one-node cluster, tests)."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)

    def local(self) -> tuple[str, int]:
        return self.address

    def owner(self, channel: int) -> tuple[str, int] | None:
        return self.address


class Gateway:
    """Pools of links to nodes (*pool* links per address, used round robin)."""

    def __init__(
        self,
        routes: Routes,
        credentials: Credentials | None,
        *,
        pool: int = 4,
        timeout: float = 10.0,
        max_frame: int = wire.MAX_PAYLOAD,
    ) -> None:
        self.routes = routes
        self.timeout = timeout
        self.max_frame = max_frame
        self.pool_size = max(1, pool)
        hello: dict[str, object] = {"version": p.PROTOCOL_VERSION, "role": "client"}
        if credentials is not None:
            hello["token"] = credentials.token(SERVICE_SENDER, role="service")
        self.hello = p.encode_json(hello)
        self._pools: dict[tuple[str, int], list[Link]] = {}
        self._turns: dict[tuple[str, int], itertools.cycle[int]] = {}
        self.closed = False

    def link(self, address: tuple[str, int]) -> Link:
        """The next pooled link to *address* (made on first use)."""
        if self.closed:
            raise ConnectionLost("the API is stopping")
        links = self._pools.get(address)
        if links is None:
            links = [self.new_link(address) for _ in range(self.pool_size)]
            self._pools[address] = links
            self._turns[address] = itertools.cycle(range(self.pool_size))
        index = next(self._turns[address])
        link = links[index]
        if link.closed:  # (never: pooled links are closed by close() only)
            link = links[index] = self.new_link(address)
        return link

    def new_link(
        self,
        address: tuple[str, int],
        on_push: Callable[[wire.Frame], None] | None = None,
        on_close: Callable[[Link], None] | None = None,
    ) -> Link:
        """A link to *address* that says HELLO with the service token on
        every (re)connect; *on_push* gets frames that answer no request."""
        return Link(
            address[0],
            address[1],
            max_payload=self.max_frame,
            hello=self.hello,
            on_push=on_push,
            on_close=on_close,
        )

    def owner(self, channel: int) -> tuple[str, int]:
        address = self.routes.owner(channel)
        if address is None:
            raise Unavailable("no owner of the channel is known (too few live nodes)")
        return address

    async def send(
        self, channel: int, msg_id: bytes, sender: int, payload: bytes
    ) -> int:
        """SEND through the local node; the seq once acknowledged."""
        link = self.link(self.routes.local())
        frame = await link.call(
            T.SEND, p.encode_send(channel, msg_id, sender, payload), self.timeout
        )
        return p.decode_ack(frame.payload)[1]

    async def fetch(
        self, channel: int, after: int, limit: int
    ) -> tuple[list[p.Record], bool]:
        """FETCH one page at the channel's owner."""
        link = self.link(self.owner(channel))
        frame = await link.call(
            T.FETCH, p.encode_fetch(channel, after, limit), self.timeout
        )
        _, records, more = p.decode_messages(frame.payload)
        return records, more

    async def close(self) -> None:
        self.closed = True
        pools, self._pools = self._pools, {}
        for links in pools.values():
            for link in links:
                await link.aclose()
        await asyncio.sleep(0)
