"""Ratio-check cases of the cache family (see :mod:`plexichat.accel.bench`).

``zipf_mixed``: 200k lookups over 100k distinct keys drawn from a Zipf law
(s = 1.1) against a cache of 10k entries; every miss is followed by a
``put`` (the read-through pattern of the node's message cache).  Peers: a
minimal ``OrderedDict`` LRU and ``lru-dict``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import Any

import numpy as np

from plexichat.accel.bench import BenchCase, Workload

OPS = 200_000
DISTINCT = 100_000
ZIPF_S = 1.1
CAPACITY = 10_000
SEED = 20261126


def zipf_keys(
    ops: int = OPS, distinct: int = DISTINCT, s: float = ZIPF_S, seed: int = SEED
) -> list[int]:
    """*ops* keys from a Zipf law truncated to *distinct* keys (hot keys shuffled)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, distinct + 1, dtype=np.float64) ** s
    ranks = rng.choice(distinct, size=ops, p=weights / weights.sum())
    names = rng.permutation(distinct) * 7919 + 1  # spread the hot keys
    keys: list[int] = names[ranks].tolist()
    return keys


class OrderedDictLRU:
    """The textbook ``OrderedDict`` LRU (the peer to beat)."""

    __slots__ = ("capacity", "data")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: OrderedDict[Hashable, object] = OrderedDict()

    def get(self, key: Hashable, default: object = None) -> object:
        data = self.data
        if key in data:
            data.move_to_end(key)
            return data[key]
        return default

    def put(self, key: Hashable, value: object) -> None:
        data = self.data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self.capacity:
            data.popitem(last=False)


def read_through(
    factory: Callable[[int], Any], keys: list[int], capacity: int = CAPACITY
) -> Workload:
    """Workload: fresh cache, then ``get`` and ``put``-on-miss for every key."""

    def work() -> int:
        cache = factory(capacity)
        get = cache.get
        put = cache.put
        misses = 0
        for key in keys:
            if get(key) is None:
                put(key, key)
                misses += 1
        return misses

    return work


def lru_dict_workload(keys: list[int]) -> Workload:
    """The same workload on ``lru-dict`` (ImportError when it is missing)."""
    from lru import LRU

    def work() -> int:
        cache: Any = LRU(CAPACITY)
        get = cache.get
        misses = 0
        for key in keys:
            if get(key) is None:
                cache[key] = key
                misses += 1
        return misses

    return work


def cases() -> list[BenchCase]:
    keys = zipf_keys()

    def make(module: ModuleType) -> Workload:
        return read_through(module.LRUCache, keys)

    return [
        BenchCase(
            "zipf_mixed",
            make,
            peers={
                "ordereddict": lambda: read_through(OrderedDictLRU, keys),
                "lru-dict": lambda: lru_dict_workload(keys),
            },
            units=OPS,
        )
    ]
