"""Control ops: HELLO/WELCOME, PING, GOSSIP and STATS (with :meth:`Control.info`)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from plexichat import accel, wire
from plexichat.node import protocol as p
from plexichat.node.order import Role
from plexichat.node.transport import FrameConnection
from plexichat.stats import Histogram

if TYPE_CHECKING:
    from plexichat.node.server import Node

T = wire.MessageType


class Control:
    """The control-op handlers of *node*."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def on_hello(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        body = p.decode_json(payload)
        version = body.get("version")
        if version != p.PROTOCOL_VERSION:
            self.node.error(
                conn,
                rid,
                p.ErrorCode.BAD_VERSION,
                f"protocol version {version!r} unsupported (want {p.PROTOCOL_VERSION})",
            )
            conn.close()
            return
        if body.get("role") == "peer":
            conn.role = "peer"
            conn.peer_id = str(body.get("node_id", ""))
        conn.send(T.WELCOME, rid, p.encode_json(self._welcome()))

    def _welcome(self) -> dict[str, Any]:
        node = self.node
        return {
            "version": p.PROTOCOL_VERSION,
            "node_id": node.id,
            "address": f"{node.advertise[0]}:{node.advertise[1]}",
            "replicas": node.config.replicas,
            "backend": accel.summary(),
        }

    def on_ping(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        node = self.node
        body = p.decode_json(payload)
        if body and node.membership is not None and not node.stopping:
            conn.send(T.PONG, rid, p.encode_json(node.membership.handle_ping(body)))
        else:
            conn.send(T.PONG, rid, b"")

    def on_gossip(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        node = self.node
        body = p.decode_json(payload)

        async def run() -> None:
            assert node.membership is not None
            try:
                reply = await node.membership.handle_gossip(body)
            except ValueError as exc:
                node.error(conn, rid, p.ErrorCode.MALFORMED, str(exc))
                return
            conn.send(T.GOSSIP, rid, p.encode_json(reply))

        node.spawn(run(), "gossip")

    def info(self) -> dict[str, Any]:
        """The JSON part of STATS_REPLY."""
        node = self.node
        assert node.membership is not None
        return {
            "node_id": node.id,
            "address": f"{node.advertise[0]}:{node.advertise[1]}",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - node.started, 3),
            "version": p.PROTOCOL_VERSION,
            "backend": accel.summary(),
            "backends": {name: accel.active(name) for name in accel.FAMILIES},
            "replicas": node.config.replicas,
            "epoch": node.epoch,
            "members": node.membership.view(),
            "ring": sorted(node.ring_members),
            "settled": node.settled,
            "owned": sum(m.role is Role.OWNER for m in node.order.metas.values()),
            "incarnation": node.membership.me.incarnation,
            "counters": dict(node.counters),
            "gossip": dict(node.membership.counters),
            "storage": {
                "commits": node.storage.stats.commits,
                "rows_inserted": node.storage.stats.rows_inserted,
                "rows_ignored": node.storage.stats.rows_ignored,
                "largest_group": node.storage.stats.largest_group,
                "errors": node.storage.stats.errors,
                "rows_truncated": node.storage.stats.rows_truncated,
                "channels": len(node.order.metas),
            },
            "caches": {
                "owners": node.owner_cache.stats(),
                "recent": node.recent.stats(),
                "relay_seen": node.relayer.seen.stats(),
            },
            "connections": len(node.conns),
            "gc": node.gc.as_dict(),
        }

    def on_stats(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        node = self.node
        body = p.decode_json(payload)
        blobs = {name: hist.to_bytes() for name, hist in node.hist.items()}
        conn.send(T.STATS_REPLY, rid, p.encode_stats_reply(node.info(), blobs))
        reset = body.get("reset") or []
        if isinstance(reset, list):
            for name in reset:
                if name in node.hist:
                    node.hist[name] = Histogram()
