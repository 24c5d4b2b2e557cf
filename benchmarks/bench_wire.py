"""asv benchmarks of the wire codec on every backend (same workloads as _bench).

Each call works on 1000 frames: batch encoding into a reused ``bytearray``
(64-byte and 1 KiB payloads), ``decode_frames`` of a whole buffer and a
``FrameDecoder`` fed in 1500-byte chunks or the whole buffer at once.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

from plexichat import accel
from plexichat.wire import _bench


def backend_module(backend: str) -> ModuleType:
    """The wire module of *backend*; NotImplementedError makes asv skip it."""
    result = accel.probe("wire", backend)  # type: ignore[arg-type]
    if isinstance(result, str):
        raise NotImplementedError(result)
    return result


class Encode:
    """``encode_frames`` of 1000 frames into a reused bytearray."""

    params: ClassVar = [["python", "cython"]]
    param_names: ClassVar = ["backend"]

    def setup(self, backend):
        self.encode_frames = backend_module(backend).encode_frames
        self.frames_64 = _bench.batch(64)
        self.frames_1k = _bench.batch(1024)
        self.out = bytearray()

    def time_encode_batch_64(self, backend):
        del self.out[:]
        self.encode_frames(self.frames_64, self.out)

    def time_encode_batch_1k(self, backend):
        del self.out[:]
        self.encode_frames(self.frames_1k, self.out)


class Decode:
    """Decoding 1000 frames of 64-byte payloads, whole and as a stream."""

    params: ClassVar = [["python", "cython"]]
    param_names: ClassVar = ["backend"]

    def setup(self, backend):
        module = backend_module(backend)
        self.decode_frames = module.decode_frames
        self.decoder_class = module.FrameDecoder
        self.data = _bench.encoded(_bench.batch(64))
        self.pieces = _bench.chunks(self.data)

    def time_decode_64(self, backend):
        self.decode_frames(self.data)

    def time_stream_decode_64(self, backend):
        feed = self.decoder_class().feed
        for piece in self.pieces:
            feed(piece)

    def time_stream_feed_whole_64(self, backend):
        self.decoder_class().feed(self.data)
