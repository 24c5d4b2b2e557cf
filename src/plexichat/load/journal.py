"""Journal of acknowledged messages, written by the load generator for the checker.

Binary file: the 4 bytes ``PXJ1`` then one 48-byte little-endian record per
acknowledged message: ``msg_id`` (16 bytes), ``channel`` (u64), ``sender``
(u64), ``counter`` (u64, the sender's own message counter) and ``seq`` (u64,
the sequence number in the ACK).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Final, NamedTuple

MAGIC: Final = b"PXJ1"
RECORD: Final = struct.Struct("<16sQQQQ")


class Entry(NamedTuple):
    """One acknowledged message."""

    msg_id: bytes
    channel: int
    sender: int
    counter: int
    seq: int


class JournalWriter:
    """Buffered appender (records are packed into memory, flushed in blocks)."""

    def __init__(self, path: Path, flush_bytes: int = 1 << 20) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(MAGIC)
        self._buffer = bytearray()
        self._flush_bytes = flush_bytes
        self.count = 0
        self._pack = RECORD.pack

    def add(
        self, msg_id: bytes, channel: int, sender: int, counter: int, seq: int
    ) -> None:
        self._buffer += self._pack(msg_id, channel, sender, counter, seq)
        self.count += 1
        if len(self._buffer) >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._file.write(self._buffer)
            del self._buffer[:]
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def read(path: Path) -> Iterator[Entry]:
    """Every entry of a journal file."""
    data = Path(path).read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path} is not a PlexiChat journal (bad magic)")
    body = memoryview(data)[4:]
    if len(body) % RECORD.size:
        raise ValueError(f"{path}: truncated record at the end")
    for msg_id, channel, sender, counter, seq in RECORD.iter_unpack(body):
        yield Entry(msg_id, channel, sender, counter, seq)


def write(path: Path, entries: list[Entry]) -> None:
    """Write *entries* as a journal (for tests and tools)."""
    writer = JournalWriter(path)
    for e in entries:
        writer.add(*e)
    writer.close()
