"""Ratio-check cases of the stats family (see :mod:`plexichat.accel.bench`).

All cases use the default layout (1 us .. 1 h, 3 significant figures) and
log-normal latencies around 2 ms, as the node records them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from plexichat.accel.bench import BenchCase, Workload

SEED = 20261126
QUANTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 99.999, 100.0)


def latencies(n: int, seed: int = SEED) -> npt.NDArray[np.int64]:
    """*n* log-normal latencies in microseconds (median 2 ms)."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=np.log(2000.0), sigma=1.0, size=n)
    values: npt.NDArray[np.int64] = np.clip(raw, 1, 3_600_000_000).astype(np.int64)
    return values


def filled(module: ModuleType, values: npt.NDArray[np.int64]) -> Any:
    hist = module.Histogram()
    hist.record_many(values)
    return hist


def cases() -> list[BenchCase]:
    million = latencies(1_000_000)
    ten_k = latencies(10_000, seed=SEED + 1).tolist()

    def record_many_1m(module: ModuleType) -> Workload:
        def work() -> None:
            module.Histogram().record_many(million)

        return work

    def record_loop_10k(module: ModuleType) -> Workload:
        def work() -> None:
            record = module.Histogram().record
            for value in ten_k:
                record(value)

        return work

    def percentiles(module: ModuleType) -> Workload:
        hist = filled(module, million)
        return lambda: hist.percentiles(QUANTILES)

    def merge(module: ModuleType) -> Workload:
        source = filled(module, million)
        target = module.Histogram()
        return lambda: target.merge(source)

    def to_bytes(module: ModuleType) -> Workload:
        hist = filled(module, million)
        return hist.to_bytes  # type: ignore[no-any-return]

    def from_bytes(module: ModuleType) -> Workload:
        blob = filled(module, million).to_bytes()
        return lambda: module.Histogram.from_bytes(blob)

    def numpy_percentiles() -> Workload:
        return lambda: np.percentile(million, QUANTILES, method="inverted_cdf")

    return [
        BenchCase("record_many_1m", record_many_1m, units=len(million)),
        BenchCase("record_loop_10k", record_loop_10k, units=len(ten_k)),
        BenchCase(
            "percentiles",
            percentiles,
            peers={"numpy.percentile": numpy_percentiles},
            units=len(QUANTILES),
        ),
        BenchCase("merge", merge),
        BenchCase("to_bytes", to_bytes),
        BenchCase("from_bytes", from_bytes),
    ]
