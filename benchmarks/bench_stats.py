"""asv benchmarks of the latency histogram on every backend (python/cython/numba)."""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

from plexichat import accel
from plexichat.stats import _bench

BACKENDS = ["cython", "numba", "python"]


def backend_module(backend: str) -> ModuleType:
    """The stats module of *backend*; NotImplementedError makes asv skip it."""
    result = accel.probe("stats", backend)  # type: ignore[arg-type]
    if isinstance(result, str):
        raise NotImplementedError(result)
    return result


class Record:
    """Recording: one million values in one call, and 10k single calls."""

    params: ClassVar = [BACKENDS]
    param_names: ClassVar = ["backend"]
    timeout = 120

    def setup(self, backend):
        self.module = backend_module(backend)
        self.million = _bench.latencies(1_000_000)
        self.ten_k = _bench.latencies(10_000, seed=_bench.SEED + 1).tolist()
        self.module.Histogram().record_many(self.million[:10])  # JIT warm-up

    def time_record_many_1m(self, backend):
        self.module.Histogram().record_many(self.million)

    def time_record_loop_10k(self, backend):
        record = self.module.Histogram().record
        for value in self.ten_k:
            record(value)


class Query:
    """Queries and serialisation of a histogram holding one million latencies."""

    params: ClassVar = [BACKENDS]
    param_names: ClassVar = ["backend"]
    timeout = 120

    def setup(self, backend):
        self.module = backend_module(backend)
        self.hist = _bench.filled(self.module, _bench.latencies(1_000_000))
        self.blob = self.hist.to_bytes()
        self.target = self.module.Histogram()
        # JIT warm-up of every kernel before timing
        self.hist.percentiles(_bench.QUANTILES)
        self.module.Histogram.from_bytes(self.blob)
        self.target.merge(self.hist)

    def time_percentiles(self, backend):
        self.hist.percentiles(_bench.QUANTILES)

    def time_merge(self, backend):
        self.target.merge(self.hist)

    def time_to_bytes(self, backend):
        self.hist.to_bytes()

    def time_from_bytes(self, backend):
        self.module.Histogram.from_bytes(self.blob)

    def track_bytes_per_value(self, backend):
        return len(self.blob) / self.hist.count

    track_bytes_per_value.unit = "bytes"
