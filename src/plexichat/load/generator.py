"""Chat load: N asyncio clients pipelining SENDs to the nodes that own the channels.

Closed loop: every client keeps ``inflight`` SENDs outstanding.  Open loop:
SENDs are issued at ``rate`` per second in total (latency counts from the
*intended* send time, so a stalled cluster cannot hide behind a stalled
generator).  A run stops issuing at ``count`` messages or after ``duration``
seconds, whichever comes first, then waits for what is in flight.

Every client is one sender with its own message counter and in-flight
window; with ``route=owner`` it talks to every node and sends each message
straight to the channel's owner (computed with :class:`plexichat.routing.Ring`
from the cluster view), with ``route=any`` it talks to one node that forwards.
By default every client has its own connections; ``connections=K`` makes the
clients share K connections per node (a gateway: fewer, larger writes).  A
sender's messages to one channel always take the same connection, so their
order is kept.

Faults: a connection that closes (its node was killed) is reopened about once
a second; meanwhile its senders use their other connections.  A node whose
requests time out or whose connection drops is avoided by every channel for
``detour`` seconds.  A request that fails (an error, a timeout, a lost
connection) sends that channel's next messages to the next node for
``detour`` seconds (it forwards to whoever owns
the channel now), as a client of a real cluster tries another server; then the
channel goes back to its owner.  A sender moves a channel to another
connection only when none of its messages to that channel is in flight, so
its order is kept across the switch.  In closed loop
a failed request's slot is re-issued after ``retry_delay`` (no busy loop
against a node that fails fast).  The report's ``timeline`` counts acked and
failed requests per ``timeline_interval`` since ``started_unix``, in total
and per node the requests were sent to (``by_node``).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import os
import random
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from plexichat import accel, wire
from plexichat.load import report
from plexichat.load.client import cluster_view, connect_all
from plexichat.load.journal import JournalWriter
from plexichat.node import protocol as p
from plexichat.node.auth import TLS_SERVER_NAME, Credentials, client_context
from plexichat.node.transport import FrameConnection
from plexichat.routing import Ring, key_of
from plexichat.stats import Histogram

T = wire.MessageType
_MID = struct.Struct(">QQ")


@dataclass
class LoadConfig:
    """Parameters of one chat load run."""

    nodes: list[tuple[str, int]]
    clients: int = 8
    mode: Literal["closed", "open"] = "closed"
    inflight: int = 64
    rate: float = 10_000.0
    count: int = 100_000
    duration: float = 30.0
    payload: int = 64
    channels: int = 256
    distribution: Literal["uniform", "zipf"] = "uniform"
    zipf_s: float = 1.1
    route: Literal["owner", "any"] = "owner"
    journal: Path | None = None
    timeout: float = 10.0
    seed: int | None = None
    channel_prefix: str = "load"
    connections: int = 0  # per node, shared by the clients; 0: one per client
    retry_delay: float = 0.05  # closed loop: seconds before a failed slot re-issues
    detour: float = 2.0  # seconds a failed channel is sent through another node
    timeline_interval: float = 1.0  # seconds per timeline bucket
    # The cluster's keys: each sender's own connections HELLO with a client
    # token of that sender; connections shared by several senders with a
    # service token.  None: no token (only an insecure cluster accepts it).
    credentials: Credentials | None = None
    # Speak TLS to the nodes (their --tls-listen addresses), trusting the
    # node certificates this CA signed.
    tls_ca: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Conn(FrameConnection):
    """A load connection: request ids and pending SENDs live on the object."""

    def __init__(self, gen: Generator, index: int) -> None:
        super().__init__(gen.on_frames, on_close=gen.on_close)
        self.index = index
        # rid -> (client, channel, counter, msg id, t0, channel index)
        self.pending: dict[int, tuple[_Client, int, int, bytes, int, int]] = {}
        self.rid = 0


@dataclass
class _Client:
    sender: int
    conns: list[_Conn]  # per channel index: where this client sends it
    fallback: list[_Conn]
    counter: int = 0
    inflight: int = 0
    # per channel index: the connection its messages take now, and how many
    # of them are in flight there (a channel switches only when idle)
    route: list[_Conn | None] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)
    # per channel index: failures in a row (0: the owner's connection) and
    # the monotonic time the detour ends
    detour: list[int] = field(default_factory=list)
    detour_until: list[float] = field(default_factory=list)
    detour_s: float = 2.0


class Generator:
    """One load run (``await Generator(config).run()``)."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.hist = Histogram()
        self.latencies: list[int] = []
        self.sent = 0
        self.acked = 0
        self.failures = 0
        self.errors: dict[str, int] = {}
        self.stopping = False
        self.done = asyncio.Event()
        self.journal: JournalWriter | None = None
        self.clients: list[_Client] = []
        self.conns: list[_Conn] = []
        self.pool: dict[tuple[int, int], _Conn] = {}  # (node, slot) -> connection
        self.hellos: dict[int, bytes] = {}  # slot -> its connections' HELLO body
        self.ssl = None if config.tls_ca is None else client_context(config.tls_ca)
        self.reconnects = 0
        self.tl_acked: list[int] = []
        self.tl_failed: list[int] = []
        self.tl_node: list[list[list[int]]] = []  # bucket -> node -> [acked, failed]
        # per node: monotonic time until which requests avoid it (it timed out
        # or dropped the connection: paused, killed or cut off); down_until is
        # the latest of them (0: none, the fast path)
        self.node_down = [0.0] * len(config.nodes)
        self.down_until = 0.0
        self._tl_ns = max(1, int(config.timeline_interval * 1e9))
        self.started_unix = 0.0
        self.channel_ids = [
            key_of(f"{config.channel_prefix}-{i}") for i in range(config.channels)
        ]
        self.body = os.urandom(config.payload)
        self._cdf: list[float] | None = None
        if config.distribution == "zipf":
            weights = [1.0 / (i + 1) ** config.zipf_s for i in range(config.channels)]
            total = sum(weights)
            acc = 0.0
            self._cdf = []
            for w in weights:
                acc += w / total
                self._cdf.append(acc)
        self.deadline = float("inf")
        self.started_ns = 0
        self.last_ack_ns = 0

    # -- channel choice and issuing -----------------------------------------------

    def pick(self) -> int:
        if self._cdf is None:
            return int(self.rng.random() * self.config.channels)
        return min(
            bisect.bisect_left(self._cdf, self.rng.random()), self.config.channels - 1
        )

    def issue(self, client: _Client, t0: int = 0) -> bool:
        """Send one message for *client*; False once the run stops issuing."""
        if self.stopping or self.sent >= self.config.count:
            self.stopping = True
            return False
        ci = self.pick()
        conn = client.conns[ci]
        detour = client.detour[ci]
        if detour and time.monotonic() >= client.detour_until[ci]:
            detour = client.detour[ci] = 0
        if conn.closed or detour:
            alive = [c for c in client.fallback if not c.closed]
            if not alive:
                self.stopping = True
                return False
            start = alive.index(conn) if conn in alive else ci
            conn = alive[(start + detour) % len(alive)]
        if self.down_until and self.node_down[conn.index] > time.monotonic():
            conn = self._around_down(client, conn)
        current = client.route[ci]
        if current is not conn:
            if current is not None and client.busy[ci] and not current.closed:
                conn = current  # drain the old path first: order is kept
            else:
                client.route[ci] = conn
        client.busy[ci] += 1
        counter = client.counter = client.counter + 1
        mid = _MID.pack(client.sender, counter)
        channel = self.channel_ids[ci]
        rid = conn.rid = (conn.rid % 0xFFFFFFFF) + 1
        conn.pending[rid] = (
            client,
            channel,
            counter,
            mid,
            t0 or time.perf_counter_ns(),
            ci,
        )
        conn.send(
            T.SEND, rid, p.SEND_HEAD.pack(channel, mid, client.sender) + self.body
        )
        client.inflight += 1
        self.sent += 1
        return True

    def on_frames(self, conn: FrameConnection, frames: list[wire.Frame]) -> None:
        assert isinstance(conn, _Conn)
        now = time.perf_counter_ns()
        pending = conn.pending
        journal = self.journal
        lat = self.latencies
        closed_loop = self.config.mode == "closed"
        unpack_ack = p.ACK_BODY.unpack
        acked_before = self.acked
        for frame in frames:
            entry = pending.pop(frame.request_id, None)
            if entry is None:
                continue  # WELCOME of the pipelined HELLO
            client, channel, counter, mid, t0, ci = entry
            client.inflight -= 1
            client.busy[ci] -= 1
            if frame.type == T.ACK:
                _, seq = unpack_ack(frame.payload)
                self.acked += 1
                lat.append(now - t0)
                if journal is not None:
                    journal.add(mid, channel, client.sender, counter, seq)
            else:
                self._fail(frame, node=conn.index)
                self._detour(client, ci)
                if closed_loop:
                    self._retry(client)
                continue
            if closed_loop:
                self.issue(client)
        if self.acked != acked_before:
            self._tick(now, self.acked - acked_before, 0, conn.index)
        self.last_ack_ns = now
        if time.monotonic() >= self.deadline:
            self.stopping = True
        if len(lat) >= 8192:
            self._flush_latencies()
        self._check_done()

    def _tick(self, now_ns: int, acked: int, failed: int, node: int) -> None:
        """Add to the timeline bucket of *now_ns* (requests sent to *node*)."""
        index = (
            max(0, (now_ns - self.started_ns) // self._tl_ns) if self.started_ns else 0
        )
        grow = index + 1 - len(self.tl_acked)
        if grow > 0:
            self.tl_acked.extend([0] * grow)
            self.tl_failed.extend([0] * grow)
            n = len(self.config.nodes)
            self.tl_node.extend([[0, 0] for _ in range(n)] for _ in range(grow))
        self.tl_acked[index] += acked
        self.tl_failed[index] += failed
        counts = self.tl_node[index][node]
        counts[0] += acked
        counts[1] += failed

    def _mark_down(self, node: int) -> None:
        """*node* stopped answering: send around it for ``detour`` seconds."""
        until = time.monotonic() + self.config.detour
        self.node_down[node] = until
        self.down_until = max(self.down_until, until)

    def _around_down(self, client: _Client, conn: _Conn) -> _Conn:
        """The next open connection of *client* to a node that is not down."""
        now = time.monotonic()
        if now >= self.down_until:
            self.down_until = 0.0
            return conn
        options = [c for c in client.fallback if not c.closed]
        if conn in options:
            start = options.index(conn)
            options = options[start + 1 :] + options[:start]
        for other in options:
            if self.node_down[other.index] <= now:
                return other
        return conn  # every node is down: try the one chosen

    @staticmethod
    def _detour(client: _Client, ci: int) -> None:
        """Send channel *ci* of *client* through the next node for a while."""
        client.detour[ci] += 1
        client.detour_until[ci] = time.monotonic() + client.detour_s

    def _retry(self, client: _Client) -> None:
        """Re-issue a failed closed-loop slot after ``retry_delay``."""
        delay = self.config.retry_delay
        if delay <= 0:
            self.issue(client)
            return
        client.inflight += 1  # the slot stays taken while it waits
        asyncio.get_running_loop().call_later(delay, self._reissue, client)

    def _reissue(self, client: _Client) -> None:
        client.inflight -= 1
        self.issue(client)
        self._check_done()

    def _fail(self, frame: wire.Frame | None, reason: str = "", *, node: int) -> None:
        self.failures += 1
        self._tick(time.perf_counter_ns(), 0, 1, node)
        if frame is not None:
            try:
                code, _ = p.decode_error(frame.payload)
                reason = (
                    p.ErrorCode(code).name
                    if code in p.ErrorCode._value2member_map_
                    else str(code)
                )
            except p.ProtocolError:
                reason = f"type-{frame.type}"
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def on_close(self, conn: FrameConnection, exc: BaseException | None) -> None:
        assert isinstance(conn, _Conn)
        pending, conn.pending = conn.pending, {}
        for entry in pending.values():
            client = entry[0]
            client.inflight -= 1
            client.busy[entry[5]] -= 1
            self._fail(None, "CONNECTION_LOST", node=conn.index)
            self._detour(client, entry[5])
        if pending:
            self._mark_down(conn.index)
        if pending and self.config.mode == "closed":
            for client, *_ in pending.values():
                self._retry(client)
        self._check_done()

    def _check_done(self) -> None:
        if (
            self.stopping
            and not self.done.is_set()
            and all(c.inflight <= 0 for c in self.clients)
        ):
            self.done.set()

    def _flush_latencies(self) -> None:
        if self.latencies:
            arr = np.asarray(self.latencies, dtype=np.int64) // 1000
            np.maximum(arr, 1, out=arr)
            self.hist.record_many(arr)
            self.latencies.clear()

    # -- set-up and the run ----------------------------------------------------------

    async def _open(self) -> None:
        config = self.config
        creds = config.credentials
        controls = await connect_all(
            config.nodes,
            config.timeout,
            token=None if creds is None else creds.token(1, role="service"),
            ssl=self.ssl,
        )
        try:
            live, _replicas, _ = await cluster_view(controls)
            ring = Ring(live)
            index_of = {c.node_id: i for i, c in enumerate(controls)}
            owner_index = []
            for ci, channel in enumerate(self.channel_ids):
                owner = ring.owners(channel, 1)[0]
                owner_index.append(index_of.get(owner, ci % len(controls)))
        finally:
            for c in controls:
                await c.close()
        n_nodes = len(config.nodes)
        shared = config.connections > 0
        pool = self.pool

        async def connection(node: int, slot: int) -> _Conn:
            conn = pool.get((node, slot))
            if conn is None:
                conn = pool[(node, slot)] = await self._connect(node, slot)
            return conn

        for i in range(config.clients):
            slot = i % config.connections if shared else i
            sender = int.from_bytes(os.urandom(8), "big") >> 1 or 1
            if slot not in self.hellos:
                self.hellos[slot] = self._hello(sender, shared)
            if config.route == "owner":
                conns = [await connection(node, slot) for node in range(n_nodes)]
                by_channel = [conns[owner_index[ci]] for ci in range(config.channels)]
            else:
                conns = [await connection(i % n_nodes, slot)]
                by_channel = [conns[0]] * config.channels
            channels = config.channels
            self.clients.append(
                _Client(
                    sender,
                    by_channel,
                    conns,
                    route=[None] * channels,
                    busy=[0] * channels,
                    detour=[0] * channels,
                    detour_until=[0.0] * channels,
                    detour_s=config.detour,
                )
            )

    def _hello(self, sender: int, shared: bool) -> bytes:
        body: dict[str, Any] = {"version": p.PROTOCOL_VERSION, "role": "client"}
        creds = self.config.credentials
        if creds is not None:
            body["token"] = creds.token(sender, role="service" if shared else "client")
        return p.encode_json(body)

    async def _connect(self, node: int, slot: int) -> _Conn:
        host, port = self.config.nodes[node]
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                functools.partial(_Conn, self, node),
                host,
                port,
                ssl=self.ssl,
                server_hostname=None if self.ssl is None else TLS_SERVER_NAME,
            ),
            self.config.timeout,
        )
        conn.send(T.HELLO, 0, self.hellos[slot])
        self.conns.append(conn)
        return conn

    async def _reconnect(self) -> None:
        """Reopen closed pool connections and hand them to their senders."""
        for key, old in list(self.pool.items()):
            if not old.closed or self.stopping:
                continue
            try:
                new = await asyncio.wait_for(self._connect(*key), 1.0)
            except (OSError, TimeoutError):
                continue
            self.pool[key] = new
            self.reconnects += 1
            for client in self.clients:
                client.conns = [new if c is old else c for c in client.conns]
                client.fallback = [new if c is old else c for c in client.fallback]
        self.conns = [c for c in self.conns if not c.closed or c.pending]

    async def _sweeper(self) -> None:
        """Fail requests older than the timeout (a lost node must not hang the run)."""
        timeout_ns = int(self.config.timeout * 1e9)
        while True:
            await asyncio.sleep(min(1.0, self.config.timeout / 4))
            now = time.perf_counter_ns()
            for conn in self.conns:
                expired = [
                    rid for rid, e in conn.pending.items() if now - e[4] > timeout_ns
                ]
                for rid in expired:
                    entry = conn.pending.pop(rid)
                    client = entry[0]
                    client.inflight -= 1
                    client.busy[entry[5]] -= 1
                    self._fail(None, "TIMEOUT", node=conn.index)
                    self._detour(client, entry[5])
                    if expired[0] == rid:
                        self._mark_down(conn.index)
                    if self.config.mode == "closed":
                        self.issue(client)
            if time.monotonic() >= self.deadline:
                self.stopping = True
            else:
                await self._reconnect()
            self._check_done()

    async def _open_loop(self) -> None:
        config = self.config
        rate = config.rate
        start = time.perf_counter_ns()
        issued = 0
        clients = self.clients
        while not self.stopping and time.monotonic() < self.deadline:
            due = min(int((time.perf_counter_ns() - start) * rate / 1e9), config.count)
            while issued < due:
                intended = start + int(issued * 1e9 / rate)
                if not self.issue(clients[issued % len(clients)], intended):
                    break
                issued += 1
            if issued >= config.count:
                self.stopping = True
                break
            await asyncio.sleep(0.001)
        self.stopping = True
        self._check_done()

    async def run(self) -> dict[str, Any]:
        """Connect, load, wait for in-flight replies, report."""
        config = self.config
        if config.journal is not None:
            self.journal = JournalWriter(config.journal)
        await self._open()
        self.deadline = time.monotonic() + config.duration
        self.started_ns = time.perf_counter_ns()
        self.started_unix = time.time()
        sweeper = asyncio.create_task(self._sweeper())
        driver: asyncio.Task[None] | None = None
        try:
            if config.mode == "closed":
                for _ in range(config.inflight):
                    for client in self.clients:
                        self.issue(client)
            else:
                driver = asyncio.create_task(self._open_loop())
            remaining = config.duration + config.timeout + 5.0
            try:
                await asyncio.wait_for(self.done.wait(), remaining)
            except TimeoutError:
                self.stopping = True
        finally:
            sweeper.cancel()
            if driver is not None:
                driver.cancel()
            for conn in self.conns:
                conn.close()
            if self.journal is not None:
                self.journal.close()
        self._flush_latencies()
        return self.result()

    def result(self) -> dict[str, Any]:
        config = self.config
        end = self.last_ack_ns or time.perf_counter_ns()
        seconds = max(1e-9, (end - self.started_ns) / 1e9)
        row = report.summary(
            "chat",
            self.hist,
            requests=self.acked + self.failures,
            failures=self.failures,
            seconds=seconds,
            content_size=float(config.payload),
        )
        pct = row["percentiles_ms"]
        step = config.timeline_interval
        timeline = [
            {
                "t_s": round((i + 1) * step, 3),
                "acked": a,
                "failed": f,
                "by_node": by_node,
            }
            for i, (a, f, by_node) in enumerate(
                zip(self.tl_acked, self.tl_failed, self.tl_node, strict=True)
            )
        ]
        return {
            "scenario": "chat",
            "mode": config.mode,
            "route": config.route,
            "clients": config.clients,
            "nodes": len(config.nodes),
            "sent": self.sent,
            "acked": self.acked,
            "failures": self.failures,
            "errors": dict(self.errors),
            "duration_s": round(seconds, 3),
            "throughput_msgs_per_s": round(self.acked / seconds, 1),
            "latency_ms": {"p50": pct["50%"], "p99": pct["99%"], "p99.9": pct["99.9%"]},
            "locust": [row],
            "journal": str(config.journal) if config.journal else None,
            "load_backend": accel.summary(),
            "reconnects": self.reconnects,
            "started_unix": round(self.started_unix, 6),
            "timeline_interval_s": step,
            "timeline": timeline,
        }


async def run_load(config: LoadConfig) -> dict[str, Any]:
    """Run one chat load and return its report."""
    return await Generator(config).run()
