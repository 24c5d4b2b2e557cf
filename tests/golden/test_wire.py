"""Golden vectors of the wire codec (tests/vectors/wire.json) on every backend.

The vectors come from the reference codec (tests/vectors/generate_wire.py);
this file needs only pytest, so it runs inside minimal guests too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from plexichat.wire._types import Frame, WireError

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "wire.json").read_text()
)
FRAMES = [
    (item["type"], item["request_id"], bytes.fromhex(item["payload"]))
    for item in VECTORS["frames"]
]
ENCODED = [bytes.fromhex(item["encoded"]) for item in VECTORS["frames"]]
STREAM = b"".join(ENCODED)
BAD = VECTORS["bad"]


def test_vectors_cover_the_protocol() -> None:
    sizes = {len(payload) for _, _, payload in FRAMES}
    assert {0, 1024} <= sizes
    assert {t for t, _, _ in FRAMES} == set(range(1, 19))
    reasons = {case["reason"] for case in BAD}
    assert reasons == {
        "truncated",
        "oversized",
        "bad-checksum",
        "bad-magic",
        "bad-version",
        "unknown-type",
    }


@pytest.fixture(params=[True, False], ids=["auto-kernel", "no-avx512"])
def kernel(wire_impl: ModuleType, request: pytest.FixtureRequest) -> Iterator[None]:
    """Run with each XXH3 kernel a backend can pick (Cython on x86: AVX-512, AVX2)."""
    select = getattr(wire_impl, "_use_kernel", None)
    if select is None:
        yield
        return
    select(request.param)
    try:
        yield
    finally:
        select()


@pytest.mark.usefixtures("kernel")
def test_checksums(wire_impl: ModuleType) -> None:
    for case in VECTORS["checksums"]:
        assert wire_impl.checksum(bytes.fromhex(case["data"])) == case["checksum"]


@pytest.mark.usefixtures("kernel")
def test_encode(wire_impl: ModuleType) -> None:
    for args, encoded in zip(FRAMES, ENCODED, strict=True):
        assert wire_impl.encode_frame(*args) == encoded
    out = bytearray()
    assert wire_impl.encode_frames(FRAMES, out) == len(STREAM)
    assert bytes(out) == STREAM


@pytest.mark.usefixtures("kernel")
def test_decode(wire_impl: ModuleType) -> None:
    decoded = wire_impl.decode_frames(STREAM)
    assert decoded == [Frame(*args) for args in FRAMES]
    assert all(type(frame) is Frame for frame in decoded)
    for args, encoded in zip(FRAMES, ENCODED, strict=True):
        assert wire_impl.decode_frames(encoded) == [Frame(*args)]


@pytest.mark.parametrize("chunk", [1, 5, 12, 100, 1500, len(STREAM)])
def test_stream(wire_impl: ModuleType, chunk: int) -> None:
    decoder = wire_impl.FrameDecoder()
    decoded = []
    for start in range(0, len(STREAM), chunk):
        decoded += decoder.feed(STREAM[start : start + chunk])
    decoder.close()
    assert decoded == [Frame(*args) for args in FRAMES]
    assert (decoder.pending, decoder.consumed) == (0, len(STREAM))


@pytest.mark.parametrize("case", BAD, ids=[case["name"] for case in BAD])
def test_bad_input(wire_impl: ModuleType, case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["data"])
    with pytest.raises(WireError) as info:
        wire_impl.decode_frames(data, case["max_payload"])
    assert (info.value.reason, info.value.offset) == (case["reason"], case["offset"])
    assert str(info.value) == case["message"]

    decoder = wire_impl.FrameDecoder(case["max_payload"])

    def stream() -> None:
        for start in range(0, len(data), 50):
            decoder.feed(data[start : start + 50])
        decoder.close()

    with pytest.raises(WireError) as info:
        stream()
    assert (info.value.reason, info.value.offset) == (case["reason"], case["offset"])
