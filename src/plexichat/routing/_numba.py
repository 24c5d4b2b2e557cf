"""Numba backend of weighted rendezvous routing (same results as ``_reference``).

The kernels follow the Cython backend (``_speedups.pyx`` explains the bounds
that let most keys skip ``log``): ``@njit(cache=True, nogil=True)``, compiled
on first use and cached on disk, so later processes only load machine code.
Scores use scalar ``math.log`` (the C library's ``log``) and no ``fastmath``,
so the results are the reference's bit for bit.  Importing this module
raises ``ImportError`` when numba is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast

import numba
import numpy as np
from numpy.typing import NDArray

from plexichat.routing._common import (
    as_u64,
    check_key,
    check_nodes,
    check_replicas,
    node_arrays,
)
from plexichat.routing._types import MovePlan

__all__ = ["MovePlan", "move_plan", "owners", "owners_batch"]

F = TypeVar("F", bound=Callable[..., Any])
_jit = cast(Callable[[F], F], numba.njit(cache=True, nogil=True))

_U64 = np.uint64
_C1: Final = _U64(0xBF58476D1CE4E5B9)
_C2: Final = _U64(0x94D049BB133111EB)
_S11: Final = _U64(11)
_S27: Final = _U64(27)
_S30: Final = _U64(30)
_S31: Final = _U64(31)
_S63: Final = _U64(63)
_ONE: Final = _U64(1)
_ZERO: Final = _U64(0)
_ALL: Final = _U64(0xFFFFFFFFFFFFFFFF)
_NO_BOUND: Final = _U64(1 << 63)
_U_SCALE: Final = 2.0**-53
_U_MAX: Final = 1.0 - 2.0**-53
_THIRD: Final = 1.0 / 3.0
_LOW: Final = 1.0 - 2.0**-40
_HIGH: Final = 1.0 + 2.0**-40
_W_MIN: Final = 2.0**-900
_W_MAX: Final = 2.0**900


@_jit
def _mix64(x: np.uint64) -> np.uint64:
    x ^= x >> _S30
    x *= _C1
    x ^= x >> _S27
    x *= _C2
    x ^= x >> _S31
    return x


@_jit
def _unit(h: np.uint64) -> float:
    u = (float(np.int64(h >> _S11)) + 0.5) * _U_SCALE
    return _U_MAX if u >= 1.0 else u


def _prepare(weights: NDArray[np.float64], r: int) -> tuple[Any, ...]:
    """Per-node constants and flags for one node list (plain numpy)."""
    n = weights.shape[0]
    prune = r < n and bool(np.all((weights >= _W_MIN) & (weights <= _W_MAX)))
    inv = 1.0 / weights if prune else np.ones(n)  # (unused without pruning)
    mask = (1 << max(1, (n - 1).bit_length())) - 1
    return inv * _LOW, inv * _HIGH, prune, _U64(mask)


@_jit
def _route(
    keys: NDArray[np.uint64],
    seeds: NDArray[np.uint64],
    weights: NDArray[np.float64],
    ilo: NDArray[np.float64],
    ihi: NDArray[np.float64],
    prune: bool,
    mask: np.uint64,
    out: NDArray[np.int64],
) -> None:
    """out[k] = owner indices of keys[k], best first (one flat loop)."""
    n = seeds.shape[0]
    r = out.shape[1]
    u = np.empty(n, np.float64)
    a = np.empty(n, np.float64)
    s = np.empty(n, np.float64)
    hi = np.empty(n, np.float64)
    hb = hi.view(np.uint64)  # the same memory as bits
    m = np.empty(max(r, 4), np.uint64)
    cand = np.empty(n, np.int64)
    for k in range(keys.shape[0]):
        key = keys[k]
        c = n
        if prune:
            for i in range(n):
                u[i] = _unit(_mix64(key ^ seeds[i]))
            for i in range(n):
                t = 1.0 - u[i]
                t2 = t * t
                lo = t + t2 * (0.5 + t * (_THIRD + t * 0.25))
                a[i] = lo * ilo[i]
                hi[i] = (lo + t2 * t2 * 0.25) * ihi[i]
                flag = _NO_BOUND if t > 0.5 else _ZERO
                hb[i] = ((hb[i] + mask + _ONE) & ~mask) | _U64(i) | flag
            if r <= 4:  # the selection network stays in registers
                m0 = _ALL
                m1 = _ALL
                m2 = _ALL
                m3 = _ALL
                for i in range(n):
                    x = hb[i]
                    y = x if x < m0 else m0
                    x = m0 if x < m0 else x
                    m0 = y
                    y = x if x < m1 else m1
                    x = m1 if x < m1 else x
                    m1 = y
                    y = x if x < m2 else m2
                    x = m2 if x < m2 else x
                    m2 = y
                    m3 = x if x < m3 else m3
                m[0] = m0
                m[1] = m1
                m[2] = m2
                m[3] = m3
            else:
                for j in range(r):
                    m[j] = _ALL
                for i in range(n):
                    x = hb[i]
                    for j in range(r):
                        mj = m[j]
                        m[j] = x if x < mj else mj
                        x = mj if x < mj else x
            if not (m[r - 1] & _NO_BOUND):
                hb[0] = m[r - 1] | mask  # bit-cast through memory
                bound = hi[0]
                c = 0
                for i in range(n):
                    cand[c] = i
                    c += a[i] <= bound
                if c == r:
                    ok = True
                    for p in range(r - 1):
                        hb[0] = m[p] | mask
                        bound = hi[0]
                        for q in range(p + 1, r):
                            ok &= bound < a[np.int64(m[q] & mask)]
                    if ok:
                        for p in range(r):
                            out[k, p] = np.int64(m[p] & mask)
                        continue
        if c == n:
            for i in range(n):
                cand[i] = i
        # exact scores of the candidates, ranked like the reference
        for j in range(c):
            i = cand[j]
            s[j] = weights[i] / -math.log(_unit(_mix64(key ^ seeds[i])))
        for p in range(r):
            top = -1.0
            best = 0
            for j in range(c):
                if s[j] > top:
                    top = s[j]
                    best = j
            out[k, p] = cand[best]
            s[best] = -2.0


def _owner_indices(
    keys: NDArray[np.uint64],
    seeds: NDArray[np.uint64],
    weights: NDArray[np.float64],
    r: int,
) -> NDArray[np.int64]:
    out = np.empty((keys.shape[0], r), dtype=np.int64)
    ilo, ihi, prune, mask = _prepare(weights, r)
    _route(keys, seeds, weights, ilo, ihi, prune, mask, out)
    return out


def owners(
    key: int, seeds: Sequence[int], weights: Sequence[float], replicas: int
) -> list[int]:
    """Indices of the ``replicas`` nodes owning *key*, owner first."""
    k = check_key(key)
    s, w = check_nodes(seeds, weights)
    r = check_replicas(replicas, len(s))
    weights_arr = np.array(w, dtype=np.float64)
    out = np.empty((1, r), dtype=np.int64)
    # one key: score every node exactly (same kernel, no bounds set-up)
    _route(
        np.array([k], dtype=np.uint64),
        np.array(s, dtype=np.uint64),
        weights_arr,
        weights_arr,
        weights_arr,
        False,
        _ONE,
        out,
    )
    return cast(list[int], out[0].tolist())


def owners_batch(
    keys: Any, seeds: Any, weights: Any, replicas: int
) -> NDArray[np.int64]:
    """``owners`` of every key: ``int64[len(keys), replicas]``."""
    k = as_u64(keys, "keys")
    s, w = node_arrays(seeds, weights)
    r = check_replicas(replicas, s.shape[0])
    return _owner_indices(k, s, w, r)


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
    os_, ow = node_arrays(old_seeds, old_weights)
    ns, nw = node_arrays(new_seeds, new_weights)
    r = check_replicas(replicas, min(os_.shape[0], ns.shape[0]))
    old = os_[_owner_indices(k, os_, ow, r)]
    new = ns[_owner_indices(k, ns, nw, r)]
    # set equality per row: every old seed is new and every new seed is old
    old_cols, new_cols = old.T.copy(), new.T.copy()
    same = np.ones(k.shape[0], dtype=np.bool_)
    for i in range(r):
        in_new = old_cols[i] == new_cols[0]
        in_old = new_cols[i] == old_cols[0]
        for j in range(1, r):
            in_new |= old_cols[i] == new_cols[j]
            in_old |= new_cols[i] == old_cols[j]
        same &= in_new & in_old
    moved = ~same
    return MovePlan(k[moved], old[moved], new[moved])
