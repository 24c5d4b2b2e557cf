"""Which (channel, message id) pairs a node may hold: a Bloom filter.

An owner must never number a message id twice in a channel, so before it
numbers a SEND it asks its store whether the id is there (a retry).  That
round trip to the store's thread sits on every write's path; this filter
answers "certainly not stored" for almost every new id without it.  It
holds every id this node stored since it started plus, once
:attr:`IdFilter.ready`, every id stored before (loaded in the background).
A "maybe" still goes to the store, so a false positive costs one lookup and
a false negative cannot happen.  It lives in memory only (``hash`` is per
process).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

DEFAULT_BITS_LOG2: Final = 26  # 8 MiB: about 0.35% false positives at 2M ids
DEFAULT_HASHES: Final = 2


class IdFilter:
    """A Bloom filter of ``(channel, msg_id)``; "maybe" until :attr:`ready`."""

    __slots__ = ("_bits", "_hashes", "_mask", "added", "ready")

    def __init__(
        self, bits_log2: int = DEFAULT_BITS_LOG2, hashes: int = DEFAULT_HASHES
    ) -> None:
        if not 3 <= bits_log2 <= 34 or hashes < 1:
            raise ValueError("bits_log2 must be 3..34 and hashes >= 1")
        self._mask = (1 << bits_log2) - 1
        self._bits = bytearray(1 << (bits_log2 - 3))
        self._hashes = hashes
        self.added = 0
        self.ready = False  # every id stored before start-up is in

    def _positions(self, channel: int, msg_id: bytes) -> list[int]:
        h = hash((channel, msg_id))
        h1, h2 = h & 0xFFFF_FFFF, ((h >> 32) & 0xFFFF_FFFF) | 1
        mask = self._mask
        return [(h1 + i * h2) & mask for i in range(self._hashes)]

    def add(self, channel: int, msg_id: bytes) -> None:
        h = hash((channel, msg_id))  # _positions, inlined: the hot path
        h1, h2 = h & 0xFFFF_FFFF, ((h >> 32) & 0xFFFF_FFFF) | 1
        bits, mask = self._bits, self._mask
        for i in range(self._hashes):
            pos = (h1 + i * h2) & mask
            bits[pos >> 3] |= 1 << (pos & 7)
        self.added += 1

    def add_many(self, pairs: Iterable[tuple[int, bytes]]) -> None:
        for channel, msg_id in pairs:
            self.add(channel, msg_id)

    def may_hold(self, channel: int, msg_id: bytes) -> bool:
        """False only if this node certainly never stored the pair."""
        if not self.ready:
            return True
        bits = self._bits
        return all(
            bits[pos >> 3] & (1 << (pos & 7))
            for pos in self._positions(channel, msg_id)
        )
