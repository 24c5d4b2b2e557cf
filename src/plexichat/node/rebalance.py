"""Rebalance after ring changes, and the HANDOFF requests peers send.

Once the ring has been stable for ``handoff_delay`` (and this node is on the
majority side), the node takes over every channel the ring gives it and
tells the new owner of each other channel it holds records of (HANDOFF
OWN); the receiver takes over those its own ring agrees on and answers with
the ones it failed to.  The other HANDOFF kinds (takeover messages) go to
:class:`~plexichat.node.channels.ChannelOrder`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from plexichat import wire
from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p
from plexichat.node.transport import FrameConnection

if TYPE_CHECKING:
    from plexichat.node.server import Node

log = logging.getLogger("plexichat.node")

T = wire.MessageType


class Rebalancer:
    """The rebalance loop and HANDOFF handler of *node*."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ring_changed = asyncio.Event()
        self.rebalancing = False
        self.balanced_epoch = -1  # the ring epoch whose rebalance completed

    @property
    def settled(self) -> bool:
        """True once this node took over every channel the ring gives it and
        told the owners of the others (the rebalance of this ring is done)."""
        node = self.node
        return (
            node.ring is not None
            and self.balanced_epoch == node.epoch
            and not self.ring_changed.is_set()
            and not self.rebalancing
            and not node.order.takeovers
        )

    async def run(self) -> None:
        """Once the ring has been stable for ``handoff_delay``: take over every
        channel it gives this node, and tell the new owners of the others."""
        node = self.node
        while True:
            await self.ring_changed.wait()
            while True:
                self.ring_changed.clear()
                epoch = node.epoch
                await asyncio.sleep(node.config.handoff_delay)
                if epoch == node.epoch:
                    break
            if not node.has_quorum:
                continue  # the majority side decides; try again on the next change
            self.rebalancing = True
            try:
                done = await self._rebalance()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rebalance failed")
                done = False
            finally:
                self.rebalancing = False
            if done and epoch == node.epoch:
                self.balanced_epoch = epoch
            else:
                self.ring_changed.set()  # again after handoff_delay

    async def _rebalance(self) -> bool:
        node = self.node
        node.counters["handoffs"] += 1
        mine: list[tuple[int, tuple[str, ...]]] = []
        hints: dict[str, list[int]] = {}
        for channel, meta in list(node.order.metas.items()):
            owners = node.owners(channel)
            if owners is None:
                return False
            if owners[0] == node.id:
                if not meta.owns(owners):
                    mine.append((channel, owners))
            elif meta.last or meta.accepted_term:
                hints.setdefault(owners[0], []).append(channel)
        failed = await self.take_over_all(mine)
        ok = not failed
        for target, channels in sorted(hints.items()):
            frame = await node.order.call(
                target,
                T.HANDOFF,
                pp.encode_own(channels),
                4 * node.config.replicate_timeout,
            )
            try:
                ok = ok and frame is not None and not pp.decode_own(frame.payload)
            except p.ProtocolError:
                ok = False
        log.info(
            "rebalance",
            extra={
                "event": "handoff",
                "taken": len(mine) - len(failed),
                "failed": len(failed),
                "hinted": sum(map(len, hints.values())),
            },
        )
        return ok

    async def take_over_all(
        self, wanted: list[tuple[int, tuple[str, ...]]], concurrency: int = 16
    ) -> list[int]:
        """Take these channels over (those not owned already); the failed ones."""
        order = self.node.order
        limit = asyncio.Semaphore(concurrency)
        failed: list[int] = []

        async def one(channel: int, owners: tuple[str, ...]) -> None:
            async with limit:
                if order.meta(channel).owns(owners):
                    return
                if await order.take_over(channel, owners):
                    failed.append(channel)

        await asyncio.gather(*(one(c, o) for c, o in wanted))
        return sorted(failed)

    # -- HANDOFF ----------------------------------------------------------------

    def on_handoff(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        node = self.node
        if conn.role != "peer":
            node.error(conn, rid, p.ErrorCode.UNKNOWN_OP, "HANDOFF is for peers")
            return
        if node.order.on_handoff(conn, rid, payload):
            return
        if pp.handoff_kind(payload) is p.HandoffKind.OWN:
            channels = pp.decode_own(payload)
            node.spawn(self._on_own(conn, rid, channels), "own")
            return
        raise p.ProtocolError(f"HANDOFF kind {payload[0]} not accepted")

    async def _on_own(
        self, conn: FrameConnection, rid: int, channels: tuple[int, ...]
    ) -> None:
        """Another node says the ring makes this one the owner of *channels*:
        take over those this node's ring agrees on; reply with the failures."""
        node = self.node
        failed = await self.take_over_all(
            [(c, o) for c in channels if (o := node.owners(c)) and o[0] == node.id]
        )
        conn.send(T.HANDOFF, rid, pp.encode_own(failed))
