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

from plexichat.node import protocol as p

DEFAULT_BITS_LOG2: Final = 26  # 8 MiB: about 0.35% false positives at 2M ids


class IdFilter:
    """A Bloom filter of ``(channel, msg_id)``; "maybe" until :attr:`ready`.

    Two probes per pair, taken from the two 32-bit halves of
    ``hash(msg_id) + channel`` (no tuple to build; the adds and lookups sit
    on every write's path, so they are inlined).  Ids chosen to collide can
    only cause false positives, that is store lookups.
    """

    __slots__ = ("_bits", "_mask", "added", "ready")

    def __init__(self, bits_log2: int = DEFAULT_BITS_LOG2) -> None:
        if not 3 <= bits_log2 <= 32:
            raise ValueError("bits_log2 must be 3..32")
        self._mask = (1 << bits_log2) - 1
        self._bits = bytearray(1 << (bits_log2 - 3))
        self.added = 0
        self.ready = False  # every id stored before start-up is in

    def add(self, channel: int, msg_id: bytes) -> None:
        h = hash(msg_id) + channel
        mask, bits = self._mask, self._bits
        a, b = h & mask, (h >> 32) & mask
        bits[a >> 3] |= 1 << (a & 7)
        bits[b >> 3] |= 1 << (b & 7)
        self.added += 1

    def add_records(self, records: Iterable[p.Record]) -> None:
        """Add the ``(channel, msg_id)`` of each record."""
        mask, bits = self._mask, self._bits
        count = 0
        for rec in records:
            h = hash(rec[2]) + rec[0]  # msg_id, channel
            a, b = h & mask, (h >> 32) & mask
            bits[a >> 3] |= 1 << (a & 7)
            bits[b >> 3] |= 1 << (b & 7)
            count += 1
        self.added += count

    def add_many(self, pairs: Iterable[tuple[int, bytes]]) -> None:
        for channel, msg_id in pairs:
            self.add(channel, msg_id)

    def may_hold(self, channel: int, msg_id: bytes) -> bool:
        """False only if this node certainly never stored the pair."""
        if not self.ready:
            return True
        h = hash(msg_id) + channel
        mask, bits = self._mask, self._bits
        a, b = h & mask, (h >> 32) & mask
        return bool(bits[a >> 3] >> (a & 7) & 1 and bits[b >> 3] >> (b & 7) & 1)
