"""asv benchmarks of the LRU cache: every backend plus OrderedDict and lru-dict."""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

from plexichat import accel
from plexichat.cache import _bench


def backend_module(backend: str) -> ModuleType:
    """The cache module of *backend*; NotImplementedError makes asv skip it."""
    result = accel.probe("cache", backend)  # type: ignore[arg-type]
    if isinstance(result, str):
        raise NotImplementedError(result)
    return result


class ZipfMixed:
    """200k read-through lookups, Zipf s=1.1 over 100k keys, capacity 10k."""

    params: ClassVar = [["cython", "python", "ordereddict", "lru-dict"]]
    param_names: ClassVar = ["backend"]
    timeout = 120

    def setup(self, backend):
        keys = _bench.zipf_keys()
        if backend == "ordereddict":
            self.work = _bench.read_through(_bench.OrderedDictLRU, keys)
        elif backend == "lru-dict":
            try:
                self.work = _bench.lru_dict_workload(keys)
            except ImportError as exc:
                raise NotImplementedError(str(exc)) from exc
        else:
            self.work = _bench.read_through(backend_module(backend).LRUCache, keys)

    def time_zipf_mixed(self, backend):
        self.work()


class HitPath:
    """100k ``get`` hits on a warm cache (the node's hot path)."""

    params: ClassVar = [["cython", "python"]]
    param_names: ClassVar = ["backend"]

    def setup(self, backend):
        cache = backend_module(backend).LRUCache(1000)
        for key in range(1000):
            cache.put(key, key)
        self.get = cache.get
        self.keys = list(range(1000)) * 100

    def time_get_hits(self, backend):
        get = self.get
        for key in self.keys:
            get(key)
