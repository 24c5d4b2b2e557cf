"""Host-side links: lab-run TCP relays between nodes, cut to make partitions.

There is no packet filter on the lab machine, so network partitions are made
one level up: node *i* listens on its real port but advertises a relay run
by the lab (:class:`LinkLayer`, one asyncio server per node on a thread of
the lab process).  Nodes bind their outgoing peer connections to a per-node
source address (``--source-address 127.0.1.<i+1>``; all of 127.0.0.0/8 is
loopback on Linux), so the relay of node *j* knows that a connection comes
from node *i*.  A partition blocks pairs ``(i, j)``: the relay refuses new
connections between them and cuts the live ones, in both directions.
Clients (the load generator, the checker, the lab's STATS polls) reach the
nodes directly, so a partitioned node still answers them, as in a real
network partition between servers.

Every pair has counters (connections, refused, cut, bytes each way), which
is how tests prove that a partition really stopped the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from plexilab.host import Endpoint

LOOPBACK = "127.0.0.1"
UNKNOWN = -1  # a connection from an address that is not a node's source address


def source_address(index: int) -> str:
    """The loopback address node *index* binds its peer connections to."""
    if not 0 <= index < 254:
        raise ValueError(f"node index {index} has no source address (0..253)")
    return f"127.0.1.{index + 1}"


@dataclass
class PairCounters:
    """Traffic of one ordered pair: connections from *src* to *dst*'s relay."""

    connections: int = 0
    refused: int = 0
    cut: int = 0
    bytes_out: int = 0  # src -> dst
    bytes_in: int = 0  # dst -> src (replies on the same connections)


class _Side(asyncio.Protocol):
    """One end of a relayed connection; writes what it reads to the other end."""

    def __init__(
        self,
        outbound: bool,
        pipe: _Pipe | None = None,
        on_made: Callable[[_Side], None] | None = None,
    ) -> None:
        self.outbound = outbound  # True: the side facing the connecting node
        self.pipe = pipe
        self.on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.on_made is not None:
            self.on_made(self)

    def data_received(self, data: bytes) -> None:
        other, pipe = self.other, self.pipe
        if other is None or other.transport is None or pipe is None:
            return
        if self.outbound:
            pipe.counters.bytes_out += len(data)
        else:
            pipe.counters.bytes_in += len(data)
        other.transport.write(data)

    def eof_received(self) -> bool | None:
        if self.other is not None and self.other.transport is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.other.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.pipe is not None:
            self.pipe.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class _Pipe:
    """A relayed connection: the connecting node's side and the target's side."""

    def __init__(self, layer: LinkLayer, src: int, dst: int, down: _Side) -> None:
        self.layer = layer
        self.src = src
        self.dst = dst
        self.counters = layer._pair(src, dst)
        self.down = down
        self.up: _Side | None = None
        self.closed = False

    def close(self, *, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.layer._pipes.discard(self)
        for side in (self.down, self.up):
            if side is not None and side.transport is not None:
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()


class LinkLayer:
    """One relay per node, on its own event-loop thread; thread-safe controls."""

    def __init__(
        self,
        upstreams: Sequence[Endpoint],
        *,
        sources: Sequence[str] | None = None,
        host: str = LOOPBACK,
    ) -> None:
        self.upstreams = list(upstreams)
        self.sources = list(
            sources or [source_address(i) for i in range(len(upstreams))]
        )
        if len(self.sources) != len(self.upstreams):
            raise ValueError("one source address per node")
        self.host = host
        self.endpoints: list[Endpoint] = []
        self._by_source = {addr: i for i, addr in enumerate(self.sources)}
        self._blocked: set[tuple[int, int]] = set()
        self._pairs: dict[tuple[int, int], PairCounters] = {}
        self._pipes: set[_Pipe] = set()
        self._servers: list[asyncio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> LinkLayer:
        """Start the relays; :attr:`endpoints` are their addresses afterwards."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name="plexilab-links", daemon=True
        )
        self._thread.start()
        try:
            self.endpoints = self._call(self._listen(), timeout)
        except BaseException:
            self.close()
            raise
        return self

    async def _listen(self) -> list[Endpoint]:
        loop = asyncio.get_running_loop()
        out = []
        for dst in range(len(self.upstreams)):
            server = await loop.create_server(
                functools.partial(self._accept, dst),
                self.host,
                0,
                reuse_address=True,
                backlog=256,
            )
            self._servers.append(server)
            out.append(Endpoint(self.host, int(server.sockets[0].getsockname()[1])))
        return out

    def close(self) -> None:
        """Cut every connection and stop the relays (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown(), 10.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10.0)
        loop.close()
        self._loop = self._thread = None

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for pipe in list(self._pipes):
            pipe.close(abort=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        self._servers.clear()

    def __enter__(self) -> LinkLayer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Any, timeout: float) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- relaying -------------------------------------------------------------------

    def _pair(self, src: int, dst: int) -> PairCounters:
        counters = self._pairs.get((src, dst))
        if counters is None:
            counters = self._pairs[(src, dst)] = PairCounters()
        return counters

    def _accept(self, dst: int) -> asyncio.Protocol:
        return _Side(outbound=True, on_made=lambda side: self._relay(dst, side))

    def _relay(self, dst: int, side: _Side) -> None:
        transport = side.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        src = self._by_source.get(peer[0] if isinstance(peer, tuple) else "", UNKNOWN)
        counters = self._pair(src, dst)
        if (src, dst) in self._blocked:
            counters.refused += 1
            transport.abort()
            return
        counters.connections += 1
        pipe = side.pipe = _Pipe(self, src, dst, side)
        self._pipes.add(pipe)
        transport.pause_reading()  # until the target answers
        assert self._loop is not None
        self._loop.create_task(self._open_upstream(pipe))

    async def _open_upstream(self, pipe: _Pipe) -> None:
        upstream = self.upstreams[pipe.dst]
        loop = asyncio.get_running_loop()
        try:
            _, up = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Side(outbound=False, pipe=pipe),
                    upstream.host,
                    upstream.port,
                ),
                5.0,
            )
        except (OSError, TimeoutError):
            pipe.close(abort=True)
            return
        assert isinstance(up, _Side)
        if pipe.closed:
            if up.transport is not None:
                up.transport.abort()
            return
        pipe.up = up
        pipe.down.other, up.other = up, pipe.down
        if pipe.down.transport is not None:
            pipe.down.transport.resume_reading()

    # -- controls (any thread) ------------------------------------------------------

    def block(self, pairs: Iterable[tuple[int, int]]) -> int:
        """Block ordered pairs ``(src, dst)``; cut their live connections.

        Returns the number of connections cut.
        """
        wanted = set(pairs)
        return int(self._call(self._block(wanted), 10.0))

    async def _block(self, pairs: set[tuple[int, int]]) -> int:
        self._blocked |= pairs
        cut = 0
        for pipe in list(self._pipes):
            if (pipe.src, pipe.dst) in self._blocked:
                pipe.counters.cut += 1
                pipe.close(abort=True)
                cut += 1
        return cut

    def partition(self, *groups: Iterable[int]) -> int:
        """Nodes in different *groups* cannot reach each other (both directions)."""
        sets = [set(g) for g in groups]
        pairs = {
            (a, b)
            for i, ga in enumerate(sets)
            for j, gb in enumerate(sets)
            if i != j
            for a in ga
            for b in gb
        }
        return self.block(pairs)

    def isolate(self, index: int) -> int:
        """Cut node *index* off from every other node."""
        others = [i for i in range(len(self.upstreams)) if i != index]
        return self.partition([index], others)

    def heal(self) -> None:
        """Unblock every pair (nodes reconnect on their own)."""
        self._call(self._heal(), 10.0)

    async def _heal(self) -> None:
        self._blocked.clear()

    @property
    def blocked(self) -> set[tuple[int, int]]:
        return set(self._blocked)

    def counters(self) -> dict[tuple[int, int], PairCounters]:
        """A snapshot of the per-pair counters."""

        async def snap() -> dict[tuple[int, int], PairCounters]:
            return {k: PairCounters(**asdict(v)) for k, v in self._pairs.items()}

        result: dict[tuple[int, int], PairCounters] = self._call(snap(), 10.0)
        return result

    def traffic(self, a: int, b: int) -> int:
        """Bytes relayed so far between nodes *a* and *b* (both directions)."""
        snap = self.counters()
        total = 0
        for key in ((a, b), (b, a)):
            c = snap.get(key)
            if c is not None:
                total += c.bytes_out + c.bytes_in
        return total
