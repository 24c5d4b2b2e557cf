"""The PlexiChat node: framed TCP server, sharding, replication, handoff, relay.

Write path (owner): SEND frames that arrive in one event-loop turn form a
batch.  The owner assigns per-channel sequence numbers, queues the batch to
its :class:`~plexichat.node.store.MessageStore` and sends one
REPLICATE frame per replica and replica set; the ACKs of a replica set go
out (in one write per connection) once the local commit and its replicas'
REPLICATE_ACKs are in, so an unreachable replica fails only the messages it
was meant to hold.  A SEND that reaches a node which does not own the
channel is forwarded to the owner and the owner's reply is relayed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from plexichat import accel, wire
from plexichat.cache import LRUCache
from plexichat.node import protocol as p
from plexichat.node.counters import NodeCounters, new_counters
from plexichat.node.gcstats import GCPauses
from plexichat.node.membership import MONOTONIC, Clock, GossipConfig, Membership
from plexichat.node.peers import NotSent, PeerLinks
from plexichat.node.relay import Relayer
from plexichat.node.store import Engine, MessageStore, Synchronous, open_store
from plexichat.node.transport import (
    ConnectionLost,
    FrameConnection,
    Link,
    RemoteError,
)
from plexichat.routing import Ring
from plexichat.stats import Histogram

log = logging.getLogger("plexichat.node")


T = wire.MessageType
HISTOGRAMS: Final = ("send", "forward", "replicate", "fetch", "relay")
CHUNK_BYTES: Final = 512 * 1024

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
    handoff_batch: int = 512
    handoff_block: int = 256  # seqs per digest block (0: always push whole channels)
    handoff_delay: float = 0.5  # ring must be stable this long before a handoff
    # An owner assigns sequence numbers only while a majority answered it
    # within this many seconds (0: 3/4 of the suspicion timeout: the others
    # declare a node dead at least a suspicion timeout after it stopped
    # answering, so they never take a channel over while it still writes it)
    lease: float = 0.0
    fetch_limit: int = 1000


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) as a tuple."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _micros(elapsed_ns: Iterable[int]) -> np.ndarray[Any, np.dtype[np.int64]]:
    arr = np.fromiter(elapsed_ns, dtype=np.int64)
    arr //= 1000
    np.maximum(arr, 1, out=arr)
    return arr


class _WriteGroup:
    """One owner batch waiting for its local commit and replica acks."""

    __slots__ = (
        "corrections",
        "failed",
        "finished",
        "maybe_copied",
        "node",
        "parts",
        "records",
        "replicas_left",
        "timer",
        "waiters",
    )

    def __init__(
        self,
        node: Node,
        records: list[p.Record],
        waiters: list[tuple[FrameConnection, int, int]],
        parts: int,
    ) -> None:
        self.node = node
        self.records = records
        self.waiters = waiters
        self.parts = parts
        self.replicas_left = parts - 1
        self.maybe_copied = False  # a replica may hold the records
        self.failed = False
        self.finished = False
        self.corrections: dict[int, int] = {}
        self.timer: asyncio.TimerHandle | None = None

    def local_done(
        self, inserted: int, corrections: dict[int, int], error: BaseException | None
    ) -> None:
        if error is not None:
            self.fail(p.ErrorCode.INTERNAL, f"storage: {error}")
            return
        if corrections:
            self.corrections = corrections
        self._part_done()

    def replica_done(
        self, frame: wire.Frame | None, error: BaseException | None
    ) -> None:
        self.replicas_left -= 1
        if frame is not None and frame.type == T.REPLICATE_ACK:
            self.maybe_copied = True
        elif not isinstance(error, NotSent) and frame is None:
            self.maybe_copied = True  # lost in flight or timed out: unknown
        self._replica_result(frame, error)
        if self.failed and self.replicas_left == 0 and not self.maybe_copied:
            # no replica has them and the writer was told they failed: take
            # them back, so that a new owner's numbers do not collide with them
            self.node.roll_back(self.records)

    def _replica_result(
        self, frame: wire.Frame | None, error: BaseException | None
    ) -> None:
        if error is not None or frame is None:
            self.fail(p.ErrorCode.UNAVAILABLE, f"replica: {error}")
        elif frame.type != T.REPLICATE_ACK:
            try:
                reason = p.decode_error(frame.payload)[1]
            except p.ProtocolError:
                reason = f"frame type {frame.type}"
            self.fail(p.ErrorCode.UNAVAILABLE, f"replica refused the write: {reason}")
        else:
            self._part_done()

    def _part_done(self) -> None:
        self.parts -= 1
        if self.parts == 0 and not self.finished:
            self.finish()

    def finish(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        node = self.node
        recent_put = node.recent.put
        corrections = self.corrections
        ack_pack = p.ACK_BODY.pack
        records = self.records
        now = time.perf_counter_ns()
        for index, (conn, rid, _t0) in enumerate(self.waiters):
            rec = records[index]
            seq = corrections.get(index, rec.seq) if corrections else rec.seq
            conn.send(T.ACK, rid, ack_pack(rec.channel, seq))
            recent_put(rec.msg_id, (rec.channel, seq))
        node.counters["acked"] += len(self.waiters)
        node.hist["send"].record_many(_micros(now - w[2] for w in self.waiters))
        if node.subscribers:
            node.deliver(records)

    def fail(self, code: int, message: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.failed = True
        if self.timer is not None:
            self.timer.cancel()
        self.node.counters["send_failed"] += len(self.waiters)
        for conn, rid, _t0 in self.waiters:
            conn.send_error(rid, code, message)

    def expire(self) -> None:
        self.timer = None
        self.maybe_copied = True  # replies still out: they may have arrived
        self.fail(p.ErrorCode.TIMEOUT, "replication timed out")


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


def add_interval(
    intervals: list[tuple[int, int]], lo: int, hi: int
) -> list[tuple[int, int]]:
    """*intervals* (sorted, disjoint ``(lo, hi]``) with ``(lo, hi]`` added."""
    if hi <= lo:
        return intervals
    out: list[tuple[int, int]] = []
    for a, b in intervals:
        if b < lo or a > hi:
            out.append((a, b))
        else:  # overlapping or touching: merge
            lo, hi = min(lo, a), max(hi, b)
    out.append((lo, hi))
    out.sort()
    return out


def gaps(intervals: list[tuple[int, int]], top: int) -> list[tuple[int, int]]:
    """The ``(lo, hi]`` stretches of ``(0, top]`` that *intervals* do not cover."""
    out: list[tuple[int, int]] = []
    at = 0
    for a, b in intervals:
        if a >= top:
            break
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < top:
        out.append((at, top))
    return out


def _local_done_all(
    groups: list[_WriteGroup],
    inserted: int,
    corrections: dict[int, int],
    error: BaseException | None,
) -> None:
    """One storage commit of several write groups: split the corrections."""
    offset = 0
    for group in groups:
        size = len(group.records)
        mine = {
            i - offset: seq
            for i, seq in corrections.items()
            if offset <= i < offset + size
        }
        group.local_done(inserted, mine, error)
        offset += size


class Node:
    """One PlexiChat node (start with :meth:`start`, stop with :meth:`stop`).

    Leases, fences and suspicion timeouts read *clock* (in-process tests pass
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
        self.last_seq: dict[int, int] = {}
        self.synced: dict[int, int] = {}
        # channel -> epoch in which another node claimed it (HANDOFF PULL)
        # (until the view changes or the fence expires: then it syncs again)
        self.fenced: dict[int, tuple[int, float]] = {}
        # Placement: rows whose row id lies in ``placed`` (sorted, disjoint
        # ``(lo, hi]`` intervals) are known to sit on their owners: they were
        # stored while the ring was settled, or pushed to the owners since.
        # Rows in the gaps are pushed at the next handoff round.  ``retry``
        # holds channels (-> lowest seq) whose last push failed.  Both persist
        # in ``placed.json`` so that a kill does not forget them.
        self.placed: list[tuple[int, int]] = []
        self.retry: dict[int, int] = {}
        self._in_transition = True
        self._placed_file = Path(config.data_dir) / "placed.json"
        self.gates: dict[int, list[SendItem]] = {}
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
        self._handoff_base: Ring | None = None
        self._handoff_running = False
        self._ring_file = Path(config.data_dir) / "ring.json"
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
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
        self._loop = asyncio.get_running_loop()
        self.last_seq = self.storage.open()
        self._load_ring_file()
        self._load_placed()
        self.storage.start(self._loop)
        self._server = await self._loop.create_server(
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
        self._spawn(self._handoff_worker(), "handoff")
        self._spawn(self._placement_tracker(), "placement")
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
                "channels": len(self.last_seq),
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
        self.fenced.clear()
        self._in_transition = True
        log.info(
            "ring changed",
            extra={"event": "ring", "members": sorted(live), "epoch": self.epoch},
        )
        self._ring_changed.set()

    @property
    def settled(self) -> bool:
        """True once handoffs have caught up with the current ring."""
        return (
            self.ring is not None
            and self._handoff_base == self.ring
            and not self._ring_changed.is_set()
            and not self._in_transition  # a round is due, still waiting
            and not self._handoff_running
        )

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
            else:
                self._forward(conn, rid, payload, owners[0], now)
            return
        self._sends.append((conn, rid, channel, msg_id, sender, payload, now, owners))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._sends_epoch = self.epoch
            assert self._loop is not None
            self._loop.call_soon(self._flush_sends)

    def _unavailable_reason(self) -> str:
        live, voters = self.quorum
        if not self.has_quorum:
            return f"no quorum: {live} of {voters} members reachable"
        return f"{len(self.ring_members)} nodes live, {self.config.replicas} needed"

    def _reroute(self, items: list[SendItem]) -> None:
        """Route SENDs again, in order: the ring changed since their owners were
        computed (an old owner must not assign sequence numbers any more)."""
        for conn, rid, _channel, _msg_id, _sender, payload, t0, _owners in items:
            if not conn.closed:
                self._on_send(conn, rid, payload, t0)

    def _forward(
        self, conn: FrameConnection, rid: int, payload: bytes, owner: str, t0: int
    ) -> None:
        self.counters["forwarded"] += 1
        assert self._loop is not None
        state: dict[str, Any] = {}

        def done(frame: wire.Frame | None, error: BaseException | None) -> None:
            if state.get("done"):
                return
            state["done"] = True
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

        state["timer"] = self._loop.call_later(
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
        epoch = self.epoch
        if self._sends_epoch != epoch:
            self._reroute(batch)
            return
        if len(self.ring_members) > 1 and not self.lease_valid():
            self._refuse_without_lease(batch)
            return
        self._lease_lapsed = False
        synced = self.synced
        fenced = self.fenced
        now_s = self.clock.now()
        gates = self.gates
        last_seq = self.last_seq
        recent_get = self.recent.get
        ack_pack = p.ACK_BODY.pack
        ts = time.time_ns() // 1000
        head = p.SEND_HEAD.size
        make = p.make_record
        single = len(self.ring_members) <= 1
        # replica set -> (records, waiters): one write group each
        sets: dict[
            tuple[str, ...],
            tuple[list[p.Record], list[tuple[FrameConnection, int, int]]],
        ] = {}
        self.counters["sends"] += len(batch)
        for item in batch:
            conn, rid, channel, msg_id, sender, payload, t0, owners = item
            hit = recent_get(msg_id)
            if hit is not None:
                self.counters["dedup_hits"] += 1
                conn.send(T.ACK, rid, ack_pack(hit[0], hit[1]))
                continue
            fence = fenced.get(channel) if fenced else None
            if fence is not None and fence[0] == epoch and fence[1] <= now_s:
                # the claim is old: learn the channel's state again first
                del fenced[channel]
                synced.pop(channel, None)
                fence = None
            if fence is not None and fence[0] == epoch:
                self.counters["fenced"] += 1
                self._error(
                    conn,
                    rid,
                    p.ErrorCode.UNAVAILABLE,
                    "another node claimed this channel: ownership is moving",
                )
                continue
            gate = gates.get(channel)
            if gate is not None:
                gate.append(item)
                continue
            if synced.get(channel) != epoch:
                if single:
                    synced[channel] = epoch
                else:
                    gates[channel] = [item]
                    self._spawn(self._sync_channel(channel, epoch), "sync")
                    continue
            seq = last_seq.get(channel, 0) + 1
            last_seq[channel] = seq
            rec = make((channel, seq, msg_id, sender, ts, payload[head:], 0))
            entry = sets.get(owners)
            if entry is None:
                entry = sets[owners] = ([], [])
            entry[0].append(rec)
            entry[1].append((conn, rid, t0))
        if not sets:
            return
        assert self._loop is not None
        records: list[p.Record] = []
        groups: list[_WriteGroup] = []
        sends: list[tuple[str, list[p.Record], _WriteGroup]] = []
        for owners, (recs, waiters) in sets.items():
            chunks = [(r, c) for r in owners[1:] for c in self._chunks(recs)]
            group = _WriteGroup(self, recs, waiters, 1 + len(chunks))
            group.timer = self._loop.call_later(
                self.config.replicate_timeout, group.expire
            )
            groups.append(group)
            records += recs
            sends += [(replica, chunk, group) for replica, chunk in chunks]
        if len(groups) == 1:
            self.storage.insert(records, groups[0].local_done)
        else:
            self.storage.insert(records, functools.partial(_local_done_all, groups))
        for replica, chunk, group in sends:
            self.counters["replicate_frames"] += 1
            self.peers.request(
                replica, T.REPLICATE, p.encode_records(chunk), group.replica_done
            )

    def roll_back(self, records: list[p.Record]) -> None:
        """Delete this node's copy of writes that failed before any replica got
        them (their sequence numbers stay used: a new owner numbers after them
        or, not knowing them, reuses them without a collision)."""
        self.counters["rolled_back"] += len(records)
        self._spawn(self.storage.delete_exact(records), "roll-back")

    def _refuse_without_lease(self, batch: list[SendItem]) -> None:
        """No majority answered lately (this node was paused or cut off): the
        others may have taken its channels over, so it writes nothing and
        syncs every channel again before its next write."""
        if not self._lease_lapsed:
            self._lease_lapsed = True
            self.epoch += 1  # every channel syncs again before its next write
            self.owner_cache.clear()
            self.counters["lease_lapses"] += 1
            log.warning("lease lapsed", extra={"event": "lease", "lease_s": self.lease})
        self.counters["lease_refused"] += len(batch)
        message = f"lease lapsed: no majority answered within {self.lease:g}s"
        for conn, rid, *_ in batch:
            self._error(conn, rid, p.ErrorCode.UNAVAILABLE, message)

    @staticmethod
    def _chunks(records: list[p.Record]) -> Iterable[list[p.Record]]:
        size = 0
        chunk: list[p.Record] = []
        for rec in records:
            chunk.append(rec)
            size += p.REPLICA_RECORD.size + len(rec.payload)
            if size >= CHUNK_BYTES:
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    async def _sync_channel(self, channel: int, epoch: int) -> None:
        """Learn the channel's last sequence from every live peer before writing."""
        self.counters["syncs"] += 1
        # every member that has not left, not only the ring: a node this one
        # believes dead may be alive and still think it owns the channel (the
        # PULL fences it); an unreachable one costs at most sync_timeout
        assert self.membership is not None
        peers = [
            m.id
            for m in self.membership.members.values()
            if m.id != self.id and m.status != "left"
        ]
        body = p.encode_handoff_pull(channel)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[wire.Frame | None]] = []
        owners = self.owners(channel) or ()
        required: dict[asyncio.Future[wire.Frame | None], str] = {}
        for peer in peers:
            future: asyncio.Future[wire.Frame | None] = loop.create_future()

            def done(
                frame: wire.Frame | None,
                error: BaseException | None,
                future: asyncio.Future[wire.Frame | None] = future,
            ) -> None:
                if not future.done():
                    future.set_result(frame)

            futures.append(future)
            if peer in owners[1:]:
                required[future] = peer
            self.peers.request(peer, T.HANDOFF, body, done)
        best = self.last_seq.get(channel, 0)
        timeout = max(self.config.sync_timeout, 2 * self.config.gossip.ping_timeout)
        answered: set[asyncio.Future[wire.Frame | None]] = set()
        if futures:
            done_set, _ = await asyncio.wait(futures, timeout=timeout)
            for fut in done_set:
                frame = fut.result()
                if frame is not None and frame.type == T.HANDOFF:
                    with contextlib.suppress(p.ProtocolError):
                        kind, _, last, _ = p.decode_handoff(frame.payload)
                        if kind is p.HandoffKind.SEQ:
                            best = max(best, last)
                            answered.add(fut)
        if best > self.last_seq.get(channel, 0):
            self.last_seq[channel] = best
        silent = sorted(peer for fut, peer in required.items() if fut not in answered)
        if silent:
            # a replica holds every acknowledged write of the channel: without
            # its last sequence number this node could hand out used numbers
            # (after a power cut took its own last commits, for one)
            self.counters["sync_failed"] += 1
            for conn, rid, *_ in self.gates.pop(channel, []):
                self._error(
                    conn,
                    rid,
                    p.ErrorCode.UNAVAILABLE,
                    f"channel sync: no answer from replica {', '.join(silent)}",
                )
            return
        self.synced[channel] = epoch
        pending = self.gates.pop(channel, [])
        if pending and self.epoch != epoch:
            batch, self._sends = pending + self._sends, []
            self._reroute(batch)
        elif pending:
            self._sends = pending + self._sends
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush_sends)

    # -- replication, delivery ------------------------------------------------------

    def _note_records(self, records: list[p.Record]) -> None:
        last_seq = self.last_seq
        for rec in records:
            if rec.seq > last_seq.get(rec.channel, 0):
                last_seq[rec.channel] = rec.seq

    def _on_replicate(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        membership = self.membership
        if (
            conn.peer_id
            and membership is not None
            and membership.status(conn.peer_id) in ("dead", "left")
        ):
            # written by an owner the cluster has routed around (it was
            # paused or cut off): its channels may have a new owner already
            self.counters["replicate_refused"] += 1
            self._error(
                conn, rid, p.ErrorCode.NOT_OWNER, f"{conn.peer_id} is dead here"
            )
            return
        records = p.decode_records(payload)
        self._note_records(records)
        t0 = time.perf_counter_ns()

        def done(
            inserted: int, corrections: dict[int, int], error: BaseException | None
        ) -> None:
            if error is not None:
                self._error(conn, rid, p.ErrorCode.INTERNAL, f"storage: {error}")
                return
            self.counters["replicated"] += len(records)
            conn.send(
                T.REPLICATE_ACK, rid, p.encode_replicate_ack(len(records), inserted)
            )
            self.hist["replicate"].record(max(1, (time.perf_counter_ns() - t0) // 1000))
            if self.subscribers:
                self.deliver(records)

        self.storage.insert(records, done)

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
        conn.send(T.ACK, rid, p.encode_ack(channel, self.last_seq.get(channel, 0)))

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
        try:
            rows = await self.storage.fetch(channel, after, limit + 1)
        except Exception as exc:
            self._error(conn, rid, p.ErrorCode.INTERNAL, f"fetch: {exc}")
            return
        total = len(rows)
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
        kind, channel, _last, records = p.decode_handoff(payload)
        if kind is p.HandoffKind.PULL:
            # The sender owns the channel in its view and is about to write:
            # if this node thinks it is the owner, it stops writing the channel
            # until its own view changes, so the two never assign the same
            # sequence numbers.
            if conn.role == "peer" and conn.peer_id != self.id:
                owners = self.owners(channel)
                if owners is not None and owners[0] == self.id:
                    until = self.clock.now() + 2 * self.lease
                    self.fenced[channel] = (self.epoch, until)
            conn.send(
                T.HANDOFF,
                rid,
                p.encode_handoff_seq(channel, self.last_seq.get(channel, 0)),
            )
            return
        if kind is p.HandoffKind.DIGEST:
            block = max(1, _last)

            async def reply() -> None:
                try:
                    digest = await self.storage.digest(channel, block)
                except Exception as exc:
                    self._error(conn, rid, p.ErrorCode.INTERNAL, f"digest: {exc}")
                    return
                conn.send(T.HANDOFF, rid, p.encode_handoff_blocks(channel, digest))

            self._spawn(reply(), "digest")
            return
        if kind in (p.HandoffKind.SEQ, p.HandoffKind.BLOCKS):
            raise p.ProtocolError(f"HANDOFF {kind.name} is a reply, not a request")
        self._note_records(records)

        def done(
            inserted: int, corrections: dict[int, int], error: BaseException | None
        ) -> None:
            if error is not None:
                self._error(conn, rid, p.ErrorCode.INTERNAL, f"storage: {error}")
                return
            self.counters["handoff_received"] += inserted
            conn.send(
                T.REPLICATE_ACK, rid, p.encode_replicate_ack(len(records), inserted)
            )

        self.storage.insert(records, done)

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
            "incarnation": self.membership.me.incarnation,
            "counters": dict(self.counters),
            "gossip": dict(self.membership.counters),
            "storage": {
                "commits": self.storage.stats.commits,
                "rows_inserted": self.storage.stats.rows_inserted,
                "rows_ignored": self.storage.stats.rows_ignored,
                "largest_group": self.storage.stats.largest_group,
                "errors": self.storage.stats.errors,
                "channels": len(self.last_seq),
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

    # -- handoff on membership change -----------------------------------------

    def _moves(
        self, old: Ring, new: Ring, channels: list[int]
    ) -> list[tuple[int, tuple[str, ...], tuple[str, ...]]]:
        replicas = self.config.replicas
        n_old, n_new = len(old.node_ids), len(new.node_ids)
        if n_old == 0 or n_new == 0:
            return []
        if min(n_old, n_new) >= replicas:
            return [
                (m.key, tuple(m.old), tuple(m.new))
                for m in old.moves(new, channels, replicas)
            ]
        r_old, r_new = min(replicas, n_old), min(replicas, n_new)
        out = []
        for channel in channels:
            before = tuple(old.owners(channel, r_old))
            after = tuple(new.owners(channel, r_new))
            if set(before) != set(after):
                out.append((channel, before, after))
        return out

    def _save_ring(self, ring: Ring) -> None:
        """Persist the ring whose handoff is complete (the base after a restart).

        Written only once every push of the round succeeded: a node killed in
        the middle of a handoff redoes it from the previous base when it
        comes back.
        """
        tmp = self._ring_file.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(ring.as_dict(), sort_keys=True))
            os.replace(tmp, self._ring_file)

    def _load_ring_file(self) -> None:
        """The last ring whose handoff completed: a restart redoes only the rest."""
        try:
            members = json.loads(self._ring_file.read_text())
            self._handoff_base = Ring({str(k): float(v) for k, v in members.items()})
        except (OSError, ValueError, TypeError, AttributeError):
            self._handoff_base = None

    async def _handoff_worker(self) -> None:
        """Hand channels off once the ring has been stable for ``handoff_delay``."""
        while True:
            await self._ring_changed.wait()
            while True:
                self._ring_changed.clear()
                epoch = self.epoch
                await asyncio.sleep(self.config.handoff_delay)
                if epoch == self.epoch:
                    break
            if not self.has_quorum:
                # The minority side of a partition keeps its last completed
                # ring as the base: when the partition heals, only what
                # changed meanwhile moves (not every channel to and fro).
                continue
            new, base = self.ring, self._handoff_base
            self._handoff_base = new
            self._in_transition = False
            top = await self.storage.max_rowid()
            unplaced = gaps(self.placed, top)
            retry, self.retry = self.retry, {}
            # Without a ring file (a fresh node) the first stable ring is the
            # starting point: nothing was placed under an earlier one.
            moved = new is not None and base is not None and base != new
            log.debug(
                "handoff round",
                extra={
                    "event": "handoff_round",
                    "base": None if base is None else list(base.node_ids),
                    "new": None if new is None else list(new.node_ids),
                    "unplaced": sum(hi - lo for lo, hi in unplaced),
                    "retry": len(retry),
                },
            )
            if new is None:
                continue
            if not (moved or retry or unplaced):
                self._save_ring(new)
                continue
            self._handoff_running = True
            complete = False
            try:
                if moved:
                    assert base is not None
                    await self._handoff(base, new)
                if retry:
                    await self._push_retries(new, retry)
                placed_all = True
                failed: set[str] = set()
                for lo, hi in unplaced:
                    reached = await self._push_stored(new, lo, hi, failed)
                    if reached > lo:
                        self.placed = add_interval(self.placed, lo, reached)
                    placed_all = placed_all and reached >= hi
                if not placed_all:
                    self._ring_changed.set()  # again after handoff_delay
                complete = placed_all and not self.retry
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handoff failed")
                for channel, low in retry.items():
                    self._retry_handoff(channel, low)
                self._ring_changed.set()
            finally:
                self._handoff_running = False
                self._save_placed()
                if complete:
                    self._save_ring(new)

    async def _handoff(self, old: Ring, new: Ring) -> None:
        channels = list(self.last_seq)
        if not channels:
            return
        live = set(new.node_ids)
        plan = self._moves(old, new, channels)
        pushes = 0
        failed: set[str] = set()  # a target that fails is not waited for again
        for channel, before, after in plan:
            if self.id not in before:
                continue
            senders = [n for n in before if n in live]
            if not senders or senders[0] != self.id:
                continue
            for target in after:
                if target not in before and target != self.id:
                    ok = False
                    if target not in failed:
                        sent, ok = await self._push_channel(channel, target)
                        pushes += sent
                    if not ok:
                        failed.add(target)
                        self._retry_handoff(channel, 1)
        if plan:
            self.counters["handoffs"] += 1
            log.info(
                "handoff",
                extra={"event": "handoff", "moved": len(plan), "pushed": pushes},
            )

    def _retry_handoff(self, channel: int, low: int) -> None:
        """A push failed: push *channel* from *low* on again at the next handoff."""
        current = self.retry.get(channel)
        if current is None or low < current:
            self.retry[channel] = low
        self._ring_changed.set()  # another round after ``handoff_delay``

    def _load_placed(self) -> None:
        try:
            doc = json.loads(self._placed_file.read_text())
            if "placed" in doc:
                self.placed = [(int(lo), int(hi)) for lo, hi in doc["placed"]]
            else:  # written by an older version: a placed prefix
                self.placed = add_interval([], 0, int(doc["rowid"]))
            self.retry = {int(c): int(s) for c, s in doc.get("retry", {}).items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            self.placed, self.retry = [], {}

    def _save_placed(self) -> None:
        doc = {"placed": self.placed, "retry": self.retry}
        tmp = self._placed_file.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self._placed_file)

    async def _placement_tracker(self, period: float = 0.5) -> None:
        """Rows stored between two settled moments of one ring are placed."""
        previous: tuple[int, int] | None = None  # (epoch, top) when last settled
        while True:
            await asyncio.sleep(period)
            self.counters["placement_rounds"] += 1
            if not self._ring_settled():
                previous = None
                continue
            epoch = self.epoch
            top = await self.storage.max_rowid()
            # rows stored after a ring change that happened meanwhile may be
            # counted in *top*: then it is not a clean point
            if epoch != self.epoch or not self._ring_settled():
                previous = None
                continue
            if previous is not None and previous[0] == epoch and top > previous[1]:
                self.placed = add_interval(self.placed, previous[1], top)
                self._save_placed()
            previous = (epoch, top)

    def _ring_settled(self) -> bool:
        """This node's ring is the base of its handoff rounds: what it stores
        now goes to the owners under that ring, and a later ring change is
        compared with it (a handoff or retry still running concerns older
        rows).  Not merely "unchanged for a while": rows written under a ring
        that no round started from would never be pushed on its next change.
        """
        return not (self._in_transition or self._ring_changed.is_set())

    async def _push_retries(self, ring: Ring, retry: dict[int, int]) -> None:
        """Push channels whose earlier push failed (``seq >= low``) to their owners."""
        replicas = min(self.config.replicas, len(ring.node_ids))
        failed: set[str] = set()
        for channel, low in retry.items():
            for target in ring.owners(channel, replicas):
                if target == self.id:
                    continue
                ok = False
                if target not in failed:
                    ok = (await self._push_channel(channel, target, low - 1))[1]
                if not ok:
                    failed.add(target)
                    self._retry_handoff(channel, low)

    async def _push_stored(
        self, ring: Ring, since: int, top: int, failed: set[str] | None = None
    ) -> int:
        """Push the rows stored after row id *since* (up to *top*) to their owners.

        Writes accepted while views of the ring disagreed can sit on nodes
        that are not owners once the ring settles (a handoff from the old
        stable ring to the new one does not see them), so a node pushes
        every row stored since its ring was last stable to the row's owners
        under *ring*, page by page in row-id order, one HANDOFF DATA stream
        per target.  Returns the row id up to which every push succeeded.
        """
        replicas = min(self.config.replicas, len(ring.node_ids))
        owners: dict[int, list[str]] = {}
        failed = set() if failed is None else failed
        reached: int | None = None
        pushed = 0
        after = since
        while after < top:
            page = await self.storage.rows_after(
                after, top, self.config.handoff_batch * 8
            )
            if not page:
                break
            by_target: dict[str, list[p.Record]] = {}
            for _, rec in page:
                targets = owners.get(rec.channel)
                if targets is None:
                    targets = owners[rec.channel] = [
                        t for t in ring.owners(rec.channel, replicas) if t != self.id
                    ]
                for target in targets:
                    by_target.setdefault(target, []).append(rec)
            page_ok = True
            for target, records in by_target.items():
                ok = False
                if target not in failed:
                    sent, ok = await self._send_records(target, records)
                    pushed += sent
                if not ok:
                    failed.add(target)
                    page_ok = False
            if not page_ok and reached is None:
                reached = after  # rows up to here went everywhere
            after = page[-1][0]
        self.counters["transient_pushed"] += pushed
        log.info(
            "transient handoff",
            extra={
                "event": "handoff",
                "rows": top - since,
                "pushed": pushed,
                "failed": sorted(failed),
            },
        )
        return top if reached is None else reached

    async def _send_records(
        self, target: str, records: list[p.Record]
    ) -> tuple[int, bool]:
        """HANDOFF DATA of *records* to *target*: (records sent, ok)."""
        assert self.membership is not None
        address = self.membership.address(target)
        if address is None:
            return 0, False
        link = self.peers.link(address)
        sent = 0
        for chunk in self._chunks(records):
            try:
                await link.call(
                    T.HANDOFF,
                    p.encode_handoff_data(chunk),
                    self.config.replicate_timeout,
                )
            except (OSError, TimeoutError, RemoteError, ConnectionLost) as exc:
                log.warning("handoff to %s failed: %s", target, exc)
                return sent, False
            sent += len(chunk)
            self.counters["handoff_sent"] += len(chunk)
        return sent, True

    async def _push_channel(
        self, channel: int, target: str, after: int = 0
    ) -> tuple[int, bool]:
        """Stream *channel* (``seq > after``) to *target*: (records sent, ok).

        A whole channel (``after == 0``) goes block by block: the target's
        digest of each block of ``handoff_block`` sequence numbers is compared
        with this node's and only the blocks that differ are sent (a node that
        comes back after a partition lacks only what was written meanwhile).
        """
        block = self.config.handoff_block
        if after == 0 and block > 0:
            theirs = await self._target_digest(channel, target, block)
            if theirs is not None:
                mine = await self.storage.digest(channel, block)
                differ = sorted(b for b, d in mine.items() if theirs.get(b) != d)
                self.counters["handoff_blocks_same"] += len(mine) - len(differ)
                self.counters["handoff_blocks_pushed"] += len(differ)
                sent = 0
                for b in differ:
                    count, ok = await self._push_range(
                        channel, target, b * block, (b + 1) * block
                    )
                    sent += count
                    if not ok:
                        return sent, False
                return sent, True
        return await self._push_range(channel, target, after, None)

    async def _target_digest(
        self, channel: int, target: str, block: int
    ) -> p.Digest | None:
        """*target*'s block digests of *channel* (None: ask failed, push all)."""
        assert self.membership is not None
        address = self.membership.address(target)
        if address is None:
            return None
        try:
            frame = await self.peers.link(address).call(
                T.HANDOFF,
                p.encode_handoff_digest(channel, block),
                self.config.replicate_timeout,
            )
            return p.decode_handoff_blocks(frame.payload)[1]
        except (OSError, TimeoutError, RemoteError, ConnectionLost, p.ProtocolError):
            return None

    async def _push_range(
        self, channel: int, target: str, after: int, upto: int | None
    ) -> tuple[int, bool]:
        """Stream *channel*'s rows with ``after < seq <= upto`` to *target*."""
        sent = 0
        while True:
            rows = await self.storage.fetch(channel, after, self.config.handoff_batch)
            if upto is not None:
                rows = [r for r in rows if r.seq <= upto]
            if not rows:
                return sent, True
            count, ok = await self._send_records(target, rows)
            sent += count
            if not ok:
                return sent, False
            after = rows[-1].seq
