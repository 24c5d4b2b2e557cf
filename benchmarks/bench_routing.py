"""asv benchmarks of shard routing: every backend on the ratio-check workloads.

The workloads come from :mod:`plexichat.routing._bench` (16 weighted nodes,
100k keys, R = 3).  The pure-Python reference needs seconds per batch call,
so batch benchmarks run one call per sample and few samples.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

from plexichat import accel
from plexichat.routing import _bench
from plexichat.routing._reference import key_of

BACKENDS: list[str] = ["python", "cython", "numba"]


def backend_module(backend: str) -> ModuleType:
    """The routing module of *backend*; NotImplementedError makes asv skip it."""
    result = accel.probe("routing", backend)  # type: ignore[arg-type]
    if isinstance(result, str):
        raise NotImplementedError(result)
    return result


class Batch:
    """Shared set-up: 16 nodes (+1 for joins) and 100k keys."""

    params: ClassVar = [BACKENDS]
    param_names: ClassVar = ["backend"]
    number = 1
    repeat = (1, 5, 20.0)
    warmup_time = 0.0
    timeout = 300

    def setup(self, backend):
        self.impl = backend_module(backend)
        self.all_seeds, self.all_weights = _bench.nodes()
        self.seeds = self.all_seeds[: _bench.N_NODES]
        self.weights = self.all_weights[: _bench.N_NODES]
        self.keys = _bench.keys()
        # warm up (compiles the Numba kernels outside the timing)
        self.impl.owners_batch(self.keys[:8], self.seeds, self.weights, 3)
        self.impl.move_plan(
            self.keys[:8], self.seeds, self.weights, self.all_seeds, self.all_weights, 3
        )


class OwnersBatch(Batch):
    """``owners_batch`` of 100k keys over 16 nodes."""

    params: ClassVar = [BACKENDS, [1, 3]]
    param_names: ClassVar = ["backend", "replicas"]

    def setup(self, backend, replicas):
        super().setup(backend)

    def time_owners_batch_100k(self, backend, replicas):
        self.impl.owners_batch(self.keys, self.seeds, self.weights, replicas)


class MovePlan(Batch):
    """``move_plan`` of 100k keys when a 17th node joins (R = 3)."""

    def time_move_plan_100k(self, backend):
        self.impl.move_plan(
            self.keys, self.seeds, self.weights, self.all_seeds, self.all_weights, 3
        )


class OwnersSingle:
    """``owners`` of one channel key over 16 nodes (R = 3)."""

    params: ClassVar = [BACKENDS]
    param_names: ClassVar = ["backend"]

    def setup(self, backend):
        self.owners = backend_module(backend).owners
        seeds, weights = _bench.nodes()
        self.seeds = seeds[: _bench.N_NODES].tolist()
        self.weights = weights[: _bench.N_NODES].tolist()
        self.key = key_of("general")
        self.owners(self.key, self.seeds, self.weights, 3)

    def time_owners_single(self, backend):
        self.owners(self.key, self.seeds, self.weights, 3)
