"""Ratio-check cases of the routing family (see :mod:`plexichat.accel.bench`).

Every backend gets the same workload: 16 nodes with weights 0.5 .. 2.0 and
100k random keys, R = 3 (the reference needs seconds per batch call).  The
``numpy`` peer scores the same batch with vectorised ``np.log`` and
``argsort``: a speed yardstick only, not bit-exact with the reference.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
from numpy.typing import NDArray

from plexichat.accel.bench import BenchCase, Workload
from plexichat.routing._reference import key_of, node_seed
from plexichat.routing._types import MIX_C1, MIX_C2

SEED = 20261126
N_KEYS = 100_000
N_NODES = 16
REPLICAS = 3


def nodes(n: int = N_NODES + 1) -> tuple[NDArray[np.uint64], NDArray[np.float64]]:
    """Seeds and weights of ``node-0 .. node-{n-1}`` (weights 0.5 .. 2.0)."""
    seeds = np.array([node_seed(f"node-{i}") for i in range(n)], dtype=np.uint64)
    weights = np.random.default_rng(SEED).uniform(0.5, 2.0, n)
    return seeds, weights


def keys(n: int = N_KEYS) -> NDArray[np.uint64]:
    """*n* random u64 channel keys."""
    return np.random.default_rng(SEED + 1).integers(
        0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True
    )


def numpy_owners(
    keys: NDArray[np.uint64],
    seeds: NDArray[np.uint64],
    weights: NDArray[np.float64],
    replicas: int,
) -> NDArray[np.intp]:
    """Vectorised numpy version of ``owners_batch`` (speed peer only)."""
    with np.errstate(over="ignore"):
        h = keys[:, None] ^ seeds[None, :]
        h ^= h >> np.uint64(30)
        h *= np.uint64(MIX_C1)
        h ^= h >> np.uint64(27)
        h *= np.uint64(MIX_C2)
        h ^= h >> np.uint64(31)
    u = np.minimum(
        ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53, 1 - 2**-53
    )
    score = weights / -np.log(u)
    return np.argsort(-score, axis=1, kind="stable")[:, :replicas]


def cases() -> list[BenchCase]:
    all_seeds, all_weights = nodes()
    seeds, weights = all_seeds[:N_NODES], all_weights[:N_NODES]
    batch = keys()
    one_key = key_of("general")
    seed_list, weight_list = seeds.tolist(), weights.tolist()

    def owners_single(module: ModuleType) -> Workload:
        owners = module.owners
        return lambda: owners(one_key, seed_list, weight_list, REPLICAS)

    def owners_batch_100k(module: ModuleType) -> Workload:
        return lambda: module.owners_batch(batch, seeds, weights, REPLICAS)

    def move_plan_100k(module: ModuleType) -> Workload:
        def work() -> object:
            return module.move_plan(
                batch, seeds, weights, all_seeds, all_weights, REPLICAS
            )

        return work

    def numpy_batch() -> Workload:
        return lambda: numpy_owners(batch, seeds, weights, REPLICAS)

    return [
        BenchCase("owners_single", owners_single),
        BenchCase(
            "owners_batch_100k",
            owners_batch_100k,
            peers={"numpy": numpy_batch},
            units=N_KEYS,
        ),
        BenchCase("move_plan_100k", move_plan_100k, units=N_KEYS),
    ]
