"""Async client of one PlexiChat node (used by the load generator, the checker,
the lab's cluster orchestration and the tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from ssl import SSLContext
from typing import Any

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node.transport import Link, RemoteError
from plexichat.stats import Histogram

T = wire.MessageType

__all__ = ["NodeClient", "RemoteError", "cluster_view", "connect_all"]


class NodeClient:
    """Request/reply helpers over a :class:`~plexichat.node.transport.Link`."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        token: str | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        self.token = token
        self.host = host
        self.port = port
        self.timeout = timeout
        self.pushes: asyncio.Queue[wire.Frame] = asyncio.Queue()
        self.link = Link(host, port, on_push=self.pushes.put_nowait, ssl=ssl)
        self.welcome: dict[str, Any] = {}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def node_id(self) -> str:
        return str(self.welcome.get("node_id", ""))

    async def connect(self) -> dict[str, Any]:
        """Connect and say HELLO (with the token, if any); return the WELCOME body."""
        hello: dict[str, Any] = {"version": p.PROTOCOL_VERSION, "role": "client"}
        if self.token is not None:
            hello["token"] = self.token
        frame = await self.link.call(T.HELLO, p.encode_json(hello), self.timeout)
        if frame.type != T.WELCOME:
            raise p.ProtocolError(f"expected WELCOME, got type {frame.type}")
        self.welcome = p.decode_json(frame.payload)
        return self.welcome

    async def close(self) -> None:
        await self.link.aclose()

    async def __aenter__(self) -> NodeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(
        self, channel: int, msg_id: bytes, sender: int, payload: bytes
    ) -> int:
        """SEND one message; return its sequence number once acknowledged."""
        frame = await self.link.call(
            T.SEND, p.encode_send(channel, msg_id, sender, payload), self.timeout
        )
        _, seq = p.decode_ack(frame.payload)
        return seq

    async def fetch(
        self, channel: int, after: int = 0, limit: int = 1000
    ) -> tuple[list[p.Record], bool]:
        frame = await self.link.call(
            T.FETCH, p.encode_fetch(channel, after, limit), self.timeout
        )
        _, records, more = p.decode_messages(frame.payload)
        return records, more

    async def fetch_all(self, channel: int, page: int = 1000) -> list[p.Record]:
        """Every stored message of *channel*, following pagination."""
        out: list[p.Record] = []
        after = 0
        while True:
            records, more = await self.fetch(channel, after, page)
            out += records
            if not more or not records:
                return out
            after = records[-1].seq

    async def subscribe(self, channel: int) -> int:
        """SUBSCRIBE; return the channel's last sequence on this node."""
        frame = await self.link.call(
            T.SUBSCRIBE, p.encode_channel(channel), self.timeout
        )
        return p.decode_ack(frame.payload)[1]

    async def relay(self, relay: p.Relay) -> None:
        await self.link.call(T.RELAY, p.encode_relay(relay), self.timeout)

    async def stats(
        self, reset: Iterable[str] = ()
    ) -> tuple[dict[str, Any], dict[str, Histogram]]:
        """STATS: the node's info and its latency histograms."""
        body = p.encode_json({"reset": list(reset)})
        frame = await self.link.call(T.STATS, body, self.timeout)
        info, blobs = p.decode_stats_reply(frame.payload)
        return info, {name: Histogram.from_bytes(blob) for name, blob in blobs.items()}

    async def ping(self) -> None:
        await self.link.call(T.PING, b"", self.timeout)


async def connect_all(
    addresses: Iterable[tuple[str, int]],
    timeout: float = 10.0,
    *,
    token: str | None = None,
    ssl: SSLContext | None = None,
) -> list[NodeClient]:
    """Connect to every address (HELLO included); raise if one is unreachable."""
    clients = [
        NodeClient(h, port, timeout=timeout, token=token, ssl=ssl)
        for h, port in addresses
    ]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
    except BaseException:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        raise
    return clients


async def cluster_view(
    clients: list[NodeClient],
) -> tuple[dict[str, float], int, dict[str, NodeClient]]:
    """``(live {id: weight}, replicas, {id: client})`` as the first node sees it."""
    info, _ = await clients[0].stats()
    live = {
        m["id"]: float(m.get("weight", 1.0))
        for m in info["members"]
        if m["status"] in ("alive", "suspect")
    }
    by_id = {c.node_id: c for c in clients}
    return live, int(info["replicas"]), by_id
