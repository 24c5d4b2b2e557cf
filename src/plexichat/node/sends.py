"""Where a SEND goes: refused, forwarded to the owner, or queued for numbering.

A SEND is refused when malformed, too large, while the node stops or while
no owner is known (no quorum, too few nodes); a SEND for a channel that
another node owns is forwarded to that owner and the owner's reply relayed
back; the SENDs this node owns that arrive in one event-loop turn go to the
owner's write path (:class:`~plexichat.node.writes.WritePath`) as one batch,
unless the ring moved meanwhile or the lease lapsed.  A channel's SENDs
wait in its *gate*, in arrival order, while anything older of the channel
is in flight (a takeover, a store lookup, a forward to another owner), so a
sender's pipelined SENDs are numbered, forwarded or refused in the order
they came.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING, Any

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node.order import Role
from plexichat.node.transport import FrameConnection

if TYPE_CHECKING:
    from plexichat.node.server import Node, SendItem

log = logging.getLogger("plexichat.node")

T = wire.MessageType


def _arrival(item: SendItem) -> int:
    return item[6]


class SendRouter:
    """The SEND admission, gates and forwards of *node* (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # SENDs waiting, in arrival order, until their channel is clear: no
        # takeover running (``taking``), none of its older SENDs being looked
        # up (``looking``: channel -> SENDs in lookup) or forwarded
        # (``forwarding``: channel -> (owner, SENDs in flight))
        self.gates: dict[int, list[SendItem]] = {}
        self.taking: set[int] = set()
        self.looking: dict[int, int] = {}
        self.arrival = 0  # SEND arrival stamps (ns) increase strictly
        self.forwarding: dict[int, tuple[str, int]] = {}
        self._sends: list[SendItem] = []
        self._flush_scheduled = False
        self._sends_epoch = 0  # epoch when the queued SENDs were routed
        self._lease_lapsed = False

    def on_send(
        self, conn: FrameConnection, rid: int, payload: bytes, now: int
    ) -> None:
        """Route one SEND (*now*: its arrival stamp)."""
        node = self.node
        if len(payload) < p.SEND_HEAD.size:
            node.error(conn, rid, p.ErrorCode.MALFORMED, "SEND body too short")
            return
        if len(payload) - p.SEND_HEAD.size > node.config.max_message:
            node.error(
                conn,
                rid,
                p.ErrorCode.TOO_LARGE,
                f"message above {node.config.max_message} bytes",
            )
            return
        if node.stopping:
            node.error(conn, rid, p.ErrorCode.SHUTTING_DOWN, "node is stopping")
            return
        channel, msg_id, sender = p.SEND_HEAD.unpack_from(payload)
        prefix = conn.sender_prefix
        if prefix is not None and (
            sender != conn.sender or not msg_id.startswith(prefix)
        ):
            node.refuse(
                conn,
                rid,
                p.ErrorCode.FORBIDDEN,
                f"sender and the first 8 bytes of msg_id must be {conn.sender}",
            )
            return
        if channel in self.gates:  # older SENDs of the channel wait: keep the order
            self.gate(channel, [(conn, rid, channel, msg_id, sender, payload, now, ())])
            return
        owners = node.owners(channel)
        if owners is None:
            node.error(
                conn,
                rid,
                p.ErrorCode.UNAVAILABLE,
                self._unavailable_reason(),
            )
            return
        if owners[0] != node.id:
            if conn.role == "peer":
                node.error(
                    conn,
                    rid,
                    p.ErrorCode.NOT_OWNER,
                    f"{node.id} does not own {channel}",
                )
            elif self.looking.get(channel) or self._forwarding_elsewhere(
                channel, owners[0]
            ):
                self.gate(
                    channel, [(conn, rid, channel, msg_id, sender, payload, now, ())]
                )
            else:
                self._forward(conn, rid, channel, payload, owners[0], now)
            return
        if channel in self.forwarding:  # forwarded ones first
            self.gate(channel, [(conn, rid, channel, msg_id, sender, payload, now, ())])
            return
        self._sends.append((conn, rid, channel, msg_id, sender, payload, now, owners))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._sends_epoch = node.epoch
            assert node.loop is not None
            node.loop.call_soon(self._flush_sends)

    def _unavailable_reason(self) -> str:
        node = self.node
        live, voters = node.quorum
        if not node.has_quorum:
            return f"no quorum: {live} of {voters} members reachable"
        return f"{len(node.ring_members)} nodes live, {node.config.replicas} needed"

    def _forwarding_elsewhere(self, channel: int, owner: str) -> bool:
        forwarding = self.forwarding.get(channel)
        return forwarding is not None and forwarding[0] != owner

    # -- gates ------------------------------------------------------------------

    def gate(
        self,
        channel: int,
        items: list[SendItem],
        *,
        take_over: tuple[str, ...] | None = None,
    ) -> None:
        """Hold *items* in *channel*'s gate (kept in arrival order) until the
        channel is clear (see :meth:`release_if_clear`); with *take_over*,
        take the channel over with that config first.  A sender's pipelined
        SENDs are numbered, forwarded or refused in the order they came."""
        gate = self.gates.setdefault(channel, [])
        for item in items:
            if not gate or gate[-1][6] < item[6]:
                gate.append(item)
            else:
                bisect.insort(gate, item, key=_arrival)
        if take_over is not None and channel not in self.taking:
            self.taking.add(channel)
            self.take_over_then_release(channel, take_over)
        self.release_if_clear(channel)

    def release_if_clear(self, channel: int) -> None:
        """Route a gated channel's SENDs again once nothing older is in flight."""
        if (
            channel in self.gates
            and channel not in self.taking
            and not self.looking.get(channel)
            and channel not in self.forwarding
        ):
            self.reroute(self.gates.pop(channel))

    def reroute(self, items: list[SendItem]) -> None:
        """Route SENDs again, in order: the ring changed since their owners were
        computed (an old owner must not assign sequence numbers any more)."""
        for conn, rid, _channel, _msg_id, _sender, payload, t0, _owners in items:
            if not conn.closed:
                self.on_send(conn, rid, payload, t0)

    def take_over_then_release(self, channel: int, owners: tuple[str, ...]) -> None:
        """Take *channel* over, then route the SENDs gated behind it again
        (or refuse them all if the takeover failed)."""
        node = self.node

        async def run() -> None:
            reason = "node is stopping"
            try:
                reason = await node.order.take_over(channel, owners) or ""
            finally:
                self.taking.discard(channel)
                if reason:
                    for conn, rid, *_ in self.gates.pop(channel, []):
                        node.error(
                            conn,
                            rid,
                            p.ErrorCode.UNAVAILABLE,
                            f"taking channel {channel} over failed: {reason}",
                        )
                else:
                    self.release_if_clear(channel)

        node.spawn(run(), "take-over")

    # -- forward, flush -----------------------------------------------------------

    def _forward(
        self,
        conn: FrameConnection,
        rid: int,
        channel: int,
        payload: bytes,
        owner: str,
        t0: int,
    ) -> None:
        node = self.node
        node.counters["forwarded"] += 1
        assert node.loop is not None
        state: dict[str, Any] = {}
        _, count = self.forwarding.get(channel, (owner, 0))
        self.forwarding[channel] = (owner, count + 1)

        def done(frame: wire.Frame | None, error: BaseException | None) -> None:
            if state.get("done"):
                return
            state["done"] = True
            target, left = self.forwarding[channel]
            if left > 1:
                self.forwarding[channel] = (target, left - 1)
            else:
                del self.forwarding[channel]
                self.release_if_clear(channel)
            timer = state.get("timer")
            if timer is not None:
                timer.cancel()
            if frame is None:
                node.error(
                    conn, rid, p.ErrorCode.UNAVAILABLE, f"forward to {owner}: {error}"
                )
                return
            conn.send(frame.type, rid, frame.payload)
            if frame.type == T.ACK:
                elapsed = max(1, (time.perf_counter_ns() - t0) // 1000)
                node.hist["forward"].record(elapsed)

        state["timer"] = node.loop.call_later(
            node.config.forward_timeout,
            done,
            None,
            TimeoutError("owner did not answer"),
        )
        node.peers.request(owner, T.SEND, payload, done)

    def drain(self) -> None:
        """Route the SENDs queued for this loop turn now (the node stops)."""
        if self._sends:
            self._flush_sends()

    def _flush_sends(self) -> None:
        node = self.node
        self._flush_scheduled = False
        batch, self._sends = self._sends, []
        if not batch:
            return
        if self._sends_epoch != node.epoch:
            self.reroute(batch)
            return
        if len(node.ring_members) > 1 and not node.lease_valid():
            self._refuse_without_lease(batch)
            return
        self._lease_lapsed = False
        node.writes.flush(batch)

    def _refuse_without_lease(self, batch: list[SendItem]) -> None:
        """No majority answered lately (this node was paused or cut off): the
        others may have taken its channels over, so it writes nothing and
        takes every channel over again before its next write."""
        node = self.node
        if not self._lease_lapsed:
            self._lease_lapsed = True
            for meta in node.order.metas.values():
                if meta.role is not Role.FOLLOWER:
                    meta.step_down()
            node.owner_cache.clear()
            node.counters["lease_lapses"] += 1
            log.warning("lease lapsed", extra={"event": "lease", "lease_s": node.lease})
        node.counters["lease_refused"] += len(batch)
        message = f"lease lapsed: no majority answered within {node.lease:g}s"
        for conn, rid, *_ in batch:
            node.error(conn, rid, p.ErrorCode.UNAVAILABLE, message)
