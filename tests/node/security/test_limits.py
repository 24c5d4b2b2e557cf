"""Bounded resources and timeouts of a node, from an attacker's side (issue 12).

Raw sockets against real nodes (in-process, or a ``plexichat-node`` process
where the node's memory is measured).  Each test holds one row of the
limits table in docs/protocol.md ("Limits"):

* a frame must arrive whole within ``--read-timeout`` (the first frame: of
  the accept), however its bytes trickle in;
* a connection without a frame for ``--idle-timeout`` is closed, unless it
  is a peer link or holds a subscription;
* ``--max-connections``: one more connection is told UNAVAILABLE and closed;
* ``--max-inflight``: the node stops reading a connection whose requests it
  has not answered yet (and never waits forever on one it cannot answer);
* ``--max-output``, ``--max-fetches``: a client that floods FETCH and never
  reads keeps the node under 256 MiB while others are served;
* no reply is larger than the frame limit: ERROR TOO_LARGE instead.

The first frames of every raw connection come from :func:`first_frames`
(the one place that knows the handshake).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from plexichat import wire
from plexichat.load.client import NodeClient
from plexichat.node import cli
from plexichat.node import protocol as p
from plexichat.node import server as node_server
from plexichat.node.membership import GossipConfig
from plexichat.node.server import NodeConfig
from plexichat.node.testing import InProcessCluster, wait_for
from plexichat.node.transport import FrameConnection
from plexichat.routing import key_of

T = wire.MessageType
RSS_BOUND = 256 << 20  # docs/protocol.md "Limits": the FETCH flood bound


# -- raw clients ---------------------------------------------------------------------


def token_for(node: Any) -> str | None:
    """An admin client token for in-process *node* (None: it has no credentials)."""
    creds = getattr(node, "credentials", None)
    return None if creds is None else str(creds.token(1, admin=True))


def first_frames(token: str | None, rid: int = 1) -> bytes:
    """What a raw client sends first: HELLO, with the token when there is one."""
    hello: dict[str, Any] = {"version": p.PROTOCOL_VERSION, "role": "client"}
    if token is not None:
        hello["token"] = token
    return wire.encode_frame(T.HELLO, rid, p.encode_json(hello))


def client(port: int, token: str | None) -> NodeClient:
    """A (not yet connected) NodeClient of the node on *port*."""
    if token is None:
        return NodeClient("127.0.0.1", port, timeout=10.0)
    return NodeClient("127.0.0.1", port, timeout=10.0, token=token)


class Raw:
    """A raw connection: bytes out, frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.decoder = wire.FrameDecoder(wire.MAX_PAYLOAD)
        self.frames: list[wire.Frame] = []

    @classmethod
    async def open(cls, port: int, token: str | None = None, *, hello: bool = True):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        raw = cls(reader, writer)
        if hello:
            raw.write(first_frames(token))
            assert kind(await raw.frame())[0] == T.WELCOME
        return raw

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def frame(self, timeout: float = 5.0) -> wire.Frame | None:
        """The next frame (None: the node closed the connection)."""
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            if not data:
                return None
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def until_closed(self, timeout: float) -> list[wire.Frame]:
        """Every frame until the node closes the connection (within *timeout*)."""
        seen = []
        async with asyncio.timeout(timeout):
            while (frame := await self.frame(timeout)) is not None:
                seen.append(frame)
        return seen

    def close(self) -> None:
        self.writer.close()


def kind(frame: wire.Frame | None) -> tuple[int, int]:
    """(type, request id) of a frame that came (None: the connection closed)."""
    assert frame is not None, "the node closed the connection"
    return frame.type, frame.request_id


def error_code(frame: wire.Frame | None) -> int:
    assert kind(frame)[0] == T.ERROR, frame
    assert frame is not None
    return p.decode_error(frame.payload)[0]


def solo(tmp_path: Path, **options: Any) -> InProcessCluster:
    return InProcessCluster(tmp_path, size=1, replicas=1, **options)


# -- deadlines -----------------------------------------------------------------------


def test_a_trickled_frame_is_cut_off_by_the_whole_frame_deadline(tmp_path, run):
    """One byte every 0.3 s: every byte used to restart the read timeout, so
    the connection stayed open as long as the trickle lasted."""

    async def scenario() -> None:
        async with solo(tmp_path, read_timeout=1.0) as cluster:
            node = cluster.nodes[0]
            raw = await Raw.open(node.listen_port, token_for(node))
            frame = wire.encode_frame(T.PING, 7, b"x" * 16)  # 32 bytes: 9.6 s
            start = time.monotonic()

            async def trickle() -> None:
                for i in range(len(frame)):
                    raw.write(frame[i : i + 1])
                    await asyncio.sleep(0.3)

            task = asyncio.create_task(trickle())
            try:
                seen = await raw.until_closed(timeout=5.0)
            finally:
                task.cancel()
            elapsed = time.monotonic() - start
            assert [error_code(f) for f in seen] == [p.ErrorCode.TIMEOUT]
            assert 0.9 < elapsed < 3.0, elapsed
            assert node.counters["timeouts_closed"] == 1

    run(scenario())


def test_a_silent_connection_is_closed_by_default(tmp_path, run):
    """Default settings: a connection that never sends a whole frame is closed
    after 10 s (--read-timeout, or --auth-timeout as it is unauthenticated);
    one that said HELLO stays (it is idle only after --idle-timeout, 300 s,
    and never while subscribed)."""

    async def scenario() -> None:
        async with solo(tmp_path) as cluster:
            node = cluster.nodes[0]
            assert node.config.read_timeout == 10.0
            talker = await Raw.open(node.listen_port, token_for(node))
            start = time.monotonic()
            silent = await Raw.open(node.listen_port, hello=False)
            seen = await silent.until_closed(timeout=14.0)
            elapsed = time.monotonic() - start
            # whichever of the two 10 s defaults fires first: no whole frame
            # (--read-timeout) or no authentication (--auth-timeout)
            closed_by = {p.ErrorCode.TIMEOUT, p.ErrorCode.UNAUTHENTICATED}
            assert len(seen) == 1
            assert error_code(seen[0]) in closed_by
            assert 9.5 < elapsed < 12.5, elapsed
            talker.write(wire.encode_frame(T.PING, 2, b""))
            assert kind(await talker.frame()) == (T.PONG, 2)
            talker.close()

    run(scenario(), timeout=25.0)
    assert NodeConfig(node_id="x", data_dir=tmp_path).idle_timeout == 300.0
    args = cli.build_parser().parse_args(["--node-id", "x", "--data-dir", "d"])
    assert (args.read_timeout, args.idle_timeout) == (10.0, 300.0)


def test_idle_connections_are_closed_but_subscribers_are_not(tmp_path, run):
    async def scenario() -> None:
        async with solo(tmp_path, idle_timeout=1.0) as cluster:
            node = cluster.nodes[0]
            token = token_for(node)
            idle = await Raw.open(node.listen_port, token)
            subscriber = await Raw.open(node.listen_port, token)
            subscriber.write(
                wire.encode_frame(T.SUBSCRIBE, 2, p.encode_channel(key_of("quiet")))
            )
            assert kind(await subscriber.frame()) == (T.ACK, 2)
            start = time.monotonic()
            assert await idle.until_closed(timeout=5.0) == []
            assert 0.9 < time.monotonic() - start < 3.5
            assert node.counters["idle_closed"] == 1
            await asyncio.sleep(1.5)  # quiet for longer than the idle timeout
            subscriber.write(wire.encode_frame(T.PING, 3, b""))
            assert kind(await subscriber.frame()) == (T.PONG, 3)
            subscriber.close()

    run(scenario())


def test_quiet_peer_links_are_not_idle(tmp_path, run):
    """Peers may say nothing for a while (a probe every 3 s here): the idle
    timeout (0.5 s here) leaves their links alone."""
    quiet = GossipConfig(interval=3.0, ping_timeout=0.5, suspect_timeout=30.0)

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path, size=2, replicas=1, gossip=quiet, idle_timeout=0.5
        ) as cluster:

            def peer_links() -> set[FrameConnection]:
                return {c for n in cluster.nodes for c in n.conns if c.role == "peer"}

            await wait_for(lambda: len(peer_links()) >= 2, 10, "a link each way")
            links = peer_links()
            await asyncio.sleep(4.0)
            assert [n.counters["idle_closed"] for n in cluster.nodes] == [0, 0]
            assert links <= peer_links()

    run(scenario())


# -- connections and requests --------------------------------------------------------


def test_connections_over_the_cap_are_refused(tmp_path, run):
    async def scenario() -> None:
        async with solo(tmp_path, max_connections=8) as cluster:
            node = cluster.nodes[0]
            token = token_for(node)
            held = [await Raw.open(node.listen_port, token) for _ in range(8)]
            extra = await Raw.open(node.listen_port, hello=False)
            seen = await extra.until_closed(timeout=5.0)
            assert [error_code(f) for f in seen] == [p.ErrorCode.UNAVAILABLE]
            assert node.counters["connections_refused"] == 1
            assert len(node.conns) == 8
            held.pop().close()
            await wait_for(lambda: len(node.conns) == 7, 5, "a slot freed")
            again = await Raw.open(node.listen_port, token)  # WELCOME again
            for raw in [*held, again]:
                raw.close()

    run(scenario())


def test_a_connection_with_too_many_requests_in_flight_is_not_read(
    tmp_path, monkeypatch, run
):
    """Reading stops at --max-inflight unanswered requests and resumes as
    replies go out: every request is answered, never more than 4 at once."""
    replies: dict[int, int] = {}  # connection id -> replies sent (request id != 0)
    send = FrameConnection.send

    def counting_send(self: FrameConnection, type: int, rid: int, body: bytes) -> None:
        if rid:
            replies[id(self)] = replies.get(id(self), 0) + 1
        send(self, type, rid, body)

    monkeypatch.setattr(FrameConnection, "send", counting_send)

    async def scenario() -> None:
        async with solo(tmp_path, max_inflight=4) as cluster:
            node = cluster.nodes[0]
            requests: dict[int, int] = {}  # connection id -> requests dispatched
            in_flight: list[int] = []  # at each dispatch, on the flooding connection
            on_frames = node._on_frames

            def spy(conn: FrameConnection, frames: list[wire.Frame]) -> None:
                key = id(conn)
                requests[key] = requests.get(key, 0) + sum(1 for f in frames if f[1])
                if requests[key] > 1:  # (not the HELLO-only connection start)
                    in_flight.append(requests[key] - replies.get(key, 0))
                on_frames(conn, frames)

            node._on_frames = spy  # type: ignore[method-assign]
            channel = key_of("paged")
            writer = client(node.listen_port, token_for(node))
            await writer.connect()
            for i in range(5):
                await writer.send(channel, p.message_id(1, i), 1, b"m%d" % i)
            in_flight.clear()
            raw = await Raw.open(node.listen_port, token_for(node))
            fetch = p.encode_fetch(channel, 0, 1000)
            raw.write(
                b"".join(wire.encode_frame(T.FETCH, i, fetch) for i in range(2, 202))
            )
            answers = [await raw.frame() for _ in range(200)]
            assert sorted(f.request_id for f in answers if f) == list(range(2, 202))
            assert {f.type for f in answers if f} == {T.MESSAGES}
            assert max(in_flight) <= 4, max(in_flight)
            assert len(in_flight) > 1  # dispatched in several goes
            for conn in node.conns:
                assert (conn.inflight, conn.holding, conn.paused) == (0, False, False)
            raw.close()
            await writer.close()

    run(scenario())


def test_requests_that_are_never_answered_do_not_stop_a_connection(
    tmp_path, monkeypatch, run
):
    """ERROR frames with a request id are never answered: once they fill the
    in-flight limit the count stands still, and the node stops waiting for
    it (after STUCK_AFTER, 60 s; 0.5 s here) instead of never reading again."""
    monkeypatch.setattr(node_server, "STUCK_AFTER", 0.5)

    async def scenario() -> None:
        async with solo(tmp_path, max_inflight=2) as cluster:
            node = cluster.nodes[0]
            raw = await Raw.open(node.listen_port, token_for(node))
            errors = b"".join(
                wire.encode_frame(T.ERROR, rid, p.encode_error(1, "x"))
                for rid in (2, 3, 4)
            )
            raw.write(errors + wire.encode_frame(T.PING, 9, b""))
            assert kind(await raw.frame(timeout=5.0)) == (T.PONG, 9)
            assert node.counters["inflight_resets"] >= 1
            raw.close()

    run(scenario())


def test_a_fetch_reads_about_one_frame_of_records_from_the_store(tmp_path, run):
    """A FETCH of a channel of big messages used to load its whole page limit
    (here 40 x 250 KiB) from the store to send 4 of them; it reads a few
    no more than fit in a frame now, and pages still hold every record once.
    Small messages first and big ones after cannot make one read large."""

    async def scenario() -> None:
        async with solo(tmp_path) as cluster:
            node = cluster.nodes[0]
            writer = client(node.listen_port, token_for(node))
            await writer.connect()
            big, small = key_of("big"), key_of("small")
            for i in range(40):
                body = bytes([i]) * (250 << 10)
                await writer.send(big, p.message_id(1, i), 1, body)
            for i in range(300):
                await writer.send(small, p.message_id(1, 100 + i), 1, b"s%d" % i)
            mixed = key_of("mixed")
            for i in range(84):
                body = b"tiny" if i < 4 else bytes([i]) * (250 << 10)
                await writer.send(mixed, p.message_id(1, 1000 + i), 1, body)
            read: list[int] = []
            read_bytes: list[int] = []
            fetch = node.storage.fetch

            async def counting_fetch(
                channel: int, after: int, limit: int, max_bytes: int | None = None
            ) -> Any:
                rows = await fetch(channel, after, limit, max_bytes)
                read.append(len(rows))
                read_bytes.append(sum(len(r.payload) for r in rows))
                return rows

            node.storage.fetch = counting_fetch  # type: ignore[method-assign]
            for channel, count in ((big, 40), (small, 300)):
                seqs: list[int] = []
                more = True
                while more:
                    read.clear()
                    records, more = await writer.fetch(channel, seqs[-1] if seqs else 0)
                    seqs += [r.seq for r in records]
                    if channel == big:
                        assert len(records) == 4
                        assert sum(read) <= 6, read
                assert seqs == list(range(1, count + 1))
            read_bytes.clear()
            records, more = await writer.fetch(mixed, 0)
            assert (len(records), more) == (8, True)  # 4 tiny, 4 big
            assert max(read_bytes) <= 1 << 20, read_bytes  # 80 were there
            await writer.close()

    run(scenario())


# -- replies -------------------------------------------------------------------------


def test_a_reply_over_the_frame_limit_is_an_error_and_the_connection_lives(
    tmp_path, run
):
    """A reply larger than the frame limit (1 MiB: what every reader accepts
    by default) or than the wire maximum (16 MiB) is answered with ERROR
    TOO_LARGE; the connection keeps working."""

    async def scenario() -> None:
        async with solo(tmp_path) as cluster:
            node = cluster.nodes[0]
            raw = await Raw.open(node.listen_port, token_for(node))
            for rid, size in ((2, 2 << 20), (3, 17 << 20)):
                node.control.info = lambda size=size: {"pad": "x" * size}
                raw.write(wire.encode_frame(T.STATS, rid, b""))
                frame = await raw.frame()
                assert error_code(frame) == p.ErrorCode.TOO_LARGE
                assert kind(frame)[1] == rid
            raw.write(wire.encode_frame(T.PING, 4, b""))
            assert kind(await raw.frame()) == (T.PONG, 4)
            raw.close()

    run(scenario())


def test_a_node_never_takes_a_message_it_could_not_serve_in_a_frame(tmp_path):
    """A page (MESSAGES) or a DELIVER of the largest message must fit in a
    frame, or that message could be stored and never read."""
    with pytest.raises(ValueError, match="max_message"):
        NodeConfig(node_id="x", data_dir=tmp_path, max_message=wire.MAX_PAYLOAD)
    with pytest.raises(ValueError, match="max_message"):
        NodeConfig(
            node_id="x",
            data_dir=tmp_path,
            max_frame=wire.HARD_MAX_PAYLOAD,
            max_message=wire.HARD_MAX_PAYLOAD - 32,
        )
    args = ["--node-id", "x", "--data-dir", str(tmp_path), "--max-message", "1048576"]
    assert cli.main(args) == 2


# -- a flood against a node process --------------------------------------------------


class NodeProcess:
    """``plexichat-node`` in a process of its own (its memory is its own)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.data_dir = tmp_path / "solo"
        self.log = tmp_path / "solo.log"
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def __aenter__(self) -> NodeProcess:
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "plexichat.node.cli",
                "--node-id",
                "solo",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(self.data_dir),
                "--replicas",
                "1",
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert line.startswith(b"ready solo "), (line, self.log.read_text()[-2000:])
        self.port = int(line.split(b":")[-1])
        return self

    @property
    def token(self) -> str | None:
        """The admin token a node started without credentials made for itself."""
        path = self.data_dir / "auth" / "admin.token"
        return path.read_text().strip() if path.exists() else None

    def status(self, field: str) -> int:
        """A memory figure of the process (``VmRSS``, ``VmHWM``) in bytes."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    async def __aexit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def flood(port: int, token: str | None, channel: int, until: float) -> int:
    """FETCH frames from connections that never read, reconnecting whenever the
    node drops one, until *until*; returns the connections used."""
    loop = asyncio.get_running_loop()
    fetches = b"".join(
        wire.encode_frame(T.FETCH, i, p.encode_fetch(channel, 0, 1000))
        for i in range(2, 1002)
    )
    used = 0
    while time.monotonic() < until:
        used += 1
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        try:
            data = first_frames(token) + fetches
            while time.monotonic() < until:  # keep writing, never read
                with contextlib.suppress(BlockingIOError):
                    sent = sock.send(data)
                    data = data[sent:] or fetches
                await asyncio.sleep(0.001)
        except OSError:  # dropped by the node: come back
            pass
        finally:
            sock.close()
    return used


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="POSIX only")
def test_a_fetch_flood_that_never_reads_keeps_the_node_small(tmp_path, run):
    """Connections that write FETCH for a channel of 8 x 256 KiB messages and
    never read (1000 of them once drove a node to 2.6 GiB) keep the node's
    peak RSS under 256 MiB, while another client's SENDs are acknowledged."""

    async def scenario() -> None:
        async with NodeProcess(tmp_path) as node:
            channel = key_of("big")
            sender = client(node.port, node.token)
            await sender.connect()
            for i in range(8):
                body = bytes([i]) * (256 << 10)
                await sender.send(channel, p.message_id(1, i), 1, body)
            idle_rss = node.status("VmRSS")
            peak = 0

            async def sample() -> None:  # ends (and so the flood) past the bound
                nonlocal peak
                while peak < RSS_BOUND:
                    peak = max(peak, node.status("VmRSS"))
                    await asyncio.sleep(0.01)

            sampler = asyncio.create_task(sample())
            until = time.monotonic() + 6.0
            flooding = asyncio.create_task(flood(node.port, node.token, channel, until))
            latencies: list[float] = []
            other = key_of("chat")
            while not flooding.done() and not sampler.done():
                t0 = time.monotonic()
                send = sender.send(other, p.message_id(1, 100 + len(latencies)), 1, b"")
                try:
                    await asyncio.wait_for(send, 3.0)
                except TimeoutError:
                    latencies.append(float("inf"))
                    break
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.02)
            flooding.cancel()
            sampler.cancel()
            connections = await asyncio.gather(flooding, return_exceptions=True)
            hwm = node.status("VmHWM")
            print(
                f"idle RSS {idle_rss >> 20} MiB, peak {hwm >> 20} MiB (sampled "
                f"{peak >> 20}); flood connections {connections}; "
                f"{len(latencies)} SENDs, slowest {max(latencies) * 1000:.0f} ms"
            )
            assert hwm < RSS_BOUND, f"peak RSS {hwm >> 20} MiB"
            assert len(latencies) >= 20
            assert max(latencies) < 3.0, latencies
            assert connections[0] >= 2  # the node dropped flooders, they came back
            await sender.close()

    run(scenario(), timeout=40.0)
