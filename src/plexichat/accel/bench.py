"""Quick ratio check: time each kernel operation on every available backend.

Each family contributes ``plexichat.<family>._bench.cases()``: a list of
:class:`BenchCase`.  Every case is timed on every backend the family can load
in this process, plus any named peers (msgpack, a memory copy, lru-dict, ...),
and the speedup over the reference backend is reported.  Ratios measured in
one run are what matters on a noisy machine; absolute seconds are context.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from plexichat import accel

Workload = Callable[[], object]


@dataclass(frozen=True)
class BenchCase:
    """One operation: builds a zero-argument workload per backend module."""

    name: str
    make: Callable[[ModuleType], Workload]
    peers: dict[str, Callable[[], Workload]] = field(default_factory=dict)
    units: int = 1  # items processed by one call (for per-item figures)
    nbytes: int = 0  # bytes processed by one call (for throughput figures)


def best_seconds(work: Workload, *, repeat: int = 5, min_time: float = 0.05) -> float:
    """Best per-call time over *repeat* rounds of at least *min_time* each."""
    work()  # warm-up (and JIT compilation for Numba)
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            work()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            break
        calls *= 2
    best = elapsed / calls
    for _ in range(repeat - 1):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def family_cases(family_name: str) -> list[BenchCase]:
    module = importlib.import_module(f"plexichat.{family_name}._bench")
    cases: list[BenchCase] = module.cases()
    return cases


def run(
    families: list[str] | None = None, *, repeat: int = 5, min_time: float = 0.05
) -> dict[str, Any]:
    """Time every case of *families*; return the JSON-ready result."""
    results: dict[str, Any] = {}
    for family_name in families or list(accel.FAMILIES):
        backends = accel.available(family_name)
        for case in family_cases(family_name):
            timings: dict[str, float] = {}
            for backend in backends:
                module = accel.load_backend(family_name, backend)
                timings[backend] = best_seconds(
                    case.make(module), repeat=repeat, min_time=min_time
                )
            for peer, make_peer in case.peers.items():
                try:
                    timings[peer] = best_seconds(
                        make_peer(), repeat=repeat, min_time=min_time
                    )
                except ImportError:
                    continue
            reference = timings.get("python")
            results[f"{family_name}.{case.name}"] = {
                "units": case.units,
                "bytes": case.nbytes,
                "seconds": timings,
                "speedup_vs_python": {
                    name: reference / seconds
                    for name, seconds in timings.items()
                    if reference and seconds > 0
                },
            }
    return results
