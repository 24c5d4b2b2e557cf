"""Argument checks and array conversions shared by every routing backend.

Every backend funnels its inputs through these helpers, so invalid input
raises the same exception with the same message whichever backend runs.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from plexichat.routing._types import MASK64


def check_key(key: int) -> int:
    """Return *key* as an ``int`` in ``[0, 2**64)`` or raise ``ValueError``."""
    k = operator.index(key)
    if not 0 <= k <= MASK64:
        raise ValueError(f"key {key!r} is not an unsigned 64-bit integer")
    return k


def check_replicas(replicas: int, n_nodes: int) -> int:
    """Return *replicas* if ``1 <= replicas <= n_nodes`` else raise."""
    r = operator.index(replicas)
    if r < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if r > n_nodes:
        raise ValueError(f"replicas={replicas} exceeds the number of nodes ({n_nodes})")
    return r


def check_nodes(
    seeds: Sequence[int], weights: Sequence[float]
) -> tuple[list[int], list[float]]:
    """Validate node seeds and weights given as sequences; return lists."""
    s = [operator.index(x) for x in seeds]
    w = [float(x) for x in weights]
    if len(s) != len(w):
        raise ValueError(f"{len(s)} seeds but {len(w)} weights")
    if not s:
        raise ValueError("no nodes: seeds and weights are empty")
    for seed in s:
        if not 0 <= seed <= MASK64:
            raise ValueError(f"seed {seed!r} is not an unsigned 64-bit integer")
    for weight in w:
        if not (weight > 0.0 and math.isfinite(weight)):
            raise ValueError(f"weight {weight!r} must be positive and finite")
    return s, w


def as_u64(values: Any, what: str) -> NDArray[np.uint64]:
    """``values`` as a contiguous 1-D ``uint64`` array."""
    arr = np.ascontiguousarray(values, dtype=np.uint64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    return arr


def node_arrays(
    seeds: Any, weights: Any
) -> tuple[NDArray[np.uint64], NDArray[np.float64]]:
    """Validate node seeds and weights given as array-likes; return arrays."""
    s = as_u64(seeds, "seeds")
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"weights must be one-dimensional, got shape {w.shape}")
    if s.shape[0] != w.shape[0]:
        raise ValueError(f"{s.shape[0]} seeds but {w.shape[0]} weights")
    if s.shape[0] == 0:
        raise ValueError("no nodes: seeds and weights are empty")
    bad = ~(np.isfinite(w) & (w > 0.0))
    if bad.any():
        weight = float(w[int(np.argmax(bad))])
        raise ValueError(f"weight {weight!r} must be positive and finite")
    return s, w
