"""Ratio-check cases of the wire family (``python -m plexichat.accel bench``).

Every case works on 1000 frames with deterministic payloads: batch encoding
into a reused ``bytearray`` (64 B and 1 KiB payloads), ``decode_frames`` of a
whole buffer, and a ``FrameDecoder`` fed 1500-byte chunks or the whole buffer.
Peers: msgpack packing/unpacking the same ``(type, request_id, payload)``
tuples (no checksum, so a lower bound for any framing), and a plain memory
copy of the encoded byte count into a preallocated ``bytearray`` (the speed
of light for an encoder that has to touch every byte).
"""

from __future__ import annotations

import random
from types import ModuleType

from plexichat.accel.bench import BenchCase, Workload

FRAMES = 1000
CHUNK = 1500  # stream decoding: bytes per feed(), one Ethernet MTU
Batch = list[tuple[int, int, bytes]]


def batch(size: int, count: int = FRAMES, seed: int = 1) -> Batch:
    """*count* frames of *size* payload bytes, deterministic for a seed."""
    rng = random.Random(seed)
    return [
        (1 + i % 18, rng.getrandbits(32), rng.randbytes(size)) for i in range(count)
    ]


def encoded(frames: Batch) -> bytes:
    """The reference encoding of *frames* (the decode workloads' input)."""
    from plexichat.wire import _reference

    out = bytearray()
    _reference.encode_frames(frames, out)
    return bytes(out)


def encode_case(name: str, size: int) -> BenchCase:
    frames = batch(size)
    total = len(encoded(frames))

    def make(module: ModuleType) -> Workload:
        out = bytearray()
        encode_frames = module.encode_frames

        def work() -> int:
            del out[:]
            n: int = encode_frames(frames, out)
            return n

        return work

    def memcpy() -> Workload:
        source = encoded(frames)
        target = memoryview(bytearray(total))

        def work() -> None:
            target[:] = source

        return work

    def msgpack_packb() -> Workload:
        import msgpack

        packb = msgpack.packb
        return lambda: packb(frames)

    return BenchCase(
        name,
        make,
        peers={"memcpy": memcpy, "msgpack": msgpack_packb},
        units=FRAMES,
        nbytes=total,
    )


def decode_case() -> BenchCase:
    frames = batch(64)
    data = encoded(frames)

    def make(module: ModuleType) -> Workload:
        decode_frames = module.decode_frames
        return lambda: decode_frames(data)

    def msgpack_unpack() -> Workload:
        import msgpack

        stream = b"".join(msgpack.packb(frame) for frame in frames)

        def work() -> list[object]:
            unpacker = msgpack.Unpacker()
            unpacker.feed(stream)
            return list(unpacker)

        return work

    return BenchCase(
        "decode_64",
        make,
        peers={"msgpack": msgpack_unpack},
        units=FRAMES,
        nbytes=len(data),
    )


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def stream_case(chunk: int | None = CHUNK) -> BenchCase:
    """A FrameDecoder fed *chunk* bytes at a time (None: the whole buffer)."""
    frames = batch(64)
    data = encoded(frames)
    pieces = chunks(data, chunk or len(data))

    def make(module: ModuleType) -> Workload:
        decoder_class = module.FrameDecoder

        def work() -> int:
            decoder = decoder_class()
            count = 0
            for piece in pieces:
                count += len(decoder.feed(piece))
            return count

        return work

    def msgpack_unpacker() -> Workload:
        import msgpack

        stream = b"".join(msgpack.packb(frame) for frame in frames)
        stream_pieces = chunks(stream, chunk or len(stream))

        def work() -> int:
            unpacker = msgpack.Unpacker()
            count = 0
            for piece in stream_pieces:
                unpacker.feed(piece)
                for _ in unpacker:
                    count += 1
            return count

        return work

    return BenchCase(
        "stream_decode_64" if chunk else "stream_feed_whole_64",
        make,
        peers={"msgpack": msgpack_unpacker},
        units=FRAMES,
        nbytes=len(data),
    )


def cases() -> list[BenchCase]:
    """The wire family's operations, timed on every backend and peer."""
    return [
        encode_case("encode_batch_64", 64),
        encode_case("encode_batch_1k", 1024),
        decode_case(),
        stream_case(),
        stream_case(None),
    ]
