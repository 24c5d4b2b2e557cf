"""Pure-Python reference LRU cache: the specification every backend follows.

Behaviour (identical across backends, checked by property tests):

* ``capacity`` is an ``int`` in ``1..MAX_CAPACITY`` (``TypeError`` for a
  non-integer, ``ValueError`` out of range).
* ``get`` counts a hit or a miss; a hit makes the key the most recent.
* ``put`` inserts or updates and makes the key the most recent.  Inserting
  into a full cache first evicts the least recent key (counted in
  ``evictions``); updating never evicts.
* ``pop``, ``peek``, ``in``, ``len`` and ``keys`` touch no counter and never
  reorder.  ``clear`` drops every entry and keeps the counters.
* A key keeps the object it was first inserted with: after ``put(1, "a")``,
  ``put(1.0, "b")`` updates the value and ``keys()`` still returns ``[1]``
  (plain ``dict`` semantics).
* ``keys()`` lists the keys least recent first.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Hashable
from typing import Final, Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

MAX_CAPACITY: Final = 2**31 - 1
_MISSING: Final = object()


def check_capacity(capacity: int) -> int:
    """Return *capacity* as an ``int`` or raise ``TypeError``/``ValueError``."""
    capacity = operator.index(capacity)
    if not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(f"capacity must be in 1..{MAX_CAPACITY}, got {capacity}")
    return capacity


class LRUCache(Generic[K, V]):
    """Least-recently-used cache of at most ``capacity`` entries."""

    __slots__ = ("_capacity", "_data", "_evictions", "_hits", "_misses")

    def __init__(self, capacity: int) -> None:
        self._capacity = check_capacity(capacity)
        self._data: OrderedDict[K, V] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    @property
    def capacity(self) -> int:
        """Maximum number of entries."""
        return self._capacity

    @property
    def hits(self) -> int:
        """Number of ``get`` calls that found their key."""
        return self._hits

    @property
    def misses(self) -> int:
        """Number of ``get`` calls that did not find their key."""
        return self._misses

    @property
    def evictions(self) -> int:
        """Number of keys evicted to make room."""
        return self._evictions

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: T) -> V | T: ...
    def get(self, key: K, default: object = None) -> object:
        """Value of *key* (a hit, now most recent) or *default* (a miss)."""
        value = self._data.get(key, _MISSING)
        if value is _MISSING:
            self._misses += 1
            return default
        self._data.move_to_end(key)
        self._hits += 1
        return value

    def put(self, key: K, value: V) -> None:
        """Insert or update *key*; evict the least recent key when full."""
        data = self._data
        if key in data:
            data[key] = value
            data.move_to_end(key)
            return
        if len(data) >= self._capacity:
            data.popitem(last=False)
            self._evictions += 1
        data[key] = value

    @overload
    def pop(self, key: K) -> V | None: ...
    @overload
    def pop(self, key: K, default: T) -> V | T: ...
    def pop(self, key: K, default: object = None) -> object:
        """Remove *key* and return its value, or *default* when absent."""
        return self._data.pop(key, default)

    @overload
    def peek(self, key: K) -> V | None: ...
    @overload
    def peek(self, key: K, default: T) -> V | T: ...
    def peek(self, key: K, default: object = None) -> object:
        """Value of *key* or *default*, without counting or reordering."""
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        self._data.clear()

    def keys(self) -> list[K]:
        """Keys, least recent first."""
        return list(self._data)

    def stats(self) -> dict[str, int]:
        """Counters and occupancy."""
        return {
            "capacity": self._capacity,
            "size": len(self._data),
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
        }

    def __repr__(self) -> str:
        return (
            f"LRUCache(capacity={self._capacity}, size={len(self._data)}, "
            f"hits={self.hits}, misses={self.misses}, evictions={self.evictions})"
        )
