"""Least-recently-used cache with hit/miss/eviction counters, one API for all backends.

``LRUCache(capacity)`` offers ``get``/``put``/``pop``/``peek``, ``in``,
``len``, ``clear``, ``keys`` (least recent first) and ``stats``.  The active
backend (compiled or reference) is chosen by :mod:`plexichat.accel`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plexichat import accel
from plexichat.cache._reference import MAX_CAPACITY

if TYPE_CHECKING:
    from plexichat.cache._reference import LRUCache
else:
    LRUCache = accel.load("cache").LRUCache

BACKEND = accel.active("cache")

__all__ = ["BACKEND", "MAX_CAPACITY", "LRUCache"]
