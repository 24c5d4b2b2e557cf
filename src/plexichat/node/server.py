"""The PlexiChat node: framed TCP server, sharding, channel order, relay.

:class:`Node` is the composition root: it routes frames, keeps the ring
(membership), and delegates the owner's write path to
:class:`~plexichat.node.writes.WritePath`, channel ownership (terms,
takeovers, the replica side of APPEND) to
:class:`~plexichat.node.channels.ChannelOrder`, peer links to
:class:`~plexichat.node.peers.PeerLinks` and relay to
:class:`~plexichat.node.relay.Relayer`.  A SEND that reaches a node which
does not own the channel is forwarded to the owner and the owner's reply is
relayed back.  Readers (FETCH, SUBSCRIBE/DELIVER) see only committed records.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from plexichat import accel, wire
from plexichat.cache import LRUCache
from plexichat.node import protocol as p
from plexichat.node.channels import ChannelOrder
from plexichat.node.counters import NodeCounters, new_counters
from plexichat.node.gcstats import GCPauses
from plexichat.node.idfilter import IdFilter
from plexichat.node.membership import MONOTONIC, Clock, GossipConfig, Membership
from plexichat.node.order import Role
from plexichat.node.peers import PeerLinks
from plexichat.node.relay import Relayer
from plexichat.node.store import Engine, MessageStore, Synchronous, open_store
from plexichat.node.transport import FrameConnection, Link
from plexichat.node.writes import WritePath
from plexichat.routing import Ring
from plexichat.stats import Histogram

log = logging.getLogger("plexichat.node")


T = wire.MessageType
HISTOGRAMS: Final = ("send", "forward", "replicate", "fetch", "relay")

SendItem = tuple[FrameConnection, int, int, bytes, int, bytes, int, tuple[str, ...]]


@dataclass
class NodeConfig:
    """Everything a node needs to run (see ``plexichat-node --help``)."""

    node_id: str
    data_dir: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    advertise_host: str | None = None
    advertise_port: int | None = None
    source_address: str | None = None  # bind outgoing peer connections here
    seeds: list[tuple[str, int]] = field(default_factory=list)
    replicas: int = 2
    weight: float = 1.0
    gossip: GossipConfig = field(default_factory=GossipConfig)
    replicate_timeout: float = 5.0
    forward_timeout: float = 5.0
    sync_timeout: float = 1.0
    read_timeout: float = 10.0
    idle_timeout: float = 600.0
    max_frame: int = wire.MAX_PAYLOAD
    max_message: int = 256 * 1024
    synchronous: Synchronous = "normal"
    commit_interval: float = 0.002  # group commit: min seconds between commits
    store: Engine = "sqlite"  # see plexichat.node.store ("memory": not durable)
    cache_capacity: int = 65536
    handoff_batch: int = 512  # records per log pull / install APPEND
    handoff_delay: float = 0.5  # ring must be stable this long before a rebalance
    # An owner numbers writes only while a majority answered it within this
    # many seconds (0: 3/4 of the suspicion timeout).  Terms keep the order
    # safe without it when replicas >= 2; with one replica it is what stops
    # a cut-off owner from committing alone.
    lease: float = 0.0
    fetch_limit: int = 1000


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) as a tuple."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _arrival(item: SendItem) -> int:
    return item[6]


def whole_seqs(rows: list[p.Record], limit: int) -> list[p.Record]:
    """The longest prefix of at most *limit* rows that ends between two sequence
    numbers (at least the first sequence number's rows): a page a reader can
    continue with ``after = last seq`` without skipping anything."""
    if len(rows) <= limit:
        cut = len(rows)
    else:
        cut = max(0, limit)
        while 0 < cut < len(rows) and rows[cut - 1].seq == rows[cut].seq:
            cut -= 1
    if cut == 0 and rows:
        first = rows[0].seq
        cut = next((i for i, r in enumerate(rows) if r.seq != first), len(rows))
    return rows[:cut]


class Node:
    """One PlexiChat node (start with :meth:`start`, stop with :meth:`stop`).

    Leases and suspicion timeouts read *clock* (in-process tests pass
    one they move by hand); waits and I/O timeouts stay on the event loop.
    """

    def __init__(self, config: NodeConfig, *, clock: Clock = MONOTONIC) -> None:
        if config.replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.config = config
        self.clock = clock
        self.id = config.node_id
        self.storage: MessageStore = open_store(
            config.store,
            Path(config.data_dir),
            config.synchronous,
            commit_interval=config.commit_interval,
        )
        self.membership: Membership | None = None
        self.ring: Ring | None = None
        self.ring_members: dict[str, float] = {}
        self.quorum: tuple[int, int] = (0, 0)  # (live, voters) of the last change
        self.epoch = 0
        self.lease = config.lease or config.gossip.suspect_timeout * 0.75
        self._lease_lapsed = False
        capacity = config.cache_capacity
        self.owner_cache: LRUCache[int, tuple[str, ...]] = LRUCache(capacity)
        self.recent: LRUCache[bytes, tuple[int, int]] = LRUCache(capacity)
        # SENDs waiting, in arrival order, until their channel is clear: no
        # takeover running (``taking``), none of its older SENDs being looked
        # up (``looking``: channel -> SENDs in lookup) or forwarded
        # (``forwarding``: channel -> (owner, SENDs in flight))
        self.gates: dict[int, list[SendItem]] = {}
        self.taking: set[int] = set()
        self.looking: dict[int, int] = {}
        self._arrival = 0  # SEND arrival stamps (ns) increase strictly
        self.forwarding: dict[int, tuple[str, int]] = {}
        self.conns: set[FrameConnection] = set()
        self.subscribers: dict[int, set[FrameConnection]] = {}
        self.hist: dict[str, Histogram] = {name: Histogram() for name in HISTOGRAMS}
        self.counters: NodeCounters = new_counters()
        self.advertise: tuple[str, int] = ("", 0)
        self.ready = asyncio.Event()
        self.gc = GCPauses()
        self.started = time.monotonic()
        self._server: asyncio.Server | None = None
        self._sends: list[SendItem] = []
        self._flush_scheduled = False
        self._sends_epoch = 0  # epoch when the queued SENDs were routed
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ring_changed = asyncio.Event()
        self._rebalancing = False
        self._balanced_epoch = -1  # the ring epoch whose rebalance completed
        self._stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.peers = PeerLinks(
            self.id,
            clock=clock,
            resolve=self._address,
            spawn=self._spawn,
            stopping=lambda: self._stopping,
            max_payload=config.max_frame,
            source_address=config.source_address,
            connect_timeout=config.forward_timeout,
        )
        self.relayer = Relayer(
            self.id,
            members=lambda: self.ring_members,
            resolve=self._address,
            post=self.peers.post,
            counters=self.counters,
            hist=self.hist,
            capacity=capacity,
        )
        self.order = ChannelOrder(
            self.id,
            storage=self.storage,
            peers=self.peers,
            voters=self._voters,
            counters=self.counters,
            hist=self.hist,
            spawn=self._spawn,
            on_commit=self._committed_elsewhere,
            on_stored=self._note_ids,
            call_timeout=max(config.sync_timeout, 2 * config.gossip.ping_timeout),
            data_timeout=config.replicate_timeout,
            batch=config.handoff_batch,
        )
        self.writes = WritePath(self)
        self.ids = IdFilter()  # (channel, msg_id) pairs this node may store
        self._handlers: dict[int, Callable[[FrameConnection, int, bytes], None]] = {
            T.HELLO: self._on_hello,
            T.REPLICATE: self._on_replicate,
            T.FETCH: self._on_fetch,
            T.SUBSCRIBE: self._on_subscribe,
            T.RELAY: self.relayer.on_relay,
            T.STATS: self._on_stats,
            T.GOSSIP: self._on_gossip,
            T.HANDOFF: self._on_handoff,
            T.PING: self._on_ping,
        }

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Open storage, listen, join the cluster."""
        config = self.config
        self.loop = asyncio.get_running_loop()
        self.storage.open()
        self.order.load(self.storage.channel_logs())
        self.storage.start(self.loop)
        self._server = await self.loop.create_server(
            self._new_connection,
            config.listen_host,
            config.listen_port,
            reuse_address=True,
            backlog=1024,
        )
        port = self._server.sockets[0].getsockname()[1]
        self.listen_port = int(port)
        self.advertise = (
            config.advertise_host or config.listen_host,
            config.advertise_port or self.listen_port,
        )
        self.membership = Membership(
            self.id,
            self.advertise[0],
            self.advertise[1],
            self.peers,
            weight=config.weight,
            config=config.gossip,
            on_change=self._membership_changed,
            seeds=config.seeds,
            clock=self.clock,
        )
        self._membership_changed()
        self.membership.start()
        self._spawn(self._sweeper(), "sweeper")
        self._spawn(self._rebalancer(), "rebalance")
        self._spawn(self._commit_flusher(), "commits")
        self._spawn(self._load_ids(), "load-ids")
        self._spawn(self._lease_keeper(), "lease")
        self.gc.install()
        self.started = time.monotonic()
        self.ready.set()
        log.info(
            "ready",
            extra={
                "event": "ready",
                "listen": f"{config.listen_host}:{self.listen_port}",
                "advertise": f"{self.advertise[0]}:{self.advertise[1]}",
                "backend": accel.summary(),
                "channels": len(self.order.metas),
                "pid": os.getpid(),
            },
        )

    async def stop(self, *, leave: bool = True) -> None:
        """Leave the cluster, close connections, flush storage."""
        if self._stopping:
            return
        self._stopping = True
        if self.membership is not None:
            await self.membership.stop(leave=leave)
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sends:
            self._flush_sends()
        with contextlib.suppress(Exception):
            await self.order.flush_commits()
        for conn in list(self.conns):
            conn.close()
        self.peers.close()
        await self.storage.close()
        self.gc.uninstall()
        log.info("stopped", extra={"event": "stopped"})

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- connections ------------------------------------------------------------

    def _new_connection(self) -> FrameConnection:
        conn = FrameConnection(
            self._on_frames,
            max_payload=self.config.max_frame,
            on_wire_error=self._on_wire_error,
            on_close=self._on_close,
            server_side=True,
        )
        self.conns.add(conn)
        self.counters["connections"] += 1
        return conn

    def _on_close(self, conn: FrameConnection, exc: BaseException | None) -> None:
        self.conns.discard(conn)
        if conn.overflowed:
            self.counters["slow_readers_closed"] += 1
            log.warning(
                "closed %s: it does not read its replies",
                conn.peername,
                extra={"event": "slow_reader", "peer": conn.peername},
            )
        for channel in conn.data.get("subs", ()):
            subs = self.subscribers.get(channel)
            if subs is not None:
                subs.discard(conn)
                if not subs:
                    del self.subscribers[channel]

    def _on_wire_error(self, conn: FrameConnection, exc: wire.WireError) -> None:
        self.counters["bad_frames"] += 1
        log.warning(
            "bad frame from %s: %s",
            conn.peername,
            exc,
            extra={"event": "bad_frame", "peer": conn.peername, "reason": exc.reason},
        )
        self._error(conn, 0, p.ErrorCode.MALFORMED, f"{exc.reason}: {exc}")

    def _error(self, conn: FrameConnection, rid: int, code: int, message: str) -> None:
        self.counters["errors_sent"] += 1
        conn.send_error(rid, code, message)

    def _on_frames(self, conn: FrameConnection, frames: list[wire.Frame]) -> None:
        now = time.perf_counter_ns()
        handlers = self._handlers
        for frame in frames:
            ftype = frame.type
            if ftype == T.SEND:
                now = self._arrival = max(now, self._arrival + 1)
                self._on_send(conn, frame.request_id, frame.payload, now)
                continue
            handler = handlers.get(ftype)
            if handler is None:
                if ftype != T.ERROR:  # never answer an error with an error
                    self.counters["unknown_ops"] += 1
                    self._error(
                        conn,
                        frame.request_id,
                        p.ErrorCode.UNKNOWN_OP,
                        f"operation {ftype} not accepted",
                    )
                continue
            try:
                handler(conn, frame.request_id, frame.payload)
            except (p.ProtocolError, ValueError, TypeError) as exc:
                self._error(conn, frame.request_id, p.ErrorCode.MALFORMED, str(exc))

    async def _sweeper(self) -> None:
        """Close connections that stall inside a frame or stay idle too long."""
        config = self.config
        period = max(0.05, min(1.0, config.read_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.conns):
                idle = now - conn.last_rx
                if conn.decoder.pending and idle > config.read_timeout:
                    self.counters["timeouts_closed"] += 1
                    log.warning(
                        "closing %s: partial frame stalled for %.1fs",
                        conn.peername,
                        idle,
                        extra={"event": "read_timeout", "peer": conn.peername},
                    )
                    self._error(
                        conn, 0, p.ErrorCode.TIMEOUT, "read timeout inside a frame"
                    )
                    conn.close()
                elif idle > config.idle_timeout and not conn.data.get("subs"):
                    log.info("closing idle connection %s", conn.peername)
                    conn.close()

    # -- membership and ring ------------------------------------------------------

    def _membership_changed(self) -> None:
        assert self.membership is not None
        quorum = self.membership.quorum()
        if quorum != self.quorum:
            had = self.has_quorum
            self.quorum = quorum
            self.owner_cache.clear()
            if had != self.has_quorum and not self._stopping:
                log.warning(
                    "quorum %s",
                    "regained" if self.has_quorum else "lost",
                    extra={"event": "quorum", "live": quorum[0], "voters": quorum[1]},
                )
        live = self.membership.live()
        if live == self.ring_members:
            return
        self.ring = Ring(live)
        self.ring_members = dict(live)
        self.epoch += 1
        self.owner_cache.clear()
        log.info(
            "ring changed",
            extra={"event": "ring", "members": sorted(live), "epoch": self.epoch},
        )
        self._ring_changed.set()

    @property
    def settled(self) -> bool:
        """True once this node took over every channel the ring gives it and
        told the owners of the others (the rebalance of this ring is done)."""
        return (
            self.ring is not None
            and self._balanced_epoch == self.epoch
            and not self._ring_changed.is_set()
            and not self._rebalancing
            and not self.order.takeovers
        )

    def _voters(self) -> list[str]:
        """Members that count for majorities: all that have not left."""
        assert self.membership is not None
        return [m.id for m in self.membership.members.values() if m.status != "left"]

    @property
    def has_quorum(self) -> bool:
        """True while this node sees a majority of the members that have not left."""
        live, voters = self.quorum
        return 2 * live > voters

    def owners(self, channel: int) -> tuple[str, ...] | None:
        """Owner first, then replicas; None while fewer nodes than ``replicas``
        live or while this node is on the minority side of a partition."""
        cached: tuple[str, ...] | None = self.owner_cache.get(channel)
        if cached is not None:
            return cached
        ring = self.ring
        replicas = self.config.replicas
        if ring is None or len(self.ring_members) < replicas or not self.has_quorum:
            return None
        result = tuple(ring.owners(channel, replicas))
        self.owner_cache.put(channel, result)
        return result

    @property
    def links(self) -> dict[tuple[str, int], Link]:
        """Links to peers by address (owned by :attr:`peers`)."""
        return self.peers.links

    @property
    def answered(self) -> dict[tuple[str, int], float]:
        """Peer address -> clock time a request that it answered was sent."""
        return self.peers.answered

    def _address(self, node_id: str) -> tuple[str, int] | None:
        assert self.membership is not None
        return self.membership.address(node_id)

    def lease_valid(self, now: float | None = None) -> bool:
        """True while a majority (this node included) answered within the lease.

        Requests count from the time they were *sent*: a reply that waited
        in a buffer while this node was paused does not renew the lease.
        """
        need = self.quorum[1] // 2
        if need == 0:
            return True
        since = (self.clock.now() if now is None else now) - self.lease
        return self.peers.answered_since(since, need)

    async def _lease_keeper(self) -> None:
        """Ping live peers that have not answered lately (an idle node keeps its
        lease; a busy one renews it through its REPLICATE round trips)."""
        assert self.membership is not None
        period = self.lease / 3
        while True:
            await asyncio.sleep(period)
            since = self.clock.now() - period
            stale = [
                node_id
                for node_id in self.ring_members
                if node_id != self.id
                and self.peers.last_answer(self.membership.address(node_id) or ("", 0))
                < since
            ]
            for node_id in stale:
                self._spawn(self.membership.ping(node_id), "lease-ping")

    # -- SEND ---------------------------------------------------------------------

    def _on_send(
        self, conn: FrameConnection, rid: int, payload: bytes, now: int
    ) -> None:
        if len(payload) < p.SEND_HEAD.size:
            self._error(conn, rid, p.ErrorCode.MALFORMED, "SEND body too short")
            return
        if len(payload) - p.SEND_HEAD.size > self.config.max_message:
            self._error(
                conn,
                rid,
                p.ErrorCode.TOO_LARGE,
                f"message above {self.config.max_message} bytes",
            )
            return
        if self._stopping:
            self._error(conn, rid, p.ErrorCode.SHUTTING_DOWN, "node is stopping")
            return
        channel, msg_id, sender = p.SEND_HEAD.unpack_from(payload)
        if channel in self.gates:  # older SENDs of the channel wait: keep the order
            self.gate(channel, [(conn, rid, channel, msg_id, sender, payload, now, ())])
            return
        owners = self.owners(channel)
        if owners is None:
            self._error(
                conn,
                rid,
                p.ErrorCode.UNAVAILABLE,
                self._unavailable_reason(),
            )
            return
        if owners[0] != self.id:
            if conn.role == "peer":
                self._error(
                    conn,
                    rid,
                    p.ErrorCode.NOT_OWNER,
                    f"{self.id} does not own {channel}",
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
            self._sends_epoch = self.epoch
            assert self.loop is not None
            self.loop.call_soon(self._flush_sends)

    def _unavailable_reason(self) -> str:
        live, voters = self.quorum
        if not self.has_quorum:
            return f"no quorum: {live} of {voters} members reachable"
        return f"{len(self.ring_members)} nodes live, {self.config.replicas} needed"

    def _forwarding_elsewhere(self, channel: int, owner: str) -> bool:
        forwarding = self.forwarding.get(channel)
        return forwarding is not None and forwarding[0] != owner

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
                self._on_send(conn, rid, payload, t0)

    def _forward(
        self,
        conn: FrameConnection,
        rid: int,
        channel: int,
        payload: bytes,
        owner: str,
        t0: int,
    ) -> None:
        self.counters["forwarded"] += 1
        assert self.loop is not None
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
                self._error(
                    conn, rid, p.ErrorCode.UNAVAILABLE, f"forward to {owner}: {error}"
                )
                return
            conn.send(frame.type, rid, frame.payload)
            if frame.type == T.ACK:
                elapsed = max(1, (time.perf_counter_ns() - t0) // 1000)
                self.hist["forward"].record(elapsed)

        state["timer"] = self.loop.call_later(
            self.config.forward_timeout,
            done,
            None,
            TimeoutError("owner did not answer"),
        )
        self.peers.request(owner, T.SEND, payload, done)

    def _flush_sends(self) -> None:
        self._flush_scheduled = False
        batch, self._sends = self._sends, []
        if not batch:
            return
        if self._sends_epoch != self.epoch:
            self.reroute(batch)
            return
        if len(self.ring_members) > 1 and not self.lease_valid():
            self._refuse_without_lease(batch)
            return
        self._lease_lapsed = False
        self.writes.flush(batch)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run *coro* as one of this node's tasks (cancelled by :meth:`stop`)."""
        return self._spawn(coro, name)

    def take_over_then_release(self, channel: int, owners: tuple[str, ...]) -> None:
        """Take *channel* over, then route the SENDs gated behind it again
        (or refuse them all if the takeover failed)."""

        async def run() -> None:
            reason = "node is stopping"
            try:
                reason = await self.order.take_over(channel, owners) or ""
            finally:
                self.taking.discard(channel)
                if reason:
                    for conn, rid, *_ in self.gates.pop(channel, []):
                        self._error(
                            conn,
                            rid,
                            p.ErrorCode.UNAVAILABLE,
                            f"taking channel {channel} over failed: {reason}",
                        )
                else:
                    self.release_if_clear(channel)

        self._spawn(run(), "take-over")

    def _refuse_without_lease(self, batch: list[SendItem]) -> None:
        """No majority answered lately (this node was paused or cut off): the
        others may have taken its channels over, so it writes nothing and
        takes every channel over again before its next write."""
        if not self._lease_lapsed:
            self._lease_lapsed = True
            for meta in self.order.metas.values():
                if meta.role is not Role.FOLLOWER:
                    meta.step_down()
            self.owner_cache.clear()
            self.counters["lease_lapses"] += 1
            log.warning("lease lapsed", extra={"event": "lease", "lease_s": self.lease})
        self.counters["lease_refused"] += len(batch)
        message = f"lease lapsed: no majority answered within {self.lease:g}s"
        for conn, rid, *_ in batch:
            self._error(conn, rid, p.ErrorCode.UNAVAILABLE, message)

    # -- replication, delivery ------------------------------------------------------

    def _on_replicate(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        self.order.on_append(conn, rid, payload)

    def _note_ids(self, records: Iterable[p.Record]) -> None:
        add = self.ids.add
        for rec in records:
            add(rec.channel, rec.msg_id)

    def _committed_elsewhere(self, channel: int, old: int, new: int) -> None:
        """A replica's (or new owner's) commit moved: DELIVER (old, new]."""
        if channel in self.subscribers:
            self._spawn(self._deliver_range(channel, old, new), "deliver")

    async def _deliver_range(self, channel: int, old: int, new: int) -> None:
        after = old
        while after < new:
            rows = await self.storage.fetch(channel, after, self.config.fetch_limit)
            rows = [r for r in rows if r.seq <= new]
            if not rows:
                return
            self.deliver(rows)
            after = rows[-1].seq

    def deliver(self, records: Iterable[p.Record]) -> None:
        """Push committed records to this node's subscribers of their channels."""
        subscribers = self.subscribers
        for rec in records:
            conns = subscribers.get(rec.channel)
            if conns:
                body = p.encode_deliver(rec)
                for conn in conns:
                    conn.send(T.DELIVER, 0, body)
                    self.counters["delivered"] += 1

    def _on_subscribe(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        channel = p.decode_channel(payload)
        self.subscribers.setdefault(channel, set()).add(conn)
        conn.data.setdefault("subs", set()).add(channel)
        commit = self.order.meta(channel).commit
        conn.send(T.ACK, rid, p.encode_ack(channel, commit))

    # -- FETCH --------------------------------------------------------------------

    def _on_fetch(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        channel, after, limit = p.decode_fetch(payload)
        limit = max(1, min(limit, self.config.fetch_limit))
        self.counters["fetches"] += 1
        self._spawn(self._fetch(conn, rid, channel, after, limit), "fetch")

    async def _fetch(
        self, conn: FrameConnection, rid: int, channel: int, after: int, limit: int
    ) -> None:
        t0 = time.perf_counter_ns()
        meta = self.order.metas.get(channel)
        commit = 0 if meta is None else meta.commit
        rows = []
        if after < commit:  # only committed records are visible
            try:
                rows = await self.storage.fetch(
                    channel, after, min(limit, commit - after) + 1
                )
            except Exception as exc:
                self._error(conn, rid, p.ErrorCode.INTERNAL, f"fetch: {exc}")
                return
            rows = [r for r in rows if r.seq <= commit]
        total = len(rows) + (commit > after + len(rows))
        rows = whole_seqs(rows, limit)
        budget = self.config.max_frame - 4096
        size = 0
        for index, rec in enumerate(rows):
            size += p.MESSAGE_RECORD.size + len(rec.payload)
            if size > budget:
                rows = whole_seqs(rows, index)
                break
        more = len(rows) < total
        conn.send(T.MESSAGES, rid, p.encode_messages(channel, rows, more))
        self.hist["fetch"].record(max(1, (time.perf_counter_ns() - t0) // 1000))

    # -- RELAY (P2P fan-out) ----------------------------------------------------------

    def relay_children(self, root: str, fanout: int) -> list[str]:
        """Next hops of this node in the *fanout*-ary tree rooted at *root*."""
        return self.relayer.children(root, fanout)

    # -- control ops ---------------------------------------------------------

    def _on_hello(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        body = p.decode_json(payload)
        version = body.get("version")
        if version != p.PROTOCOL_VERSION:
            self._error(
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
        return {
            "version": p.PROTOCOL_VERSION,
            "node_id": self.id,
            "address": f"{self.advertise[0]}:{self.advertise[1]}",
            "replicas": self.config.replicas,
            "backend": accel.summary(),
        }

    def _on_ping(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        body = p.decode_json(payload)
        if body and self.membership is not None and not self._stopping:
            conn.send(T.PONG, rid, p.encode_json(self.membership.handle_ping(body)))
        else:
            conn.send(T.PONG, rid, b"")

    def _on_gossip(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        body = p.decode_json(payload)

        async def run() -> None:
            assert self.membership is not None
            try:
                reply = await self.membership.handle_gossip(body)
            except ValueError as exc:
                self._error(conn, rid, p.ErrorCode.MALFORMED, str(exc))
                return
            conn.send(T.GOSSIP, rid, p.encode_json(reply))

        self._spawn(run(), "gossip")

    def _on_handoff(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        if conn.role != "peer":
            self._error(conn, rid, p.ErrorCode.UNKNOWN_OP, "HANDOFF is for peers")
            return
        if self.order.on_handoff(conn, rid, payload):
            return
        if p.handoff_kind(payload) is p.HandoffKind.OWN:
            channels = p.decode_own(payload)
            self._spawn(self._on_own(conn, rid, channels), "own")
            return
        raise p.ProtocolError(f"HANDOFF kind {payload[0]} not accepted")

    async def _on_own(
        self, conn: FrameConnection, rid: int, channels: tuple[int, ...]
    ) -> None:
        """Another node says the ring makes this one the owner of *channels*:
        take over those this node's ring agrees on; reply with the failures."""
        failed = await self._take_over_all(
            [(c, o) for c in channels if (o := self.owners(c)) and o[0] == self.id]
        )
        conn.send(T.HANDOFF, rid, p.encode_own(failed))

    async def _take_over_all(
        self, wanted: list[tuple[int, tuple[str, ...]]], concurrency: int = 16
    ) -> list[int]:
        """Take these channels over (those not owned already); the failed ones."""
        limit = asyncio.Semaphore(concurrency)
        failed: list[int] = []

        async def one(channel: int, owners: tuple[str, ...]) -> None:
            async with limit:
                if self.order.meta(channel).owns(owners):
                    return
                if await self.order.take_over(channel, owners):
                    failed.append(channel)

        await asyncio.gather(*(one(c, o) for c, o in wanted))
        return sorted(failed)

    def info(self) -> dict[str, Any]:
        """The JSON part of STATS_REPLY."""
        assert self.membership is not None
        return {
            "node_id": self.id,
            "address": f"{self.advertise[0]}:{self.advertise[1]}",
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "version": p.PROTOCOL_VERSION,
            "backend": accel.summary(),
            "backends": {name: accel.active(name) for name in accel.FAMILIES},
            "replicas": self.config.replicas,
            "epoch": self.epoch,
            "members": self.membership.view(),
            "ring": sorted(self.ring_members),
            "settled": self.settled,
            "owned": sum(m.role is Role.OWNER for m in self.order.metas.values()),
            "incarnation": self.membership.me.incarnation,
            "counters": dict(self.counters),
            "gossip": dict(self.membership.counters),
            "storage": {
                "commits": self.storage.stats.commits,
                "rows_inserted": self.storage.stats.rows_inserted,
                "rows_ignored": self.storage.stats.rows_ignored,
                "largest_group": self.storage.stats.largest_group,
                "errors": self.storage.stats.errors,
                "rows_truncated": self.storage.stats.rows_truncated,
                "channels": len(self.order.metas),
            },
            "caches": {
                "owners": self.owner_cache.stats(),
                "recent": self.recent.stats(),
                "relay_seen": self.relayer.seen.stats(),
            },
            "connections": len(self.conns),
            "gc": self.gc.as_dict(),
        }

    def _on_stats(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        body = p.decode_json(payload)
        blobs = {name: hist.to_bytes() for name, hist in self.hist.items()}
        conn.send(T.STATS_REPLY, rid, p.encode_stats_reply(self.info(), blobs))
        reset = body.get("reset") or []
        if isinstance(reset, list):
            for name in reset:
                if name in self.hist:
                    self.hist[name] = Histogram()

    # -- rebalance on ring change -----------------------------------------------

    async def _rebalancer(self) -> None:
        """Once the ring has been stable for ``handoff_delay``: take over every
        channel it gives this node, and tell the new owners of the others."""
        while True:
            await self._ring_changed.wait()
            while True:
                self._ring_changed.clear()
                epoch = self.epoch
                await asyncio.sleep(self.config.handoff_delay)
                if epoch == self.epoch:
                    break
            if not self.has_quorum:
                continue  # the majority side decides; try again on the next change
            self._rebalancing = True
            try:
                done = await self._rebalance()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rebalance failed")
                done = False
            finally:
                self._rebalancing = False
            if done and epoch == self.epoch:
                self._balanced_epoch = epoch
            else:
                self._ring_changed.set()  # again after handoff_delay

    async def _rebalance(self) -> bool:
        self.counters["handoffs"] += 1
        mine: list[tuple[int, tuple[str, ...]]] = []
        hints: dict[str, list[int]] = {}
        for channel, meta in list(self.order.metas.items()):
            owners = self.owners(channel)
            if owners is None:
                return False
            if owners[0] == self.id:
                if not meta.owns(owners):
                    mine.append((channel, owners))
            elif meta.last or meta.accepted_term:
                hints.setdefault(owners[0], []).append(channel)
        failed = await self._take_over_all(mine)
        ok = not failed
        for target, channels in sorted(hints.items()):
            frame = await self.order.call(
                target,
                T.HANDOFF,
                p.encode_own(channels),
                4 * self.config.replicate_timeout,
            )
            try:
                ok = ok and frame is not None and not p.decode_own(frame.payload)
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

    async def _commit_flusher(self, period: float = 0.5) -> None:
        """Store moved commits now and then (a restart shows at least those)."""
        while True:
            await asyncio.sleep(period)
            await self.order.flush_commits()

    async def _load_ids(self, page: int = 20_000) -> None:
        """Put the ids stored before start-up into :attr:`ids` (new ones are
        added as they are stored), then let it answer "certainly not"."""
        top = await self.storage.max_rowid()
        after = 0
        add = self.ids.add
        while after < top:
            rows = await self.storage.rows_after(after, top, page)
            if not rows:
                break
            for _, rec in rows:
                add(rec.channel, rec.msg_id)
            after = rows[-1][0]
        self.ids.ready = True
