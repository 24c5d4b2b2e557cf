# cython: language_level=3
"""Cython backend of weighted rendezvous routing (same results as ``_reference``).

Typed memoryviews only (no numpy C headers); the per-key loops run without
the GIL.  Most keys are routed without calling ``log`` at all, yet every
result is the reference's, bit for bit:

* With ``t = 1 - u``, ``-log(u) = t + t**2/2 + t**3/3 + ...``, so
  ``t + t²/2 + t³/3 + t⁴/4 <= -log(u)`` for every ``u`` and
  ``-log(u) <= t + t²/2 + t³/3 + t⁴/2`` when ``t <= 1/2``.  Times ``1/w``
  these bound ``1/score`` from below (``a``) and above (``b``); both are
  widened by a relative 2**-40, far above the few-ulp error of the bounds
  and of ``log``, so they also bound the *computed* reference score.
* ``B`` is the R-th smallest ``b``.  A node with ``a > B`` scores strictly
  below R other nodes, so it cannot be an owner.  If exactly R nodes remain
  and their intervals are disjoint, their order is known and no ``log`` is
  needed; otherwise the exact scores of the remaining nodes are computed
  and ranked (score descending, index ascending) as in the reference.
* ``b`` is handled as its IEEE bit pattern (monotonic for positive doubles)
  with the node index in the low bits, so the R smallest are kept with
  branch-free integer min/max.  Nodes with ``t > 1/2`` get the sign bit
  set (no ``b`` bound); if fewer than R nodes have a bound, all scores are
  computed exactly.

The shortcut runs only when ``replicas < len(nodes)`` and every weight lies
in [2**-900, 2**900], where no bound or score can overflow or go subnormal.
"""

import operator

import numpy as np

from libc.math cimport log
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from plexichat.routing._common import (
    as_u64,
    check_key,
    check_replicas,
    node_arrays,
)
from plexichat.routing._types import MovePlan

cdef double LOW = 1.0 - 9.094947017729282e-13  # 1 - 2**-40
cdef double HIGH = 1.0 + 9.094947017729282e-13  # 1 + 2**-40
cdef double W_MIN = 1.4708983551653345e-271  # 2**-900
cdef double W_MAX = 6.80564733841877e+270  # 2**900
cdef uint64_t NO_BOUND = (<uint64_t>1) << 63
cdef object MASK64 = (1 << 64) - 1


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    x ^= x >> 30
    x *= <uint64_t>0xBF58476D1CE4E5B9
    x ^= x >> 27
    x *= <uint64_t>0x94D049BB133111EB
    x ^= x >> 31
    return x


cdef inline double unit(uint64_t h) noexcept nogil:
    # ((h >> 11) + 0.5) * 2**-53, clamped to 1 - 2**-53 (literals: compile-time
    # constants; the top 53 bits convert exactly through int64)
    cdef double u = (<double>(<int64_t>(h >> 11)) + 0.5) * 1.1102230246251565e-16
    if u >= 1.0:
        u = 0.9999999999999999
    return u


cdef inline uint64_t bits_of(double d) noexcept nogil:
    cdef uint64_t b
    memcpy(&b, &d, 8)
    return b


cdef inline double double_of(uint64_t b) noexcept nogil:
    cdef double d
    memcpy(&d, &b, 8)
    return d


cdef struct Work:
    int n
    int r
    int kb  # bits that hold a node index
    bint prune
    const uint64_t* seeds
    const double* weights
    double* ilo  # n: (1/w) * (1 - 2**-40)
    double* ihi  # n: (1/w) * (1 + 2**-40)
    double* u  # n
    double* a  # n
    double* s  # n
    int* cand  # n
    uint64_t* b  # n: tagged bits of the upper bound of 1/score
    uint64_t* m  # r


cdef inline void rank_exact(uint64_t key, Work* w, int c, bint all_nodes,
                            int64_t* out) noexcept nogil:
    """Exact scores of the candidates (or all nodes), best r to *out*."""
    cdef int i, j, p, best
    cdef double top
    for j in range(c):
        i = j if all_nodes else w.cand[j]
        w.s[j] = w.weights[i] / -log(unit(mix64(key ^ w.seeds[i])))
    for p in range(w.r):
        top = -1.0
        best = 0
        for j in range(c):
            if w.s[j] > top:
                top = w.s[j]
                best = j
        out[p] = best if all_nodes else w.cand[best]
        w.s[best] = -2.0


cdef inline void node_bounds(uint64_t key, Work* w, uint64_t mask) noexcept nogil:
    """Store ``u``, ``a`` and the tagged ``b`` bits of every node."""
    cdef int i, n = w.n
    cdef const uint64_t* seeds = w.seeds
    cdef const double* ilo = w.ilo
    cdef const double* ihi = w.ihi
    cdef double* u = w.u
    cdef double* a = w.a
    cdef uint64_t* b = w.b
    cdef double t, t2, lo
    for i in range(n):
        u[i] = unit(mix64(key ^ seeds[i]))
    for i in range(n):
        t = 1.0 - u[i]
        t2 = t * t
        lo = t + t2 * (0.5 + t * (0.3333333333333333 + t * 0.25))
        a[i] = lo * ilo[i]
        b[i] = (
            ((bits_of((lo + t2 * t2 * 0.25) * ihi[i]) + mask + 1) & ~mask)
            | <uint64_t>i
            | ((<uint64_t>(t > 0.5)) << 63)
        )


cdef inline void smallest_bounds(uint64_t key, Work* w, uint64_t mask) noexcept nogil:
    """w.m[0:r] = the r smallest tagged bounds, ascending (branch-free)."""
    cdef int i, j, n = w.n, r = w.r
    cdef uint64_t x, lo, mj
    cdef uint64_t m0 = 0xFFFFFFFFFFFFFFFF, m1 = m0, m2 = m0, m3 = m0
    node_bounds(key, w, mask)
    if r == 1:
        for i in range(n):
            x = w.b[i]
            m0 = x if x < m0 else m0
        w.m[0] = m0
    elif r <= 4:  # keep the network in registers
        for i in range(n):
            x = w.b[i]
            lo = x if x < m0 else m0
            x = m0 if x < m0 else x
            m0 = lo
            lo = x if x < m1 else m1
            x = m1 if x < m1 else x
            m1 = lo
            lo = x if x < m2 else m2
            x = m2 if x < m2 else x
            m2 = lo
            m3 = x if x < m3 else m3
        w.m[0] = m0
        w.m[1] = m1
        if r > 2:
            w.m[2] = m2
        if r > 3:
            w.m[3] = m3
    else:
        for j in range(r):
            w.m[j] = m0
        for i in range(n):
            x = w.b[i]
            for j in range(r):
                mj = w.m[j]
                lo = x if x < mj else mj
                x = mj if x < mj else x
                w.m[j] = lo


cdef inline void top_r(uint64_t key, Work* w, int64_t* out) noexcept nogil:
    """Write the owner indices of *key* (best first) to out[0:r]."""
    cdef int i, p, q, c, n = w.n, r = w.r
    cdef uint64_t mask
    cdef double bound
    cdef bint ok
    if not w.prune:
        rank_exact(key, w, n, True, out)
        return
    mask = ((<uint64_t>1) << w.kb) - 1
    smallest_bounds(key, w, mask)
    if w.m[r - 1] & NO_BOUND:
        rank_exact(key, w, n, True, out)
        return
    bound = double_of(w.m[r - 1] | mask)
    c = 0
    for i in range(n):
        w.cand[c] = i
        c += w.a[i] <= bound
    if c == r:
        ok = True
        for p in range(r - 1):
            bound = double_of(w.m[p] | mask)
            for q in range(p + 1, r):
                ok &= bound < w.a[w.m[q] & mask]
        if ok:
            for p in range(r):
                out[p] = <int64_t>(w.m[p] & mask)
            return
    rank_exact(key, w, c, False, out)


cdef int work_init_ptr(Work* w, const uint64_t* seeds, const double* weights,
                       int n, int r) except -1:
    """Fill *w* for these nodes; the caller frees ``w.ilo`` (one block)."""
    cdef int i
    cdef char* block
    w.n = n
    w.r = r
    w.seeds = seeds
    w.weights = weights
    w.kb = 1
    while ((<int64_t>1) << w.kb) < n:
        w.kb += 1
    w.prune = r < n
    block = <char*>malloc(sizeof(double) * 5 * n + sizeof(int) * n
                          + sizeof(uint64_t) * (n + r))
    if block == NULL:
        raise MemoryError()
    w.ilo = <double*>block
    w.ihi = w.ilo + n
    w.u = w.ihi + n
    w.a = w.u + n
    w.s = w.a + n
    w.b = <uint64_t*>(w.s + n)
    w.m = w.b + n
    w.cand = <int*>(w.m + r)
    for i in range(n):
        if not (W_MIN <= weights[i] <= W_MAX):
            w.prune = False
        w.ilo[i] = (1.0 / weights[i]) * LOW
        w.ihi[i] = (1.0 / weights[i]) * HIGH
    return 0


cdef int work_init(Work* w, const uint64_t[::1] seeds, const double[::1] weights,
                   int r) except -1:
    return work_init_ptr(w, &seeds[0], &weights[0], seeds.shape[0], r)


cdef void run_batch(const uint64_t[::1] keys, Work* w,
                    int64_t[:, ::1] out) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(keys.shape[0]):
        top_r(keys[k], w, &out[k, 0])


cdef object as_seed(object value, uint64_t* out):
    """Store *value* as a u64 seed; return None, or the value if out of range."""
    if type(value) is not int:
        value = operator.index(value)
    try:
        out[0] = value
    except OverflowError:
        return value
    return None


def owners(key, seeds, weights, replicas):
    """Indices of the ``replicas`` nodes owning *key*, owner first."""
    cdef uint64_t k = check_key(key)
    cdef Py_ssize_t n = len(seeds), m = len(weights), i
    cdef object bad_seed = None, bad_weight = None, v
    cdef double x
    cdef int r
    cdef Work w
    cdef char* block = <char*>malloc(8 * (n + m + 1))
    cdef uint64_t* s = <uint64_t*>block
    cdef double* wt = <double*>(s + n)
    cdef int64_t buf[8]
    cdef int64_t* out = buf
    if block == NULL:
        raise MemoryError()
    w.ilo = NULL
    try:
        # the checks of _common.check_nodes, in the same order
        for i in range(n):
            v = as_seed(seeds[i], &s[i])
            if v is not None and bad_seed is None:
                bad_seed = v
        for i in range(m):
            v = weights[i]
            x = v if type(v) is float else float(v)
            wt[i] = x
            if bad_weight is None and not (x > 0.0 and x - x == 0.0):
                bad_weight = x
        if n != m:
            raise ValueError(f"{n} seeds but {m} weights")
        if n == 0:
            raise ValueError("no nodes: seeds and weights are empty")
        if bad_seed is not None:
            raise ValueError(f"seed {bad_seed!r} is not an unsigned 64-bit integer")
        if bad_weight is not None:
            raise ValueError(f"weight {bad_weight!r} must be positive and finite")
        r = check_replicas(replicas, n)
        if r > 8:
            out = <int64_t*>malloc(sizeof(int64_t) * r)
            if out == NULL:
                raise MemoryError()
        work_init_ptr(&w, s, wt, n, r)
        top_r(k, &w, out)
        return [out[i] for i in range(r)]
    finally:
        free(w.ilo)
        free(block)
        if out != buf:
            free(out)


def owners_batch(keys, seeds, weights, replicas):
    """``owners`` of every key: ``int64[len(keys), replicas]``."""
    k = as_u64(keys, "keys")
    s, wt = node_arrays(seeds, weights)
    cdef int r = check_replicas(replicas, s.shape[0])
    out = np.empty((k.shape[0], r), dtype=np.int64)
    cdef const uint64_t[::1] keys_v = k
    cdef int64_t[:, ::1] out_v = out
    cdef Work w
    work_init(&w, s, wt, r)
    with nogil:
        run_batch(keys_v, &w, out_v)
    free(w.ilo)
    return out


cdef inline bint same_set(const uint64_t* x, const uint64_t* y, int r) noexcept nogil:
    """Whether x[0:r] and y[0:r] hold the same set of values."""
    cdef int i, j
    cdef bint found
    for i in range(r):
        found = False
        for j in range(r):
            found |= x[i] == y[j]
        if not found:
            return False
        found = False
        for j in range(r):
            found |= y[i] == x[j]
        if not found:
            return False
    return True


cdef Py_ssize_t mark_moves(const uint64_t* old_seeds, const uint64_t* new_seeds,
                           int64_t[:, ::1] old_idx, int64_t[:, ::1] new_idx,
                           uint8_t[::1] moved) noexcept nogil:
    """Turn owner indices into seeds in place; flag and count the moved keys."""
    cdef Py_ssize_t k, count = 0
    cdef int i, r = old_idx.shape[1]
    cdef uint64_t* old_row
    cdef uint64_t* new_row
    for k in range(old_idx.shape[0]):
        old_row = <uint64_t*>&old_idx[k, 0]
        new_row = <uint64_t*>&new_idx[k, 0]
        for i in range(r):
            old_row[i] = old_seeds[old_idx[k, i]]
            new_row[i] = new_seeds[new_idx[k, i]]
        moved[k] = not same_set(old_row, new_row, r)
        count += moved[k]
    return count


cdef void gather_moves(const uint64_t[::1] keys, const uint8_t[::1] moved,
                       int64_t[:, ::1] old_all, int64_t[:, ::1] new_all,
                       uint64_t[::1] keys_out, uint64_t[:, ::1] old_out,
                       uint64_t[:, ::1] new_out) noexcept nogil:
    cdef Py_ssize_t k, j = 0
    cdef int i, r = old_all.shape[1]
    for k in range(keys.shape[0]):
        if moved[k]:
            keys_out[j] = keys[k]
            for i in range(r):
                old_out[j, i] = <uint64_t>old_all[k, i]
                new_out[j, i] = <uint64_t>new_all[k, i]
            j += 1


def move_plan(keys, old_seeds, old_weights, new_seeds, new_weights, replicas):
    """Keys whose set of owner seeds changes from the old to the new nodes."""
    k = as_u64(keys, "keys")
    os_, ow = node_arrays(old_seeds, old_weights)
    ns, nw = node_arrays(new_seeds, new_weights)
    cdef int r = check_replicas(replicas, min(os_.shape[0], ns.shape[0]))
    cdef Py_ssize_t n = k.shape[0], count
    cdef const uint64_t[::1] keys_v = k
    cdef const uint64_t[::1] os_v = os_
    cdef const uint64_t[::1] ns_v = ns
    old_all = np.empty((n, r), dtype=np.int64)
    new_all = np.empty((n, r), dtype=np.int64)
    moved = np.empty(n, dtype=np.uint8)
    cdef int64_t[:, ::1] old_v = old_all
    cdef int64_t[:, ::1] new_v = new_all
    cdef uint8_t[::1] moved_v = moved
    cdef Work wo, wn
    work_init(&wo, os_, ow, r)
    with nogil:  # one ring at a time: better locality than interleaving
        run_batch(keys_v, &wo, old_v)
    free(wo.ilo)
    work_init(&wn, ns, nw, r)
    with nogil:
        run_batch(keys_v, &wn, new_v)
        count = mark_moves(&os_v[0], &ns_v[0], old_v, new_v, moved_v)
    free(wn.ilo)
    keys_out = np.empty(count, dtype=np.uint64)
    old_out = np.empty((count, r), dtype=np.uint64)
    new_out = np.empty((count, r), dtype=np.uint64)
    cdef uint64_t[::1] keys_out_v = keys_out
    cdef uint64_t[:, ::1] old_out_v = old_out
    cdef uint64_t[:, ::1] new_out_v = new_out
    with nogil:
        gather_moves(keys_v, moved_v, old_v, new_v, keys_out_v, old_out_v, new_out_v)
    return MovePlan(keys_out, old_out, new_out)
