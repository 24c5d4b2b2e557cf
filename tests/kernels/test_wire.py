"""Wire codec: every backend against docs/protocol.md and the reference codec."""

from __future__ import annotations

import itertools
import pickle
import random
import struct
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plexichat.wire import _reference as reference
from plexichat.wire._types import (
    HARD_MAX_PAYLOAD,
    MAX_PAYLOAD,
    Frame,
    MessageType,
    WireError,
)

SETTINGS = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# -- helpers -------------------------------------------------------------------


def frame_bytes(type: int, request_id: int, payload: bytes) -> bytes:
    """A frame built straight from docs/protocol.md (independent of any codec)."""
    body = struct.pack(">2sBBII", b"PX", 1, type, request_id, len(payload)) + payload
    return body + struct.pack(">I", xxhash.xxh3_64_intdigest(body) & 0xFFFFFFFF)


def sample_frames(count: int = 12, seed: int = 0) -> list[tuple[int, int, bytes]]:
    rng = random.Random(seed)
    sizes = [0, 1, 7, 64, 200, 241, 1024, 3000]
    return [
        (1 + i % 18, rng.getrandbits(32), rng.randbytes(sizes[i % len(sizes)]))
        for i in range(count)
    ]


def stream_of(frames: list[tuple[int, int, bytes]]) -> bytes:
    return b"".join(frame_bytes(*f) for f in frames)


def outcome(call: Callable[[], object]) -> tuple[object, ...]:
    """A comparable result: the value, or the error with its reason/offset/text."""
    try:
        return ("ok", call())
    except WireError as exc:
        return ("wire", exc.reason, exc.offset, str(exc))
    except (ValueError, TypeError, BufferError, OverflowError) as exc:
        return ("error", type(exc), str(exc))


def error_kind(call: Callable[[], object]) -> tuple[object, ...]:
    """Like :func:`outcome` but only the exception type (messages may differ)."""
    result = outcome(call)
    return result if result[0] != "error" else result[:2]


def feed_all(decoder: object, pieces: list[bytes]) -> list[tuple[object, ...]]:
    """Feed *pieces*, recording every step's outcome and the decoder's counters."""
    steps: list[tuple[object, ...]] = []
    for piece in pieces:
        steps.append(outcome(lambda p=piece: decoder.feed(p)))  # type: ignore[attr-defined]
        steps.append((decoder.pending, decoder.consumed))  # type: ignore[attr-defined]
    steps.append(outcome(decoder.close))  # type: ignore[attr-defined]
    steps.append((decoder.pending, decoder.consumed))  # type: ignore[attr-defined]
    return steps


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def wire_error(call: Callable[[], object]) -> WireError:
    with pytest.raises(WireError) as info:
        call()
    return info.value


# -- round trips and byte identity ---------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 16, 64, 240, 241, 1024, 65536])
def test_encode_frame_matches_spec(wire_impl: ModuleType, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    for type in (1, 9, 18):
        for request_id in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
            expected = frame_bytes(type, request_id, payload)
            assert wire_impl.encode_frame(type, request_id, payload) == expected


def test_round_trip_every_type(wire_impl: ModuleType) -> None:
    frames = [(int(t), 1000 + t, bytes([t]) * t) for t in MessageType]
    out = bytearray()
    assert wire_impl.encode_frames(frames, out) == len(out)
    decoded = wire_impl.decode_frames(out)
    assert decoded == [Frame(*f) for f in frames]
    assert all(type(f) is Frame for f in decoded)
    assert all(type(f.payload) is bytes for f in decoded)
    assert hash(decoded[4]) == hash(Frame(*frames[4]))
    assert pickle.loads(pickle.dumps(decoded)) == decoded


def test_encode_frames_appends(wire_impl: ModuleType) -> None:
    frames = sample_frames()
    out = bytearray(b"prefix")
    written = wire_impl.encode_frames(frames, out)
    assert bytes(out) == b"prefix" + stream_of(frames)
    assert written == len(out) - len(b"prefix")
    assert wire_impl.encode_frames(iter(frames), out) == written  # any iterable
    assert bytes(out) == b"prefix" + stream_of(frames) * 2
    assert wire_impl.encode_frames([], out) == 0
    assert wire_impl.encode_frames((f for f in ()), out) == 0
    assert len(out) == len(b"prefix") + 2 * written


def test_subclassed_containers(wire_impl: ModuleType) -> None:
    class Out(bytearray):
        pass

    class Frames(list):  # type: ignore[type-arg]
        pass

    class Payload(bytes):
        pass

    frames = Frames([(1, 2, Payload(b"xyz")), (3, 4, Out(b"abc"))])
    out = Out(b"ab")
    assert wire_impl.encode_frames(frames, out) == len(out) - 2
    assert bytes(out) == b"ab" + frame_bytes(1, 2, b"xyz") + frame_bytes(3, 4, b"abc")
    assert wire_impl.decode_frames(Out(out[2:])) == [
        Frame(1, 2, b"xyz"),
        Frame(3, 4, b"abc"),
    ]
    assert wire_impl.FrameDecoder().feed(Payload(out[2:])) == [
        Frame(1, 2, b"xyz"),
        Frame(3, 4, b"abc"),
    ]


def test_encode_frames_reused_buffer(wire_impl: ModuleType) -> None:
    out = bytearray()
    for seed in range(5):
        frames = sample_frames(40 + seed, seed)
        del out[:]
        wire_impl.encode_frames(frames, out)
        assert bytes(out) == stream_of(frames)


def test_large_batch_and_frame(wire_impl: ModuleType) -> None:
    frames = [(3, i, bytes([i % 256]) * 1024) for i in range(300)]  # > 64 KiB
    out = bytearray()
    wire_impl.encode_frames(frames, out)
    assert bytes(out) == stream_of(frames)
    big = bytes(range(256)) * (MAX_PAYLOAD // 256)
    encoded = wire_impl.encode_frame(5, 7, big)
    assert encoded == frame_bytes(5, 7, big)
    assert wire_impl.decode_frames(encoded) == [Frame(5, 7, big)]


def test_concurrent_encoding(wire_impl: ModuleType) -> None:
    """Large batches (encoded without the GIL in Cython) from several threads."""
    batches = [sample_frames(120, seed) for seed in range(4)]
    expected = [stream_of(frames) for frames in batches]

    def work(index: int) -> bool:
        out = bytearray()
        for _ in range(20):
            del out[:]
            wire_impl.encode_frames(batches[index], out)
            if out != expected[index]:
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


@pytest.mark.parametrize(
    "payload",
    [
        bytearray(b"abc"),
        memoryview(b"abcdef"),
        memoryview(b"abcdef")[1:4],
        memoryview(b"abcdef")[::2],  # not contiguous
        array("H", [1, 2, 0xFFFF]),  # items wider than a byte
        memoryview(bytes(range(12))).cast("B", (3, 4)),  # two-dimensional
    ],
    ids=["bytearray", "memoryview", "slice", "strided", "array", "2d"],
)
def test_payload_types(wire_impl: ModuleType, payload: object) -> None:
    flat = memoryview(payload).tobytes()  # type: ignore[arg-type]
    assert wire_impl.encode_frame(4, 9, payload) == frame_bytes(4, 9, flat)
    out = bytearray()
    wire_impl.encode_frames([(4, 9, payload)], out)
    assert bytes(out) == frame_bytes(4, 9, flat)


def test_decode_input_types(wire_impl: ModuleType) -> None:
    data = stream_of(sample_frames())
    expected = wire_impl.decode_frames(data)
    assert wire_impl.decode_frames(bytearray(data)) == expected
    assert wire_impl.decode_frames(memoryview(data)) == expected
    assert wire_impl.decode_frames(array("B", data)) == expected
    decoder = wire_impl.FrameDecoder()
    assert decoder.feed(memoryview(data)) == expected


def test_int_like_arguments(wire_impl: ModuleType) -> None:
    expected = frame_bytes(3, 1, b"x")
    assert wire_impl.encode_frame(MessageType.SEND, True, b"x") == expected
    assert wire_impl.decode_frames(expected, max_payload=True) == [Frame(3, 1, b"x")]


@pytest.mark.parametrize("avx512", [False, True])
def test_checksum_matches_xxhash(wire_impl: ModuleType, avx512: bool) -> None:
    select = getattr(wire_impl, "_use_kernel", None)
    if select is not None:
        select(avx512)
    try:
        rng = random.Random(5)
        for size in [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1023, 1024, 1025,
                     1040, 4096, 70000]:  # fmt: skip
            data = rng.randbytes(size)
            expected = xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF
            assert wire_impl.checksum(data) == expected
            assert wire_impl.checksum(bytearray(data)) == expected
            assert wire_impl.checksum(memoryview(data)) == expected
            frame = frame_bytes(1, 2, data)
            assert wire_impl.encode_frame(1, 2, data) == frame
            assert wire_impl.decode_frames(frame) == [Frame(1, 2, data)]
    finally:
        if select is not None:
            select()


def test_checksum_rejects_non_buffers(wire_impl: ModuleType) -> None:
    for bad in ("text", 12, None, memoryview(b"abcdef")[::2]):
        assert error_kind(lambda b=bad: wire_impl.checksum(b)) == error_kind(
            lambda b=bad: reference.checksum(b)
        )


# -- decode errors ---------------------------------------------------------------


GOOD = stream_of(sample_frames(5))


def decode_error(module: ModuleType, data: bytes, **kwargs: int) -> WireError:
    return wire_error(lambda: module.decode_frames(data, **kwargs))


def stream_error(module: ModuleType, data: bytes, **kwargs: int) -> WireError:
    """The error a stream decoder reports for *data* fed whole, then closed."""
    decoder = module.FrameDecoder(**kwargs)

    def run() -> None:
        decoder.feed(data)
        decoder.close()

    return wire_error(run)


@pytest.mark.parametrize("decode", [decode_error, stream_error], ids=["buf", "stream"])
class TestDecodeErrors:
    def test_truncated(self, wire_impl: ModuleType, decode: Callable) -> None:
        frame = frame_bytes(2, 3, b"payload")
        for cut in range(1, len(frame)):  # inside the header, payload and trailer
            err = decode(wire_impl, GOOD + frame[:cut])
            assert (err.reason, err.offset) == ("truncated", len(GOOD))

    def test_oversized(self, wire_impl: ModuleType, decode: Callable) -> None:
        small = stream_of([(1, 1, bytes(99)), (2, 2, b"")])
        frame = frame_bytes(2, 3, bytes(100))
        err = decode(wire_impl, small + frame, max_payload=99)
        assert (err.reason, err.offset) == ("oversized", len(small))
        assert wire_impl.decode_frames(frame, max_payload=100)  # the limit is inclusive
        # Detected from the header alone, before the payload arrives.
        err = decode(wire_impl, small + frame[:12], max_payload=99)
        assert (err.reason, err.offset) == ("oversized", len(small))
        huge = b"PX\x01\x01\x00\x00\x00\x00\xff\xff\xff\xff"
        err = decode(wire_impl, huge)
        assert (err.reason, err.offset) == ("oversized", 0)

    def test_default_limit(self, wire_impl: ModuleType, decode: Callable) -> None:
        header = struct.pack(">2sBBII", b"PX", 1, 1, 0, MAX_PAYLOAD + 1)
        err = decode(wire_impl, GOOD + header)
        assert (err.reason, err.offset) == ("oversized", len(GOOD))

    def test_bad_checksum(self, wire_impl: ModuleType, decode: Callable) -> None:
        frame = frame_bytes(7, 0x01020304, b"some payload")
        for index in [4, 7, 12, 20, len(frame) - 4, len(frame) - 1]:
            bad = bytearray(frame)
            bad[index] ^= 0x40  # request id, payload or trailer
            err = decode(wire_impl, GOOD + bytes(bad) + GOOD)
            assert (err.reason, err.offset) == ("bad-checksum", len(GOOD))

    def test_bad_length_is_caught(
        self, wire_impl: ModuleType, decode: Callable
    ) -> None:
        frame = bytearray(frame_bytes(7, 1, bytes(40)))
        frame[11] -= 4  # claims 36 bytes: the checksum lands inside the payload
        err = decode(wire_impl, bytes(frame))
        assert (err.reason, err.offset) == ("bad-checksum", 0)

    @pytest.mark.parametrize(
        ("index", "value", "reason"),
        [
            (0, ord("Q"), "bad-magic"),
            (1, 0, "bad-magic"),
            (2, 0, "bad-version"),
            (2, 2, "bad-version"),
            (3, 0, "unknown-type"),
            (3, 19, "unknown-type"),
            (3, 255, "unknown-type"),
        ],
    )
    def test_bad_header(
        self,
        wire_impl: ModuleType,
        decode: Callable,
        index: int,
        value: int,
        reason: str,
    ) -> None:
        frame = bytearray(frame_bytes(1, 1, b"abc"))
        frame[index] = value
        err = decode(wire_impl, GOOD + bytes(frame))
        assert (err.reason, err.offset) == (reason, len(GOOD))
        # Detected from the twelve header bytes alone.
        err = decode(wire_impl, GOOD + bytes(frame[:12]))
        assert (err.reason, err.offset) == (reason, len(GOOD))

    def test_header_errors_take_precedence(
        self, wire_impl: ModuleType, decode: Callable
    ) -> None:
        header = b"ZZ\x09\x00" + b"\xff" * 8  # every field wrong: magic first
        assert decode(wire_impl, header).reason == "bad-magic"
        header = b"PX\x09\x00" + b"\xff" * 8
        assert decode(wire_impl, header).reason == "bad-version"
        header = b"PX\x01\x00" + b"\xff" * 8
        assert decode(wire_impl, header).reason == "unknown-type"

    def test_trailing_garbage(self, wire_impl: ModuleType, decode: Callable) -> None:
        err = decode(wire_impl, GOOD + b"xyz")  # shorter than a header
        assert (err.reason, err.offset) == ("truncated", len(GOOD))
        err = decode(wire_impl, GOOD + b"trailing garbage bytes")
        assert (err.reason, err.offset) == ("bad-magic", len(GOOD))


def test_error_details_match_reference(wire_impl: ModuleType) -> None:
    frame = frame_bytes(7, 1, b"abc")
    cases = [GOOD + b"xyz", GOOD + frame[:-1], b"PX\x01\x01" + b"\xff" * 8]
    for index, value in [(0, 0), (2, 5), (3, 77), (13, 1)]:
        bad = bytearray(frame)
        bad[index] ^= value or 0xFF
        cases.append(GOOD + bytes(bad))
    for data in cases:
        assert str(decode_error(wire_impl, data)) == str(decode_error(reference, data))
        assert str(stream_error(wire_impl, data)) == str(stream_error(reference, data))


def test_empty_input(wire_impl: ModuleType) -> None:
    assert wire_impl.decode_frames(b"") == []
    decoder = wire_impl.FrameDecoder()
    assert decoder.feed(b"") == []
    decoder.close()
    assert (decoder.pending, decoder.consumed) == (0, 0)


# -- limits and argument validation ---------------------------------------------


@pytest.mark.parametrize("limit", [-1, HARD_MAX_PAYLOAD + 1, 2**80, 1.5, "10", None])
def test_bad_max_payload(wire_impl: ModuleType, limit: object) -> None:
    expected = outcome(lambda: reference.decode_frames(b"", max_payload=limit))  # type: ignore[arg-type]
    assert expected[0] == "error"
    assert outcome(lambda: wire_impl.decode_frames(b"", max_payload=limit)) == expected
    assert outcome(lambda: wire_impl.FrameDecoder(limit)) == outcome(
        lambda: reference.FrameDecoder(limit)  # type: ignore[arg-type]
    )


def test_max_payload_bounds(wire_impl: ModuleType) -> None:
    frame = frame_bytes(1, 1, b"")
    assert wire_impl.decode_frames(frame, max_payload=0) == [Frame(1, 1, b"")]
    assert wire_impl.FrameDecoder(HARD_MAX_PAYLOAD).max_payload == HARD_MAX_PAYLOAD
    assert wire_impl.FrameDecoder().max_payload == MAX_PAYLOAD


BAD_ARGUMENTS = [
    (0, 1, b""),
    (19, 1, b""),
    (-1, 1, b""),
    (2**64, 1, b""),
    (1, -1, b""),
    (1, 2**32, b""),
    (1, 2**100, b""),
    (1.0, 1, b""),
    (1, 1.0, b""),
    ("1", 1, b""),
    (1, 1, "text"),
    (1, 1, None),
    (1, 1, 12),
    (0, -1, "text"),  # payload errors are reported first, then type, then id
    (0, -1, b""),
    (1, 1, memoryview(bytearray(HARD_MAX_PAYLOAD + 1))),
]


@pytest.mark.parametrize("args", BAD_ARGUMENTS)
def test_encode_argument_errors(wire_impl: ModuleType, args: tuple) -> None:
    expected = outcome(lambda: reference.encode_frame(*args))
    assert expected[0] == "error"
    assert outcome(lambda: wire_impl.encode_frame(*args)) == expected
    assert outcome(lambda: wire_impl.encode_frames([args], bytearray())) == expected


def test_encode_frames_bad_frame_midway(wire_impl: ModuleType) -> None:
    good = sample_frames(4)
    for bad in [(0, 1, b"x"), (1, 1, "text"), (1, 2), 7]:
        batch = [*good[:3], bad, good[3]]
        out, expected_out = bytearray(b"keep"), bytearray(b"keep")
        result = error_kind(lambda b=batch, o=out: wire_impl.encode_frames(b, o))
        expected = error_kind(
            lambda b=batch, o=expected_out: reference.encode_frames(b, o)
        )
        assert result == expected
        assert result[0] == "error"
        assert out == expected_out == b"keep" + stream_of(good[:3])


def test_encode_frames_iterator_failure(wire_impl: ModuleType) -> None:
    def frames() -> object:
        yield (1, 1, b"first")
        raise KeyError("boom")

    out = bytearray()
    with pytest.raises(KeyError):
        wire_impl.encode_frames(frames(), out)
    assert bytes(out) == frame_bytes(1, 1, b"first")


@pytest.mark.parametrize("out", [b"", [], memoryview(bytearray(4)), None])
def test_encode_frames_needs_bytearray(wire_impl: ModuleType, out: object) -> None:
    expected = outcome(lambda: reference.encode_frames([(1, 1, b"")], out))  # type: ignore[arg-type]
    assert expected[0] == "error"
    assert outcome(lambda: wire_impl.encode_frames([(1, 1, b"")], out)) == expected


def test_no_buffer_left_exported(wire_impl: ModuleType) -> None:
    """Payload and input buffers are released, on success and on errors."""
    payload = bytearray(b"abc")
    wire_impl.encode_frame(1, 1, payload)
    wire_impl.encode_frames([(1, 1, payload)] * 3, bytearray())
    with pytest.raises(ValueError, match="frame type"):
        wire_impl.encode_frame(0, 1, payload)
    with pytest.raises(ValueError, match="request id"):
        wire_impl.encode_frames([(1, 1, payload), (1, -1, payload)], bytearray())
    data = bytearray(frame_bytes(1, 1, b"x") + b"junk")
    with pytest.raises(WireError):
        wire_impl.decode_frames(data)
    decoder = wire_impl.FrameDecoder()
    decoder.feed(data[:-4])
    with pytest.raises(WireError):
        decoder.feed(data[-4:] + bytes(8))
    payload += b"resizable"  # BufferError if an export were still held
    data += b"resizable"


def test_encode_frames_out_exported(wire_impl: ModuleType) -> None:
    out = bytearray(b"abc")
    with memoryview(out), pytest.raises(BufferError):
        wire_impl.encode_frames([(1, 1, b"x")], out)
    assert out == b"abc"


def test_decode_rejects_non_buffers(wire_impl: ModuleType) -> None:
    for bad in ("text", 12, None, memoryview(b"abcdef")[::2]):
        assert error_kind(lambda b=bad: wire_impl.decode_frames(b)) == error_kind(
            lambda b=bad: reference.decode_frames(b)
        )
        mine, theirs = wire_impl.FrameDecoder(), reference.FrameDecoder()
        assert error_kind(lambda b=bad, d=mine: d.feed(b)) == error_kind(
            lambda b=bad, d=theirs: d.feed(b)
        )
        assert mine.feed(GOOD) == theirs.feed(GOOD)  # not poisoned by a type error


# -- stream reassembly -----------------------------------------------------------


def test_stream_random_splits(wire_impl: ModuleType) -> None:
    frames = sample_frames(30, seed=3)
    data = stream_of(frames)
    rng = random.Random(11)
    for _ in range(25):
        decoder = wire_impl.FrameDecoder()
        cuts = [rng.randrange(len(data)) for _ in range(rng.randrange(1, 40))]
        got = []
        for piece in split(data, cuts):
            got += decoder.feed(piece)
            assert decoder.pending + decoder.consumed <= len(data)
        assert got == [Frame(*f) for f in frames]
        assert (decoder.pending, decoder.consumed) == (0, len(data))
        decoder.close()


def test_stream_byte_at_a_time(wire_impl: ModuleType) -> None:
    frames = sample_frames(6, seed=4)
    data = stream_of(frames)
    decoder = wire_impl.FrameDecoder()
    got = []
    ends = []
    for index in range(len(data)):
        new = decoder.feed(data[index : index + 1])
        got += new
        if new:
            ends.append(index + 1)
        assert decoder.pending + decoder.consumed == index + 1
    assert got == [Frame(*f) for f in frames]
    sizes = [16 + len(f[2]) for f in frames]
    assert ends == [sum(sizes[: i + 1]) for i in range(len(sizes))]


def test_stream_partial_then_close(wire_impl: ModuleType) -> None:
    frame = frame_bytes(1, 5, b"hello")
    decoder = wire_impl.FrameDecoder()
    assert decoder.feed(GOOD + frame[:9]) == wire_impl.decode_frames(GOOD)
    assert (decoder.pending, decoder.consumed) == (9, len(GOOD))
    err = wire_error(decoder.close)
    assert (err.reason, err.offset) == ("truncated", len(GOOD))
    again = wire_error(lambda: decoder.feed(frame[9:]))  # poisoned
    assert (again.reason, again.offset) == ("truncated", len(GOOD))


def test_stream_large_frame_small_chunks(wire_impl: ModuleType) -> None:
    payload = bytes(range(256)) * 600
    data = frame_bytes(6, 77, payload) + frame_bytes(6, 78, b"tail")
    decoder = wire_impl.FrameDecoder()
    got = []
    for start in range(0, len(data), 1000):
        got += decoder.feed(data[start : start + 1000])
    assert got == [Frame(6, 77, payload), Frame(6, 78, b"tail")]


def test_stream_poisoned_after_error(wire_impl: ModuleType) -> None:
    bad = bytearray(frame_bytes(1, 1, b"abc"))
    bad[-1] ^= 1
    decoder = wire_impl.FrameDecoder()
    assert decoder.feed(GOOD[:10]) == []  # inside the first header
    first = wire_error(lambda: decoder.feed(GOOD[10:] + bytes(bad)))
    assert (first.reason, first.offset) == ("bad-checksum", len(GOOD))
    # Nothing of the failed feed counts as consumed (same as the reference).
    assert (decoder.pending, decoder.consumed) == (len(GOOD) + len(bad), 0)
    for retry in (b"", GOOD, frame_bytes(1, 1, b"ok")):
        err = wire_error(lambda r=retry: decoder.feed(r))
        assert (err.reason, err.offset) == (first.reason, first.offset)
    err = wire_error(decoder.close)
    assert (err.reason, err.offset) == (first.reason, first.offset)


def test_stream_state_matches_reference(wire_impl: ModuleType) -> None:
    frame = frame_bytes(2, 2, b"x" * 50)
    corrupt = bytearray(frame)
    corrupt[30] ^= 1
    scenarios = [
        [GOOD[:5], GOOD[5:30], GOOD[30:], frame[:3]],
        [GOOD + frame[:40], frame[40:] + bytes(corrupt), GOOD],
        [GOOD[:-1], b"", GOOD[-1:] + b"PX\x01\x63" + bytes(20), b"more"],
        [frame[:11], frame[11:12], b"XX" + frame],
    ]
    for pieces in scenarios:
        mine = feed_all(wire_impl.FrameDecoder(), pieces)
        assert mine == feed_all(reference.FrameDecoder(), pieces)


# -- properties against the reference -------------------------------------------


frame_args = st.tuples(
    st.integers(1, 18), st.integers(0, 2**32 - 1), st.binary(max_size=600)
)


@SETTINGS
@given(frames=st.lists(frame_args, max_size=20))
def test_encode_matches_reference(wire_impl: ModuleType, frames: list) -> None:
    out, expected = bytearray(b"~"), bytearray(b"~")
    assert wire_impl.encode_frames(frames, out) == reference.encode_frames(
        frames, expected
    )
    assert out == expected
    for args in frames:
        assert wire_impl.encode_frame(*args) == reference.encode_frame(*args)
    assert wire_impl.decode_frames(out[1:]) == reference.decode_frames(expected[1:])


@SETTINGS
@given(
    type=st.one_of(st.integers(-(2**70), 2**70), st.integers(-2, 20)),
    request_id=st.one_of(st.integers(-(2**70), 2**70), st.integers(-2, 2**32 + 2)),
    payload=st.binary(max_size=40),
)
def test_encode_arguments_match_reference(
    wire_impl: ModuleType, type: int, request_id: int, payload: bytes
) -> None:
    args = (type, request_id, payload)
    assert outcome(lambda: wire_impl.encode_frame(*args)) == outcome(
        lambda: reference.encode_frame(*args)
    )


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    """A valid stream with a few bytes flipped, inserted, deleted or cut off."""
    frames = draw(st.lists(frame_args, max_size=6))
    data = bytearray(stream_of(frames))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut"]))
        index = draw(st.integers(0, len(data)))
        if kind == "insert":
            data[index:index] = draw(st.binary(min_size=1, max_size=20))
        elif index == len(data):
            continue
        elif kind == "flip":
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[index] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[index : index + draw(st.integers(1, 20))]
        else:
            del data[index:]
    return bytes(data)


inputs = st.one_of(st.binary(max_size=300), mutated_streams())


@SETTINGS
@given(data=inputs, limit=st.sampled_from([MAX_PAYLOAD, 0, 5, 64, 600]))
def test_decode_matches_reference(
    wire_impl: ModuleType, data: bytes, limit: int
) -> None:
    assert outcome(lambda: wire_impl.decode_frames(data, limit)) == outcome(
        lambda: reference.decode_frames(data, limit)
    )


@SETTINGS
@given(
    data=inputs,
    cuts=st.lists(st.integers(0, 4000), max_size=8),
    limit=st.sampled_from([MAX_PAYLOAD, 64]),
)
def test_stream_matches_reference(
    wire_impl: ModuleType, data: bytes, cuts: list[int], limit: int
) -> None:
    pieces = split(data, cuts)
    assert feed_all(wire_impl.FrameDecoder(limit), pieces) == feed_all(
        reference.FrameDecoder(limit), pieces
    )
