"""The PlexiChat node: framed TCP server, sharding, channel order, relay.

:class:`Node` is the composition root: it accepts connections, routes
frames, keeps the ring (membership) and the lease, and delegates SEND
admission, gates and forwards to :class:`~plexichat.node.sends.SendRouter`,
the owner's write path to :class:`~plexichat.node.writes.WritePath`,
channel ownership (terms, takeovers, the replica side of APPEND) to
:class:`~plexichat.node.channels.ChannelOrder`, the rebalance after ring
changes (and HANDOFF) to :class:`~plexichat.node.rebalance.Rebalancer`,
readers (FETCH, SUBSCRIBE/DELIVER: committed records only) to
:class:`~plexichat.node.readers.Readers`, control ops (HELLO, PING, GOSSIP,
STATS) to :class:`~plexichat.node.control.Control`, peer links to
:class:`~plexichat.node.peers.PeerLinks` and relay to
:class:`~plexichat.node.relay.Relayer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from plexichat import accel, wire
from plexichat.cache import LRUCache
from plexichat.node import protocol as p
from plexichat.node.auth import Credentials, server_context
from plexichat.node.channels import ChannelOrder
from plexichat.node.control import ANONYMOUS_OPS, PEER_OPS, Control
from plexichat.node.counters import NodeCounters, new_counters
from plexichat.node.gcstats import GCPauses
from plexichat.node.idfilter import IdFilter
from plexichat.node.membership import MONOTONIC, Clock, GossipConfig, Membership
from plexichat.node.peers import PeerLinks
from plexichat.node.readers import FRAME_ROOM, Readers
from plexichat.node.rebalance import Rebalancer
from plexichat.node.relay import Relayer
from plexichat.node.sends import SendRouter
from plexichat.node.store import Engine, MessageStore, Synchronous, open_store
from plexichat.node.transport import MAX_BUFFERED, FrameConnection, Link, Refused
from plexichat.node.writes import WritePath
from plexichat.routing import Ring
from plexichat.stats import Histogram

log = logging.getLogger("plexichat.node")


T = wire.MessageType
HISTOGRAMS: Final = ("send", "forward", "replicate", "fetch", "relay")

# Seconds a paused connection's count of requests in flight may stand still
# before the node stops waiting for those replies (see Node._sweeper).
STUCK_AFTER: Final = 60.0

# How a background task is supervised: any exception is fatal (ERRORS), or
# any end at all, for loops that must run as long as the node (FOREVER).
Supervision = Literal["errors", "forever"]
ERRORS: Final = "errors"
FOREVER: Final = "forever"

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
    # Authentication (docs/protocol.md "Authentication"): the cluster's keys.
    # A node without them refuses to start unless *insecure* says it may run
    # open (every connection may do everything; the lab never does that).
    credentials: Credentials | None = None
    insecure: bool = False
    # TLS for clients: a second listener (HOST, PORT) speaking the same
    # protocol inside TLS 1.3 with this certificate chain and key.
    tls_listen: tuple[str, int] | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Limits (docs/protocol.md "Limits"): what one connection, and all of
    # them, may hold of this node, and for how long.
    read_timeout: float = 10.0  # seconds to receive a whole frame (first: from accept)
    idle_timeout: float = 300.0  # seconds without a frame (0: never; see _sweeper)
    max_connections: int = 1024  # open connections; more are refused
    max_inflight: int = 1024  # a connection's unanswered requests before it is paused
    max_output: int = MAX_BUFFERED  # a connection's unsent reply bytes before a drop
    max_fetches: int = 16  # FETCH store reads at once (node-wide); more wait
    # Connections not (yet) authenticated: at most this many (a new one
    # evicts the oldest), each for at most auth_timeout seconds.  Whoever
    # lacks credentials cannot crowd out peers and clients.
    max_unauthenticated: int = 64
    auth_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.max_frame <= wire.HARD_MAX_PAYLOAD:
            raise ValueError(f"max_frame must be within 1..{wire.HARD_MAX_PAYLOAD}")
        if not 0 <= self.max_message <= self.max_frame - FRAME_ROOM:
            # a message the node could store but not serve in a frame
            raise ValueError(
                f"max_message must be within 0..max_frame - {FRAME_ROOM} "
                f"({self.max_frame - FRAME_ROOM})"
            )
        if self.read_timeout <= 0 or self.idle_timeout < 0:
            raise ValueError("read_timeout must be > 0 and idle_timeout >= 0")
        if min(self.max_connections, self.max_inflight, self.max_fetches) < 1:
            raise ValueError("max_connections, max_inflight, max_fetches must be >= 1")
        if self.max_unauthenticated < 1 or self.auth_timeout <= 0:
            raise ValueError("max_unauthenticated must be >= 1, auth_timeout > 0")
        if self.max_output < self.max_frame:
            raise ValueError("max_output must hold at least one frame (max_frame)")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) as a tuple."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class Node:
    """One PlexiChat node (start with :meth:`start`, stop with :meth:`stop`).

    Leases and suspicion timeouts read *clock* (in-process tests pass
    one they move by hand); waits and I/O timeouts stay on the event loop.
    """

    def __init__(self, config: NodeConfig, *, clock: Clock = MONOTONIC) -> None:
        if config.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if config.credentials is None and not config.insecure:
            raise ValueError(
                "a node needs credentials (a cluster secret); insecure=True runs "
                "it open to anyone who reaches its port"
            )
        self.credentials = None if config.insecure else config.credentials
        # What a new connection may do before (or without) a HELLO.
        self._first_ops = PEER_OPS if self.credentials is None else ANONYMOUS_OPS
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
        capacity = config.cache_capacity
        self.owner_cache: LRUCache[int, tuple[str, ...]] = LRUCache(capacity)
        self.recent: LRUCache[bytes, tuple[int, int]] = LRUCache(capacity)
        self.conns: set[FrameConnection] = set()
        # unauthenticated connections -> accept time, oldest first
        self._anonymous: dict[FrameConnection, float] = {}
        self._refused_logged = -10.0  # when refused connections were last logged
        self.hist: dict[str, Histogram] = {name: Histogram() for name in HISTOGRAMS}
        self.counters: NodeCounters = new_counters()
        self.advertise: tuple[str, int] = ("", 0)
        self.ready = asyncio.Event()
        self.gc = GCPauses()
        self.started = time.monotonic()
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None
        self.tls_port = 0  # the TLS listener's port (0: none)
        self._tasks: set[asyncio.Task[Any]] = set()
        # set when a supervised loop or the storage writer died (see fatal)
        self.failed = asyncio.Event()
        self.failure: BaseException | None = None
        self._stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sends = SendRouter(self)
        self.readers = Readers(self)
        self.rebalancer = Rebalancer(self)
        self.control = Control(self)
        self.peers = PeerLinks(
            self.id,
            clock=clock,
            resolve=self._address,
            spawn=self._spawn,
            stopping=lambda: self._stopping,
            max_payload=config.max_frame,
            source_address=config.source_address,
            connect_timeout=config.forward_timeout,
            credentials=self.credentials,
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
            on_commit=self.readers.committed_elsewhere,
            on_stored=self._note_ids,
            call_timeout=max(config.sync_timeout, 2 * config.gossip.ping_timeout),
            data_timeout=config.replicate_timeout,
            batch=config.handoff_batch,
            section_bytes=config.max_frame // 2,
        )
        self.writes = WritePath(self)
        self.ids = IdFilter()  # (channel, msg_id) pairs this node may store
        self._handlers: dict[int, Callable[[FrameConnection, int, bytes], None]] = {
            T.HELLO: self.control.on_hello,
            T.REPLICATE: self.order.on_append,
            T.FETCH: self.readers.on_fetch,
            T.SUBSCRIBE: self.readers.on_subscribe,
            T.RELAY: self.relayer.on_relay,
            T.STATS: self.control.on_stats,
            T.GOSSIP: self.control.on_gossip,
            T.HANDOFF: self.rebalancer.on_handoff,
            T.PING: self.control.on_ping,
        }
        # what a connection may be allowed, SEND aside, has a handler
        assert PEER_OPS - {T.SEND} <= self._handlers.keys()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Open storage, listen, join the cluster."""
        config = self.config
        self.loop = asyncio.get_running_loop()
        self.storage.open()
        self.storage.on_dead = functools.partial(self.fatal, "storage writer")
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
        if config.tls_listen is not None:
            self._tls_server = await self.loop.create_server(
                self._new_connection,
                config.tls_listen[0],
                config.tls_listen[1],
                ssl=server_context(config.tls_cert, config.tls_key),
                reuse_address=True,
                backlog=1024,
            )
            self.tls_port = int(self._tls_server.sockets[0].getsockname()[1])
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
        self._spawn(self._sweeper(), "sweeper", supervise=FOREVER)
        self._spawn(self.rebalancer.run(), "rebalance", supervise=FOREVER)
        self._spawn(self._commit_flusher(), "commits", supervise=FOREVER)
        self._spawn(self._load_ids(), "load-ids", supervise=ERRORS)
        self._spawn(self._lease_keeper(), "lease", supervise=FOREVER)
        if self.membership._task is not None:
            self.membership._task.add_done_callback(
                functools.partial(self._supervised, ERRORS, "membership")
            )
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
        if self._tls_server is not None:
            self._tls_server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.sends.drain()
        with contextlib.suppress(Exception):
            await self.order.flush_commits()
        for conn in list(self.conns):
            conn.close()
        self.peers.close()
        await self.storage.close()
        self.gc.uninstall()
        log.info("stopped", extra={"event": "stopped"})

    def _spawn(
        self,
        coro: Coroutine[Any, Any, Any],
        name: str,
        *,
        supervise: Supervision | None = None,
    ) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if supervise is not None:
            task.add_done_callback(functools.partial(self._supervised, supervise, name))
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def _supervised(self, how: Supervision, name: str, task: asyncio.Task[Any]) -> None:
        """A background loop ended: an exception (or, for a loop that must run
        as long as the node, any end) outside :meth:`stop` is fatal."""
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is None and how is ERRORS:
            return
        self.fatal(name, exc or RuntimeError(f"background loop {name} returned"))

    def fatal(self, what: str, exc: BaseException) -> None:
        """Something the node cannot run without failed: log it with its
        traceback and set :attr:`failed`; whoever runs the node (the CLI)
        then stops it, leaving the ring, and exits non-zero."""
        if self.failure is None:
            self.failure = exc
            log.critical(
                "%s failed: the node leaves the ring and exits",
                what,
                exc_info=exc,
                extra={"event": "fatal", "what": what},
            )
        self.failed.set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run *coro* as one of this node's tasks (cancelled by :meth:`stop`)."""
        return self._spawn(coro, name)

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has begun."""
        return self._stopping

    # -- connections ------------------------------------------------------------

    def _new_connection(self) -> FrameConnection | Refused:
        config = self.config
        if len(self.conns) >= config.max_connections:
            return self._refuse_connection()
        conn = FrameConnection(
            self._on_frames,
            max_payload=config.max_frame,
            on_wire_error=self._on_wire_error,
            on_close=self._on_close,
            server_side=True,
            max_inflight=config.max_inflight,
            max_output=config.max_output,
        )
        conn.allowed = self._first_ops
        conn.admin = self.credentials is None
        self.conns.add(conn)
        self.counters["connections"] += 1
        if self.credentials is not None:
            anonymous = self._anonymous
            if len(anonymous) >= config.max_unauthenticated:
                oldest = next(iter(anonymous))
                del anonymous[oldest]
                self.counters["unauthenticated_closed"] += 1
                self.error(
                    oldest,
                    0,
                    p.ErrorCode.UNAUTHENTICATED,
                    "closed: too many unauthenticated connections "
                    f"(max_unauthenticated {config.max_unauthenticated})",
                )
                oldest.close()
            anonymous[conn] = time.monotonic()
        return conn

    def authenticated(self, conn: FrameConnection) -> None:
        """*conn* proved who it is: it no longer counts as unauthenticated."""
        self._anonymous.pop(conn, None)

    def _refuse_connection(self) -> Refused:
        """A connection over ``max_connections``: ERROR UNAVAILABLE, closed."""
        self.counters["connections_refused"] += 1
        limit = self.config.max_connections
        now = time.monotonic()
        if now - self._refused_logged >= 10.0:  # a flood logs once per 10 s
            self._refused_logged = now
            log.warning(
                "refusing connections: %d open (max_connections)",
                limit,
                extra={"event": "connections_refused", "limit": limit},
            )
        message = f"too many connections (max_connections {limit})"
        return Refused(
            wire.encode_frame(
                T.ERROR, 0, p.encode_error(p.ErrorCode.UNAVAILABLE, message)
            )
        )

    def _on_close(self, conn: FrameConnection, exc: BaseException | None) -> None:
        self.conns.discard(conn)
        self._anonymous.pop(conn, None)
        self.counters["frames_received"] += conn.rx_frames
        if conn.overflowed:
            self.counters["slow_readers_closed"] += 1
            log.warning(
                "closed %s: it does not read its replies",
                conn.peername,
                extra={"event": "slow_reader", "peer": conn.peername},
            )
        self.readers.drop(conn)

    def _on_wire_error(self, conn: FrameConnection, exc: wire.WireError) -> None:
        self.counters["bad_frames"] += 1
        log.warning(
            "bad frame from %s: %s",
            conn.peername,
            exc,
            extra={"event": "bad_frame", "peer": conn.peername, "reason": exc.reason},
        )
        self.error(conn, 0, p.ErrorCode.MALFORMED, f"{exc.reason}: {exc}")

    def error(self, conn: FrameConnection, rid: int, code: int, message: str) -> None:
        """Answer request *rid* with an ERROR (counted in ``errors_sent``)."""
        self.counters["errors_sent"] += 1
        conn.send_error(rid, code, message)

    def refuse(self, conn: FrameConnection, rid: int, code: int, message: str) -> None:
        """Answer a request this connection may not make (``refused_ops``)."""
        self.counters["refused_ops"] += 1
        self.error(conn, rid, code, message)

    def _not_allowed(self, conn: FrameConnection, frame: wire.Frame) -> None:
        ftype = frame.type
        if ftype == T.ERROR:  # never answer an error with an error
            return
        if ftype not in PEER_OPS:
            self.counters["unknown_ops"] += 1
            self.error(
                conn,
                frame.request_id,
                p.ErrorCode.UNKNOWN_OP,
                f"operation {ftype} not accepted",
            )
        elif conn.allowed is ANONYMOUS_OPS:
            self.refuse(
                conn,
                frame.request_id,
                p.ErrorCode.UNAUTHENTICATED,
                f"operation {ftype} needs an authenticated connection (HELLO with "
                "a token, or the peer handshake)",
            )
        else:
            self.refuse(
                conn,
                frame.request_id,
                p.ErrorCode.FORBIDDEN,
                f"operation {ftype} is for cluster peers only",
            )

    def _on_frames(self, conn: FrameConnection, frames: list[wire.Frame]) -> None:
        now = time.perf_counter_ns()
        handlers = self._handlers
        sends = self.sends
        for frame in frames:
            ftype = frame.type
            if ftype not in conn.allowed:  # HELLO may widen it mid-batch
                self._not_allowed(conn, frame)
                continue
            if ftype == T.SEND:
                now = sends.arrival = max(now, sends.arrival + 1)
                sends.on_send(conn, frame.request_id, frame.payload, now)
                continue
            try:  # every allowed operation but SEND has a handler
                handlers[ftype](conn, frame.request_id, frame.payload)
            except (p.ProtocolError, ValueError, TypeError) as exc:
                self.error(conn, frame.request_id, p.ErrorCode.MALFORMED, str(exc))

    def _close_unauthenticated(self, now: float) -> None:
        """Close connections that did not authenticate within auth_timeout."""
        limit = self.config.auth_timeout
        anonymous = self._anonymous
        for conn, since in list(anonymous.items()):
            if now - since <= limit:
                break  # the rest came later
            del anonymous[conn]
            self.counters["unauthenticated_closed"] += 1
            message = f"no authentication within {limit:g}s"
            self.error(conn, 0, p.ErrorCode.UNAUTHENTICATED, message)
            conn.close()

    async def _sweeper(self) -> None:
        """Enforce the connection deadlines (docs/protocol.md "Limits").

        * ``read_timeout``: a frame must arrive whole within it of its first
          byte (the first frame: of the accept), else ERROR TIMEOUT and close;
        * ``idle_timeout``: a connection without a frame for that long is
          closed, unless it is a peer link or holds a subscription (both may
          be quiet for long) or it holds requests the node has not read yet;
        * a paused connection (its peer does not read its replies, or too
          many of its requests are in flight) has no frame deadline: the node
          stopped reading it.  If its count of requests in flight does not
          move for ``STUCK_AFTER`` seconds (a request never answered), the
          count is reset.
        """
        config = self.config
        period = max(0.05, min(1.0, config.read_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            self._close_unauthenticated(now)
            for conn in list(self.conns):
                started = conn.partial_since
                if conn.paused:
                    self._check_stuck(conn, now)
                elif started and now - started > config.read_timeout:
                    self.counters["timeouts_closed"] += 1
                    log.warning(
                        "closing %s: no whole frame within %.1fs",
                        conn.peername,
                        now - started,
                        extra={"event": "read_timeout", "peer": conn.peername},
                    )
                    message = f"no whole frame within {config.read_timeout:g}s"
                    self.error(conn, 0, p.ErrorCode.TIMEOUT, message)
                    conn.close()
                    continue
                if (
                    config.idle_timeout
                    and now - conn.last_rx > config.idle_timeout
                    and not conn.holding
                    and conn.role != "peer"
                    and not conn.data.get("subs")
                ):
                    self.counters["idle_closed"] += 1
                    log.info(
                        "closing idle connection %s",
                        conn.peername,
                        extra={"event": "idle_closed", "peer": conn.peername},
                    )
                    conn.close()

    def _check_stuck(self, conn: FrameConnection, now: float) -> None:
        seen = conn.data.get("inflight_seen")
        if seen is None or seen[0] != conn.inflight:
            conn.data["inflight_seen"] = (conn.inflight, now)
        elif now - seen[1] > STUCK_AFTER and conn.inflight > 0:
            self.counters["inflight_resets"] += 1
            log.warning(
                "%s: %d requests unanswered for %.0fs; counting them as answered",
                conn.peername,
                conn.inflight,
                now - seen[1],
                extra={"event": "inflight_reset", "peer": conn.peername},
            )
            del conn.data["inflight_seen"]
            conn.reset_inflight()

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
        self.rebalancer.ring_changed.set()

    @property
    def settled(self) -> bool:
        """True once this node took over every channel the ring gives it and
        told the owners of the others (the rebalance of this ring is done)."""
        return self.rebalancer.settled

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

    # -- delegates (the write path and tests use these names) -----------------------

    @property
    def gates(self) -> dict[int, list[SendItem]]:
        """Channel -> SENDs held in arrival order (owned by :attr:`sends`)."""
        return self.sends.gates

    @property
    def looking(self) -> dict[int, int]:
        """Channel -> its SENDs in a store lookup (owned by :attr:`sends`)."""
        return self.sends.looking

    def gate(
        self,
        channel: int,
        items: list[SendItem],
        *,
        take_over: tuple[str, ...] | None = None,
    ) -> None:
        """Hold SENDs in *channel*'s gate (see :meth:`SendRouter.gate`)."""
        self.sends.gate(channel, items, take_over=take_over)

    def release_if_clear(self, channel: int) -> None:
        """Route a gated channel's SENDs again once nothing older is in flight."""
        self.sends.release_if_clear(channel)

    @property
    def subscribers(self) -> dict[int, set[FrameConnection]]:
        """Channel -> subscribed connections (owned by :attr:`readers`)."""
        return self.readers.subscribers

    def deliver(self, records: Iterable[p.Record]) -> None:
        """Push committed records to this node's subscribers of their channels."""
        self.readers.deliver(records)

    def relay_children(self, root: str, fanout: int) -> list[str]:
        """Next hops of this node in the *fanout*-ary tree rooted at *root*."""
        return self.relayer.children(root, fanout)

    def info(self) -> dict[str, Any]:
        """The JSON part of STATS_REPLY."""
        return self.control.info()

    # -- stored ids, commits ---------------------------------------------------------

    def _note_ids(self, records: Iterable[p.Record]) -> None:
        self.ids.add_records(records)

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
        while after < top:
            rows = await self.storage.rows_after(after, top, page)
            if not rows:
                break
            self._note_ids(rec for _, rec in rows)
            after = rows[-1][0]
        self.ids.ready = True
