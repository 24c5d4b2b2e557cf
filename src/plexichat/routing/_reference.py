"""Pure-Python reference of weighted rendezvous routing: the specification.

Shard routing uses weighted rendezvous (highest-random-weight) hashing.  A
channel key (u64) is owned by the node with the highest score and replicated
on the next ``replicas - 1`` nodes.  Every backend must return exactly what
this module returns, bit for bit.

Algorithm
---------
* ``key_of(name)`` / ``node_seed(node_id)``: ``xxh3_64`` (seed 0) of the
  UTF-8 bytes, as an unsigned 64-bit integer.
* ``mix64(x)``: the splitmix64 finalizer, all arithmetic modulo 2**64::

      x ^= x >> 30; x *= 0xbf58476d1ce4e5b9
      x ^= x >> 27; x *= 0x94d049bb133111eb
      x ^= x >> 31

* ``unit(h) = ((h >> 11) + 0.5) * 2**-53`` in IEEE-754 binary64: the top 53
  bits of ``h`` as a double (exact), plus 0.5 (rounded to nearest even), times
  2**-53 (exact).  The rounding makes ``h >> 11 == 2**53 - 1`` give exactly
  1.0; that single value is clamped to ``1 - 2**-53``, the largest double
  below 1, so ``u`` is always in (0, 1).
* ``score(key, seed, weight) = weight / -log(unit(mix64(key ^ seed)))`` with
  the C library's scalar ``log`` (``math.log``; never a vectorised log, which
  may differ by an ulp).  ``weight`` must be positive and finite.
* ``owners``: node indices sorted by score descending, ties by lower index,
  truncated to the first ``replicas`` (``1 <= replicas <= len(nodes)``).
* ``move_plan``: keys whose *set* of owner seeds differs between the old and
  the new node list (a rank change among the same nodes is not a move).

Because a node's score depends only on the key and that node, adding a node
moves only keys that the new node now owns, and removing one moves only keys
it owned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash
from numpy.typing import NDArray

from plexichat.routing._common import (
    as_u64,
    check_key,
    check_nodes,
    check_replicas,
    node_arrays,
)
from plexichat.routing._types import MASK64, MIX_C1, MIX_C2, U_MAX, U_SCALE, MovePlan

__all__ = [
    "MovePlan",
    "key_of",
    "mix64",
    "move_plan",
    "node_seed",
    "owners",
    "owners_batch",
    "score",
    "unit",
]

_xxh3 = xxhash.xxh3_64_intdigest
_log = math.log


def key_of(name: str) -> int:
    """Routing key of a channel name: XXH3-64 of its UTF-8 bytes."""
    return _xxh3(name.encode("utf-8"))


def node_seed(node_id: str) -> int:
    """Seed of a node id: XXH3-64 of its UTF-8 bytes."""
    return _xxh3(node_id.encode("utf-8"))


def mix64(x: int) -> int:
    """splitmix64 finalizer of a u64."""
    x &= MASK64
    x ^= x >> 30
    x = (x * MIX_C1) & MASK64
    x ^= x >> 27
    x = (x * MIX_C2) & MASK64
    x ^= x >> 31
    return x


def unit(h: int) -> float:
    """Map a u64 hash to a double in (0, 1)."""
    u = ((h >> 11) + 0.5) * U_SCALE
    return U_MAX if u >= 1.0 else u


def score(key: int, seed: int, weight: float) -> float:
    """Weighted rendezvous score of one node for one key."""
    key = check_key(key)
    (seed,), (weight,) = check_nodes((seed,), (weight,))
    return _score(key, seed, weight)


def _score(key: int, seed: int, weight: float) -> float:
    return weight / -_log(unit(mix64(key ^ seed)))


def _owners(
    key: int, seeds: list[int], weights: list[float], replicas: int
) -> list[int]:
    scores = [_score(key, s, w) for s, w in zip(seeds, weights, strict=True)]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:replicas]


def owners(
    key: int, seeds: Sequence[int], weights: Sequence[float], replicas: int
) -> list[int]:
    """Indices of the ``replicas`` nodes owning *key*, owner first."""
    k = check_key(key)
    s, w = check_nodes(seeds, weights)
    r = check_replicas(replicas, len(s))
    return _owners(k, s, w, r)


def owners_batch(
    keys: Any, seeds: Any, weights: Any, replicas: int
) -> NDArray[np.int64]:
    """``owners`` of every key: ``int64[len(keys), replicas]``."""
    k = as_u64(keys, "keys")
    s_arr, w_arr = node_arrays(seeds, weights)
    r = check_replicas(replicas, s_arr.shape[0])
    s, w = s_arr.tolist(), w_arr.tolist()
    out = np.empty((k.shape[0], r), dtype=np.int64)
    for row, key in enumerate(k.tolist()):
        out[row] = _owners(key, s, w, r)
    return out


def move_plan(
    keys: Any,
    old_seeds: Any,
    old_weights: Any,
    new_seeds: Any,
    new_weights: Any,
    replicas: int,
) -> MovePlan:
    """Keys whose set of owner seeds changes from the old to the new nodes."""
    k = as_u64(keys, "keys")
    os_arr, ow_arr = node_arrays(old_seeds, old_weights)
    ns_arr, nw_arr = node_arrays(new_seeds, new_weights)
    r = check_replicas(replicas, min(os_arr.shape[0], ns_arr.shape[0]))
    os_, ow = os_arr.tolist(), ow_arr.tolist()
    ns, nw = ns_arr.tolist(), nw_arr.tolist()
    moved: list[int] = []
    old_rows: list[list[int]] = []
    new_rows: list[list[int]] = []
    for key in k.tolist():
        old = [os_[i] for i in _owners(key, os_, ow, r)]
        new = [ns[i] for i in _owners(key, ns, nw, r)]
        if set(old) != set(new):
            moved.append(key)
            old_rows.append(old)
            new_rows.append(new)
    return MovePlan(
        np.array(moved, dtype=np.uint64),
        np.array(old_rows, dtype=np.uint64).reshape(len(moved), r),
        np.array(new_rows, dtype=np.uint64).reshape(len(moved), r),
    )
