"""Control ops: HELLO/WELCOME, PING, GOSSIP and STATS (with :meth:`Control.info`)."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from plexichat import accel, wire
from plexichat.node import auth
from plexichat.node import protocol as p
from plexichat.node.order import Role
from plexichat.node.transport import FrameConnection
from plexichat.stats import Histogram

if TYPE_CHECKING:
    from plexichat.node.server import Node

T = wire.MessageType
log = logging.getLogger("plexichat.node")

# What a connection may send (docs/protocol.md, "Authentication").
ANONYMOUS_OPS = frozenset({T.HELLO, T.PING})
CLIENT_OPS = ANONYMOUS_OPS | {T.SEND, T.FETCH, T.SUBSCRIBE, T.STATS, T.RELAY}
PEER_OPS = CLIENT_OPS | {T.GOSSIP, T.REPLICATE, T.HANDOFF}
MAX_NODE_ID = 64  # characters of a peer's node id


class Control:
    """The control-op handlers of *node*."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def on_hello(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        node = self.node
        body = p.decode_json(payload)
        version = body.get("version")
        if version != p.PROTOCOL_VERSION:
            node.error(
                conn,
                rid,
                p.ErrorCode.BAD_VERSION,
                f"protocol version {version!r} unsupported (want {p.PROTOCOL_VERSION})",
            )
            conn.close()
            return
        creds = node.credentials
        try:
            if body.get("role") == "peer":
                if creds is None:  # an insecure node: peers are whoever says so
                    self._admit_peer(conn, _node_id(body))
                    node.authenticated(conn)
                    reply = self._welcome()
                else:
                    reply = self._peer_hello(conn, creds, body)
            else:
                reply = self._welcome()
                if creds is not None and "token" in body:
                    identity = creds.verify_token(body["token"])
                    conn.role = "client"
                    conn.sender = identity.sender
                    # service and admin identities may send as any sender
                    conn.sender_prefix = (
                        None
                        if identity.any_sender
                        else identity.sender.to_bytes(8, "big")
                    )
                    conn.admin = identity.admin
                    conn.allowed = CLIENT_OPS
                    node.authenticated(conn)
                    reply["sender"] = identity.sender
                    reply["role"] = identity.role
        except auth.AuthError as exc:
            node.counters["auth_failures"] += 1
            log.warning(
                "refused HELLO from %s: %s",
                conn.peername,
                exc,
                extra={"event": "auth_failed", "peer": conn.peername},
            )
            node.error(conn, rid, p.ErrorCode.UNAUTHENTICATED, str(exc))
            conn.close()
            return
        conn.send(T.WELCOME, rid, p.encode_json(reply))

    def _peer_hello(
        self, conn: FrameConnection, creds: auth.Credentials, body: dict[str, Any]
    ) -> dict[str, Any]:
        """One step of the peer handshake: a challenge for the first HELLO,
        admission for a second one whose proof verifies."""
        node = self.node
        if "proof" not in body:
            client_nonce = auth.parse_nonce(body.get("nonce"))
            claimed = _node_id(body)
            server_nonce = auth.new_nonce()
            conn.data["peer_hello"] = (client_nonce, server_nonce, claimed)
            ids = auth.peer_ids(claimed, node.id)
            return {
                **self._welcome(),
                "nonce": server_nonce.hex(),
                "proof": creds.server_proof(client_nonce, server_nonce, ids),
            }
        started = conn.data.pop("peer_hello", None)
        if started is None:
            raise auth.AuthError("a peer proof needs a HELLO with a nonce first")
        client_nonce, server_nonce, claimed = started
        ids = auth.peer_ids(claimed, node.id)
        creds.check(
            body.get("proof"), creds.client_proof(client_nonce, server_nonce, ids)
        )
        self._admit_peer(conn, claimed)
        node.authenticated(conn)
        return {"version": p.PROTOCOL_VERSION, "node_id": node.id, "peer": True}

    @staticmethod
    def _admit_peer(conn: FrameConnection, node_id: str) -> None:
        conn.role = "peer"
        conn.peer_id = node_id
        conn.admin = True
        conn.allowed = PEER_OPS

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
        if (
            body
            and conn.role == "peer"
            and node.membership is not None
            and not node.stopping
        ):
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
        if body.get("reset") and not conn.admin:
            node.refuse(conn, rid, p.ErrorCode.FORBIDDEN, "STATS reset needs an admin")
            return
        blobs = {name: hist.to_bytes() for name, hist in node.hist.items()}
        conn.send(T.STATS_REPLY, rid, p.encode_stats_reply(node.info(), blobs))
        reset = body.get("reset") or []
        if isinstance(reset, list):
            for name in reset:
                if name in node.hist:
                    node.hist[name] = Histogram()


def _node_id(body: dict[str, Any]) -> str:
    node_id = body.get("node_id")
    if not isinstance(node_id, str) or not 0 < len(node_id) <= MAX_NODE_ID:
        raise auth.AuthError(
            f"a peer HELLO names a node id of 1 .. {MAX_NODE_ID} chars"
        )
    return node_id
