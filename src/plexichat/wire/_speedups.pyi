"""Type stub of the Cython wire codec (same API as ``plexichat.wire._reference``)."""

from collections.abc import Iterable

from plexichat.wire._types import MAX_PAYLOAD, Frame

Buffer = bytes | bytearray | memoryview

def checksum(data: Buffer) -> int:
    """Low 32 bits of XXH3-64 (seed 0) of *data*."""

def encode_frame(type: int, request_id: int, payload: Buffer) -> bytes:
    """Encode one frame."""

def encode_frames(frames: Iterable[tuple[int, int, Buffer]], out: bytearray) -> int:
    """Append the encoding of every ``(type, request_id, payload)`` to *out*."""

def decode_frames(data: Buffer, max_payload: int = MAX_PAYLOAD) -> list[Frame]:
    """Decode a buffer that holds whole frames only."""

class FrameDecoder:
    """Stream reassembly: feed bytes as they arrive, get whole frames back."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None: ...
    @property
    def max_payload(self) -> int: ...
    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""

    @property
    def consumed(self) -> int:
        """Bytes of the stream decoded into frames so far."""

    def feed(self, data: Buffer) -> list[Frame]:
        """Add *data*; return every frame it completes (possibly none)."""

    def close(self) -> None:
        """End of stream: raise ``truncated`` if a partial frame is pending."""

def _use_kernel(avx512: bool = True) -> str:
    """Pick the XXH3 long-input kernel (best the CPU has); return its name."""
