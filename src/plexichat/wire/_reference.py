"""Pure-Python reference wire codec: the executable form of docs/protocol.md."""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterable

import xxhash

from plexichat.wire._types import (
    HARD_MAX_PAYLOAD,
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    MAX_TYPE,
    MIN_TYPE,
    OVERHEAD,
    TRAILER_SIZE,
    VERSION,
    Frame,
    WireError,
)

_HEADER = struct.Struct(">2sBBII")
_TRAILER = struct.Struct(">I")
_MASK32 = 0xFFFFFFFF
_xxh3 = xxhash.xxh3_64_intdigest

Buffer = bytes | bytearray | memoryview


def checksum(data: Buffer) -> int:
    """Low 32 bits of XXH3-64 (seed 0) of *data*."""
    return _xxh3(data) & _MASK32


def _flat(payload: Buffer) -> bytes | bytearray | memoryview:
    """*payload* as flat bytes: ``len()`` is its size in bytes, whatever its format."""
    if isinstance(payload, bytes | bytearray):
        return payload
    view = memoryview(payload)
    return view.cast("B") if view.c_contiguous else view.tobytes()


def _check_encode(type: int, request_id: int, size: int) -> tuple[int, int]:
    """Validate the arguments of one frame; return ``(type, request_id)`` as ints."""
    type = operator.index(type)
    request_id = operator.index(request_id)
    if not MIN_TYPE <= type <= MAX_TYPE:
        raise ValueError(f"frame type {type} outside {MIN_TYPE}..{MAX_TYPE}")
    if not 0 <= request_id <= _MASK32:
        raise ValueError(f"request id {request_id} does not fit in 32 bits")
    if size > HARD_MAX_PAYLOAD:
        raise ValueError(f"payload of {size} bytes exceeds {HARD_MAX_PAYLOAD}")
    return type, request_id


def encode_frame(type: int, request_id: int, payload: Buffer) -> bytes:
    """Encode one frame."""
    payload = _flat(payload)
    size = len(payload)
    type, request_id = _check_encode(type, request_id, size)
    body = _HEADER.pack(MAGIC, VERSION, type, request_id, size) + bytes(payload)
    return body + _TRAILER.pack(checksum(body))


def encode_frames(frames: Iterable[tuple[int, int, Buffer]], out: bytearray) -> int:
    """Append the encoding of every ``(type, request_id, payload)`` to *out*.

    Returns the number of bytes appended.  *out* is meant to be reused: the
    caller clears it (``del out[:]``) between batches.
    """
    if not isinstance(out, bytearray):
        raise TypeError(f"out must be a bytearray, not {out.__class__.__name__}")
    start = len(out)
    for type, request_id, payload in frames:
        payload = _flat(payload)
        size = len(payload)
        type, request_id = _check_encode(type, request_id, size)
        frame_start = len(out)
        out += _HEADER.pack(MAGIC, VERSION, type, request_id, size)
        out += payload
        out += _TRAILER.pack(checksum(memoryview(out)[frame_start:]))
    return len(out) - start


def _parse_header(
    view: memoryview, pos: int, max_payload: int, base: int
) -> tuple[int, int, int]:
    """Validate the header at *pos*; return ``(type, request_id, length)``."""
    magic, version, type, request_id, length = _HEADER.unpack_from(view, pos)
    offset = base + pos
    if magic != MAGIC:
        raise WireError("bad-magic", offset, f"expected {MAGIC!r}, got {magic!r}")
    if version != VERSION:
        raise WireError("bad-version", offset, f"version {version}")
    if not MIN_TYPE <= type <= MAX_TYPE:
        raise WireError("unknown-type", offset, f"type {type}")
    if length > max_payload:
        raise WireError("oversized", offset, f"{length} > {max_payload} bytes")
    return type, request_id, length


def _check_limit(max_payload: int) -> int:
    max_payload = operator.index(max_payload)
    if not 0 <= max_payload <= HARD_MAX_PAYLOAD:
        raise ValueError(f"max_payload must be within 0..{HARD_MAX_PAYLOAD}")
    return max_payload


def _split(view: memoryview, max_payload: int, base: int, frames: list[Frame]) -> int:
    """Decode whole frames from *view* into *frames*; return bytes consumed."""
    pos = 0
    end = len(view)
    while end - pos >= HEADER_SIZE:
        type, request_id, length = _parse_header(view, pos, max_payload, base)
        stop = pos + HEADER_SIZE + length
        if end - stop < TRAILER_SIZE:
            break
        (expected,) = _TRAILER.unpack_from(view, stop)
        if checksum(view[pos:stop]) != expected:
            raise WireError("bad-checksum", base + pos, f"expected {expected:#010x}")
        frames.append(Frame(type, request_id, bytes(view[pos + HEADER_SIZE : stop])))
        pos = stop + TRAILER_SIZE
    return pos


def decode_frames(data: Buffer, max_payload: int = MAX_PAYLOAD) -> list[Frame]:
    """Decode a buffer that holds whole frames only."""
    _check_limit(max_payload)
    view = memoryview(data).cast("B")
    frames: list[Frame] = []
    consumed = _split(view, max_payload, 0, frames)
    if consumed != len(view):
        raise WireError(
            "truncated", consumed, f"{len(view) - consumed} bytes after last frame"
        )
    return frames


class FrameDecoder:
    """Stream reassembly: feed bytes as they arrive, get whole frames back."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = _check_limit(max_payload)
        self._buffer = bytearray()
        self._consumed = 0
        self._error: WireError | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)

    @property
    def consumed(self) -> int:
        """Bytes of the stream decoded into frames so far."""
        return self._consumed

    def feed(self, data: Buffer) -> list[Frame]:
        """Add *data*; return every frame it completes (possibly none)."""
        if self._error is not None:
            raise self._error
        self._buffer += data
        frames: list[Frame] = []
        try:
            used = _split(
                memoryview(self._buffer), self.max_payload, self._consumed, frames
            )
        except WireError as exc:
            self._error = exc
            raise
        if used:
            del self._buffer[:used]
            self._consumed += used
        return frames

    def close(self) -> None:
        """End of stream: raise ``truncated`` if a partial frame is pending."""
        if self._error is not None:
            raise self._error
        if self._buffer:
            self._error = WireError(
                "truncated", self._consumed, f"{len(self._buffer)} bytes pending"
            )
            raise self._error


__all__ = [
    "OVERHEAD",
    "FrameDecoder",
    "checksum",
    "decode_frames",
    "encode_frame",
    "encode_frames",
]
