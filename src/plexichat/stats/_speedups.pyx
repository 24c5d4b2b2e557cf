# cython: language_level=3
"""Compiled latency histogram (same behaviour as plexichat.stats._reference).

Counts live in a C ``int64`` buffer; the layout, argument checks and byte
header come from :mod:`plexichat.stats._layout`, so errors match the
reference word for word.  Per-value and per-bucket loops run in C and keep
the GIL (they take milliseconds at most, and holding it keeps a concurrent
``reset`` or ``__init__`` from freeing the buffer under a running loop).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

import operator

import numpy as np

from plexichat.stats import _layout as L

cdef extern from *:
    """
    static inline int plexichat_bit_length(unsigned long long v) {
        return v ? 64 - __builtin_clzll(v) : 0;
    }
    """
    int bit_length "plexichat_bit_length"(unsigned long long v) nogil

cdef int64_t MAX_COUNT = 0x7FFFFFFFFFFFFFFF


cdef inline Py_ssize_t put_varint(unsigned char* out, uint64_t value) noexcept nogil:
    cdef Py_ssize_t n = 0
    while value >= 0x80:
        out[n] = <unsigned char>((value & 0x7F) | 0x80)
        value >>= 7
        n += 1
    out[n] = <unsigned char>value
    return n + 1


cdef inline Py_ssize_t read_varint(
    const unsigned char* data, Py_ssize_t size, Py_ssize_t pos, int64_t* value
) noexcept nogil:
    """New position, or -1 (truncated) / -2 (malformed)."""
    cdef uint64_t result = 0
    cdef unsigned char byte
    cdef int i
    for i in range(9):
        if pos >= size:
            return -1
        byte = data[pos]
        pos += 1
        result |= (<uint64_t>(byte & 0x7F)) << (7 * i)
        if byte < 0x80:
            if byte == 0 and i > 0:
                return -2
            value[0] = <int64_t>result
            return pos
    return -2


@cython.final
cdef class Histogram:
    """Latency histogram of integer values (e.g. microseconds)."""

    cdef object _layout
    cdef int64_t* _counts
    cdef Py_ssize_t _len
    cdef int64_t _total
    cdef int64_t _min
    cdef int64_t _max
    cdef int64_t _highest
    cdef int _unit
    cdef int _magnitude      # unit + sub_bucket_count_magnitude
    cdef int _half_magnitude
    cdef int64_t _half
    cdef uint64_t _mask

    __hash__ = None

    def __cinit__(
        self, lowest=1, highest=3_600_000_000, significant_figures=3
    ):
        # Everything happens here (no __init__), so no instance can exist
        # without its counts buffer, not even one made with Histogram.__new__.
        self._counts = NULL
        self._setup(L.make_layout(lowest, highest, significant_figures))

    def __dealloc__(self):
        free(self._counts)

    cdef int _setup(self, layout) except -1:
        self._layout = layout
        self._len = layout.counts_len
        self._counts = <int64_t*>calloc(self._len, sizeof(int64_t))
        if self._counts == NULL:
            raise MemoryError()
        self._total = 0
        self._min = 0
        self._max = 0
        self._highest = layout.highest
        self._unit = layout.unit_magnitude
        self._magnitude = layout.unit_magnitude + layout.sub_bucket_count_magnitude
        self._half_magnitude = layout.sub_bucket_half_count_magnitude
        self._half = layout.sub_bucket_half_count
        self._mask = layout.sub_bucket_mask
        return 0

    # -- index arithmetic ---------------------------------------------------

    cdef inline Py_ssize_t _index(self, int64_t v) noexcept nogil:
        cdef int bucket = bit_length(<uint64_t>v | self._mask) - self._magnitude
        return (
            ((<int64_t>(bucket + 1)) << self._half_magnitude)
            + (v >> (bucket + self._unit))
            - self._half
        )

    cdef inline int64_t _lowest_equivalent(self, Py_ssize_t index) noexcept nogil:
        cdef int64_t bucket = (index >> self._half_magnitude) - 1
        cdef int64_t sub = (index & (self._half - 1)) + self._half
        if bucket < 0:
            sub -= self._half
            bucket = 0
        return sub << (bucket + self._unit)

    cdef inline int64_t _range_size(self, Py_ssize_t index) noexcept nogil:
        cdef int64_t bucket = (index >> self._half_magnitude) - 1
        if bucket < 0:
            bucket = 0
        return (<int64_t>1) << (bucket + self._unit)

    cdef inline int64_t _highest_equivalent(self, Py_ssize_t index) noexcept nogil:
        return self._lowest_equivalent(index) + (self._range_size(index) - 1)

    cdef inline void _note_extremes(self, int64_t lo, int64_t hi) noexcept:
        if self._total == 0:
            self._min = lo
            self._max = hi
        else:
            if lo < self._min:
                self._min = lo
            if hi > self._max:
                self._max = hi

    # -- parameters and summary ---------------------------------------------

    @property
    def lowest(self):
        return self._layout.lowest

    @property
    def highest(self):
        return self._layout.highest

    @property
    def significant_figures(self):
        return self._layout.significant_figures

    @property
    def count(self):
        """Number of recorded values."""
        return self._total

    @property
    def min(self):
        """Smallest recorded value (exact; 0 when empty)."""
        return self._min

    @property
    def max(self):
        """Largest recorded value (exact; 0 when empty)."""
        return self._max

    @property
    def mean(self):
        """Mean of the bucket medians weighted by their counts (0.0 when empty)."""
        cdef double acc = 0.0
        cdef Py_ssize_t i
        cdef int64_t c
        if self._total == 0:
            return 0.0
        for i in range(self._len):
            c = self._counts[i]
            if c:
                acc += (<double>c) * (<double>(
                    self._lowest_equivalent(i) + (self._range_size(i) >> 1)
                ))
        return acc / <double>self._total

    # -- recording ----------------------------------------------------------

    def record(self, value, count=1):
        """Record *value* (``0..highest``) *count* times."""
        cdef int overflow = 0
        cdef long long v = -1
        cdef long long c = 0
        if PyLong_CheckExact(value):
            v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow or not (0 <= v <= self._highest):
            v = L.check_value(value, self._highest)
        if PyLong_CheckExact(count):
            c = PyLong_AsLongLongAndOverflow(count, &overflow)
        if overflow or c < 1 or c > MAX_COUNT - self._total:
            c = L.check_count(count, self._total)
        self._counts[self._index(v)] += c
        self._note_extremes(v, v)
        self._total += c

    cdef int _record_buffer(self, const int64_t[::1] vals) except -1:
        """Validate then record every value of *vals*."""
        cdef Py_ssize_t n = vals.shape[0]
        cdef Py_ssize_t i
        cdef int64_t v, lo, hi
        cdef const int64_t* p = &vals[0] if n else NULL
        cdef int64_t* counts = self._counts
        cdef uint64_t mask = self._mask
        cdef int magnitude = self._magnitude
        cdef int unit = self._unit
        cdef int half_magnitude = self._half_magnitude
        cdef int64_t half = self._half
        cdef int bucket
        if n == 0:
            return 0
        lo = p[0]
        hi = p[0]
        for i in range(1, n):
            v = p[i]
            lo = v if v < lo else lo
            hi = v if v > hi else hi
        L.check_extremes(lo, hi, self._highest)
        L.check_added(n, self._total)
        for i in range(n):
            v = p[i]
            bucket = bit_length(<uint64_t>v | mask) - magnitude
            counts[
                ((<int64_t>(bucket + 1)) << half_magnitude)
                + (v >> (bucket + unit))
                - half
            ] += 1
        self._note_extremes(lo, hi)
        self._total += n
        return 0

    def record_many(self, values):
        """Record every value of *values*; nothing is recorded if one is invalid."""
        cdef list items
        cdef Py_ssize_t i, n
        cdef int overflow, big = 0
        cdef long long v
        cdef int64_t[::1] out
        if (
            isinstance(values, np.ndarray)
            and values.ndim == 1
            and values.dtype.kind in "iu"
        ):
            if values.dtype.kind == "u" and values.dtype.itemsize == 8 and values.size:
                top = int(values.max())
                if top > self._highest:
                    raise L.value_error(top, self._highest)
            self._record_buffer(np.ascontiguousarray(values, dtype=np.int64))
            return
        items = list(values)  # a copy: __index__ may run code that mutates *values*
        n = len(items)
        buffer = np.empty(n, dtype=np.int64)
        out = buffer
        for i in range(n):
            item = items[i]
            if not PyLong_CheckExact(item):
                item = operator.index(item)
            overflow = 0
            v = PyLong_AsLongLongAndOverflow(item, &overflow)
            if overflow:
                big = 1
            else:
                out[i] = v
        if big:  # a value beyond int64: let the shared check name the culprit
            vals = L.index_all(items)
            L.check_extremes(min(vals), max(vals), self._highest)
        self._record_buffer(buffer)

    def merge(self, Histogram other not None):
        """Add the counts of *other* (same parameters) to this histogram."""
        cdef Py_ssize_t i
        cdef int64_t* into = self._counts
        cdef const int64_t* src = other._counts
        L.check_mergeable(self._layout, other._layout)
        if other._total == 0:
            return
        L.check_added(other._total, self._total)
        for i in range(self._len):
            into[i] += src[i]
        self._note_extremes(other._min, other._max)
        self._total += other._total

    def reset(self):
        """Forget every recorded value (the parameters stay)."""
        memset(self._counts, 0, self._len * sizeof(int64_t))
        self._total = 0
        self._min = 0
        self._max = 0

    # -- percentiles --------------------------------------------------------

    def percentile(self, q):
        """Value at percentile *q* (``0..100``); see the reference docstring."""
        return self.percentiles((q,))[0]

    def percentiles(self, qs):
        """``[percentile(q) for q in qs]`` computed in one pass over the counts."""
        cdef list checked = [L.check_percentile(q) for q in qs]
        cdef int64_t total = self._total
        cdef int64_t running = 0
        cdef int64_t c
        cdef Py_ssize_t i, wanted = 0, nranks
        cdef int64_t[::1] ranks
        cdef int64_t[::1] values
        if total == 0:
            return [0] * len(checked)
        rank_of = [L.rank(q, total) if q > 0.0 else 0 for q in checked]
        order = sorted(set(rank_of) - {0})
        nranks = len(order)
        ranks = np.array(order, dtype=np.int64)
        found = np.zeros(nranks, dtype=np.int64)
        values = found
        for i in range(self._len):
            c = self._counts[i]
            if c == 0:
                continue
            running += c
            while wanted < nranks and ranks[wanted] <= running:
                values[wanted] = self._highest_equivalent(i)
                wanted += 1
            if wanted == nranks:
                break
        lookup = dict(zip(order, found.tolist()))
        return [lookup[r] if r else self._min for r in rank_of]

    # -- serialisation ------------------------------------------------------

    def to_bytes(self):
        """Compact, canonical encoding (see the reference docstring)."""
        cdef Py_ssize_t i, n = 0, size = 0, previous = -1
        cdef unsigned char* buf
        for i in range(self._len):
            if self._counts[i]:
                n += 1
        header = bytes(L.encode_header(self._layout, self._min, self._max, n))
        buf = <unsigned char*>malloc(len(header) + 20 * n + 1)
        if buf == NULL:
            raise MemoryError()
        try:
            memcpy(buf, PyBytes_AS_STRING(header), len(header))
            size = len(header)
            for i in range(self._len):
                if self._counts[i]:
                    size += put_varint(buf + size, <uint64_t>(i - previous - 1))
                    size += put_varint(buf + size, <uint64_t>self._counts[i])
                    previous = i
            return PyBytes_FromStringAndSize(<char*>buf, size)
        finally:
            free(buf)

    @classmethod
    def from_bytes(cls, data):
        """Decode the output of ``to_bytes`` of any backend."""
        cdef bytes raw = L.as_bytes(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(raw)
        cdef Py_ssize_t size = len(raw)
        cdef Py_ssize_t pos, previous = -1, first = -1, k, entries, counts_len
        cdef int64_t gap = 0, c = 0, total = 0
        cdef int error = 0
        cdef Histogram hist
        header = L.decode_header(raw)
        layout = header.layout
        hist = Histogram(layout.lowest, layout.highest, layout.significant_figures)
        pos = header.pos
        entries = header.entries
        counts_len = hist._len
        for k in range(entries):
            pos = read_varint(p, size, pos, &gap)
            if pos < 0:
                error = <int>pos
                break
            pos = read_varint(p, size, pos, &c)
            if pos < 0:
                error = <int>pos
                break
            if gap >= counts_len - previous - 1:
                error = 1
                break
            if c == 0:
                error = 2
                break
            if c > MAX_COUNT - total:
                error = 3
                break
            previous += gap + 1
            if first < 0:
                first = previous
            hist._counts[previous] = c
            total += c
        if error:
            raise ValueError(
                {
                    -1: L.ERR_TRUNCATED,
                    -2: L.ERR_VARINT,
                    1: L.ERR_INDEX,
                    2: L.ERR_ZERO,
                    3: L.ERR_TOTAL,
                }[error]
            )
        L.check_tail(header, pos, size, first, previous)
        hist._total = total
        hist._min = header.min
        hist._max = header.max
        return hist

    def __reduce__(self):
        return (Histogram.from_bytes, (self.to_bytes(),))

    def __eq__(self, other):
        cdef Histogram o
        if type(other) is not Histogram:
            return NotImplemented
        o = other
        return (
            self._layout.params == o._layout.params
            and self._total == o._total
            and self._min == o._min
            and self._max == o._max
            and memcmp_equal(self._counts, o._counts, self._len)
        )

    def __repr__(self):
        return (
            f"Histogram(lowest={self.lowest}, highest={self.highest}, "
            f"significant_figures={self.significant_figures}, count={self._total}, "
            f"min={self._min}, max={self._max})"
        )


cdef bint memcmp_equal(const int64_t* a, const int64_t* b, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if a[i] != b[i]:
            return False
    return True
