"""Wire codec of the PlexiChat protocol (docs/protocol.md), one API for all backends.

``encode_frame`` builds one frame, ``encode_frames`` appends many frames to a
reused ``bytearray``, ``decode_frames`` splits a complete buffer, and
``FrameDecoder`` reassembles frames from a byte stream (carrying partial
frames over between ``feed`` calls, as a TCP reader needs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plexichat import accel
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
    MessageType,
    WireError,
)

if TYPE_CHECKING:
    from plexichat.wire._reference import (
        FrameDecoder,
        checksum,
        decode_frames,
        encode_frame,
        encode_frames,
    )
else:
    _impl = accel.load("wire")
    FrameDecoder = _impl.FrameDecoder
    checksum = _impl.checksum
    decode_frames = _impl.decode_frames
    encode_frame = _impl.encode_frame
    encode_frames = _impl.encode_frames

BACKEND = accel.active("wire")

__all__ = [
    "BACKEND",
    "HARD_MAX_PAYLOAD",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_PAYLOAD",
    "MAX_TYPE",
    "MIN_TYPE",
    "OVERHEAD",
    "TRAILER_SIZE",
    "VERSION",
    "Frame",
    "FrameDecoder",
    "MessageType",
    "WireError",
    "checksum",
    "decode_frames",
    "encode_frame",
    "encode_frames",
]
