"""Wire fuzz over real sockets: 100k random and mutated frames against a
2-node cluster while a well-behaved client writes; no handler may crash and
every acknowledged message must stay where its ACK said.

The seed is printed; ``PLEXICHAT_FUZZ_SEED=<n>`` replays a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter
from typing import Any

from plexichat import wire
from plexichat.node import protocol as p
from plexichat.node.testing import InProcessCluster
from plexichat.node.transport import RemoteError
from plexichat.routing import key_of

T = wire.MessageType
FRAMES = 100_000
CONNECTIONS = 8
DEADLINE = 120.0  # seconds for the whole fuzz (it takes a few on a quiet core)
CHANNELS = [key_of(f"fuzz-{i}") for i in range(8)]
RETRY = (p.ErrorCode.UNAVAILABLE, p.ErrorCode.TIMEOUT)


def _mutate(rng: random.Random, body: bytes) -> bytes:
    """Flip, cut, grow or splice *body* (or leave it whole, sometimes)."""
    choice = rng.random()
    data = bytearray(body)
    if choice < 0.2 or not data:
        return bytes(data)
    if choice < 0.5:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if choice < 0.65:
        return bytes(data[: rng.randrange(len(data))])
    if choice < 0.8:
        return bytes(data) + rng.randbytes(rng.randint(1, 16))
    if choice < 0.9:  # an extreme integer where one sits
        at = rng.randrange(max(1, len(data) - 7))
        data[at : at + 8] = rng.choice(
            [b"\xff" * 8, b"\x80" + b"\x00" * 7, b"\x7f" + b"\xff" * 7]
        )
        return bytes(data[: len(body) + 8])
    return rng.randbytes(rng.randint(0, 64))


def _body(rng: random.Random, ftype: int, sender: int, counter: int) -> bytes:
    """A valid body of *ftype* (as far as a client can make one)."""
    channel = rng.choice(CHANNELS) if rng.random() < 0.8 else rng.getrandbits(64)
    if ftype == T.SEND:
        msg_id = p.message_id(sender, counter)
        return p.encode_send(channel, msg_id, sender, rng.randbytes(rng.randint(0, 40)))
    if ftype == T.FETCH:
        after = rng.choice([0, 1, rng.getrandbits(64), 2**63 - 1, 2**63])
        return p.encode_fetch(channel, after, rng.choice([0, 1, 1000, 2**32 - 1]))
    if ftype == T.SUBSCRIBE:
        return p.encode_channel(channel)
    if ftype == T.RELAY:
        relay = p.Relay(
            rng.getrandbits(64),
            time.time_ns(),
            rng.randrange(256),
            rng.randrange(256),
            "" if rng.random() < 0.7 else "n0",
            rng.randbytes(8),
        )
        return p.encode_relay(relay)
    if ftype in (T.STATS, T.GOSSIP, T.PING, T.HELLO):
        docs: list[dict[str, Any]] = [
            {},
            {"reset": ["send", 3, None]},
            {"kind": "join", "member": ["x", "127.0.0.1", 9, 1, "alive", 1e308]},
            {"from": "x", "updates": [["x", "h", 99999, 0, "alive", -1]]},
            {"version": 1, "role": "client", "token": "a.b.c"},
            {"version": 1, "role": "peer", "node_id": "n0", "nonce": "00" * 16},
            {"version": 1, "role": "peer", "node_id": "n0", "proof": "00"},
        ]
        return p.encode_json(rng.choice(docs))
    return rng.randbytes(rng.randint(0, 48))


def received(cluster: InProcessCluster) -> int:
    """Whole frames the nodes have read (closed and open connections)."""
    return sum(
        n.counters["frames_received"] + sum(c.rx_frames for c in n.conns)
        for n in cluster.nodes
    )


async def _fuzz_connection(
    cluster: InProcessCluster,
    port: int,
    rng: random.Random,
    token: str | None,
    sender: int,
    errors: Counter[int],
) -> int:
    """Send frames until the nodes have read :data:`FRAMES` of them; reconnect
    whenever the node closes the connection.  Returns the frames sent."""
    sent = 0
    counter = 0
    while received(cluster) < FRAMES:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        drain = asyncio.ensure_future(_read_replies(reader, errors))
        try:
            if token is not None:
                hello = {"version": 1, "role": "client", "token": token}
                writer.write(wire.encode_frame(T.HELLO, 1, p.encode_json(hello)))
            while received(cluster) < FRAMES and not drain.done():
                chunk = []
                for _ in range(64):
                    roll = rng.random()
                    if roll < 0.0005:  # bytes that are not a frame: the node hangs up
                        chunk.append(rng.randbytes(rng.randint(1, 40)))
                        break
                    ftype = rng.randint(1, 18)
                    counter += 1
                    body = _mutate(rng, _body(rng, ftype, sender, counter))
                    chunk.append(wire.encode_frame(ftype, rng.getrandbits(32), body))
                sent += len(chunk)
                writer.write(b"".join(chunk))
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(writer.drain(), 10)
        finally:
            writer.close()
            drain.cancel()
            with contextlib.suppress(BaseException):
                await drain
    return sent


async def _read_replies(reader: asyncio.StreamReader, errors: Counter[int]) -> None:
    """Read the node's replies, counting ERROR codes in *errors*."""
    decoder = wire.FrameDecoder()
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 16):
            for frame in decoder.feed(data):
                if frame.type == T.ERROR:
                    errors[p.decode_error(frame.payload)[0]] += 1


async def _honest_writes(cluster: InProcessCluster, count: int) -> list[Any]:
    """Acknowledged writes of a client that plays by the rules."""
    sender = 424242
    acked: list[tuple[int, int, bytes, bytes]] = []
    async with cluster.client(cluster.nodes[0], sender) as client:
        for i in range(1, count + 1):
            channel = CHANNELS[i % len(CHANNELS)]
            msg_id = p.message_id(sender, i)
            body = f"honest {i}".encode()
            for _ in range(50):  # retried as a chat client does
                try:
                    seq = await client.send(channel, msg_id, sender, body)
                    break
                except RemoteError as exc:
                    if exc.code not in RETRY:
                        raise
                    await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"message {i} never acknowledged")
            acked.append((channel, seq, msg_id, body))
    return acked


def test_a_wire_fuzz_crashes_nothing_and_loses_nothing(tmp_path, caplog):
    seed = int(os.environ.get("PLEXICHAT_FUZZ_SEED", random.randrange(2**32)))
    print(f"fuzz seed {seed} (PLEXICHAT_FUZZ_SEED={seed} replays it)")
    caplog.set_level(logging.ERROR, logger="plexichat")
    crashes: list[dict[str, Any]] = []

    async def scenario() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: crashes.append(context)
        )
        async with InProcessCluster(tmp_path, size=2) as cluster:
            started = time.monotonic()
            errors: Counter[int] = Counter()
            fuzzers = [
                _fuzz_connection(
                    cluster,
                    cluster.nodes[i % 2].listen_port,
                    random.Random(seed * 1000 + i),
                    cluster.token(1000 + i) if i % 2 else None,
                    1000 + i,
                    errors,
                )
                for i in range(CONNECTIONS)
            ]
            honest = asyncio.ensure_future(_honest_writes(cluster, 400))
            sent = await asyncio.wait_for(asyncio.gather(*fuzzers), DEADLINE)
            acked = await asyncio.wait_for(honest, DEADLINE)
            elapsed = time.monotonic() - started
            print(
                f"fuzz: {sum(sent):,} frames sent, {received(cluster):,} read by "
                f"the nodes in {elapsed:.1f} s"
            )
            assert received(cluster) >= FRAMES
            codes = {p.ErrorCode(c).name: n for c, n in errors.items()}
            print(f"fuzz: errors answered {codes}")
            # bad input is the sender's fault, never the node's
            assert errors[p.ErrorCode.INTERNAL] == 0, codes
            # every acknowledged message is where its ACK put it, on both nodes
            for node in cluster.nodes:
                for channel, seq, msg_id, body in acked:
                    rows = await node.storage.fetch(channel, seq - 1, 1)
                    assert [(r.seq, r.msg_id, r.payload) for r in rows] == [
                        (seq, msg_id, body)
                    ], (node.id, channel, seq)
            # both nodes still serve
            async with cluster.client(cluster.nodes[1], 7) as client:
                seq = await client.send(CHANNELS[0], p.message_id(7, 1), 7, b"after")
                assert seq > 0
            for node in cluster.nodes:
                assert not node.stopping

    asyncio.run(scenario())
    assert crashes == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors[:5]]
