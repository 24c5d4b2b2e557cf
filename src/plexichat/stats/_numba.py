"""Numba backend of the latency histogram (same behaviour as the reference).

Counts live in a NumPy ``int64`` array; the per-value and per-bucket loops
(record_many, percentiles, mean, merge and the byte codec) are ``@njit``
functions compiled once and cached on disk.  Importing this module raises
``ImportError`` when Numba is not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Self, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

from plexichat.stats import _layout as L

F = TypeVar("F", bound=Callable[..., Any])
I64Array = npt.NDArray[np.int64]
Buffer = bytes | bytearray | memoryview

_ERRORS = {  # error codes of _decode_entries
    -1: L.ERR_TRUNCATED,
    -2: L.ERR_VARINT,
    1: L.ERR_INDEX,
    2: L.ERR_ZERO,
    3: L.ERR_TOTAL,
}


def jit(fn: F) -> F:
    """``numba.njit(cache=True)`` with the signature kept for type checkers."""
    return cast(F, numba.njit(cache=True)(fn))


def _bit_length_portable(x: int) -> int:
    n = 0
    if x >= 1 << 32:
        x >>= 32
        n += 32
    if x >= 1 << 16:
        x >>= 16
        n += 16
    if x >= 1 << 8:
        x >>= 8
        n += 8
    if x >= 1 << 4:
        x >>= 4
        n += 4
    if x >= 1 << 2:
        x >>= 2
        n += 2
    if x >= 1 << 1:
        x >>= 1
        n += 1
    return n + x


try:  # LLVM's ctlz: ~3x faster record_many than the portable binary search
    from numba.cpython.unsafe.numbers import leading_zeros
except ImportError:  # pragma: no cover - older/newer Numba without the intrinsic
    _bit_length = jit(_bit_length_portable)
else:

    @jit
    def _bit_length(x: int) -> int:
        """Bit length of ``x > 0``."""
        return 64 - int(leading_zeros(x))  # type: ignore[call-arg]


@jit
def _min_max(values: I64Array) -> tuple[int, int]:
    lo = values[0]
    hi = values[0]
    for v in values:
        lo = min(lo, v)
        hi = max(hi, v)
    return lo, hi


@jit
def _record_all(
    counts: I64Array, values: I64Array, mask: int, magnitude: int, unit: int,
    half_magnitude: int, half: int,
) -> None:  # fmt: skip
    for v in values:
        bucket = _bit_length(v | mask) - magnitude
        counts[((bucket + 1) << half_magnitude) + (v >> (bucket + unit)) - half] += 1


@jit
def _lowest_equivalent(index: int, unit: int, half_magnitude: int, half: int) -> int:
    bucket = (index >> half_magnitude) - 1
    sub = (index & (half - 1)) + half
    if bucket < 0:
        sub -= half
        bucket = 0
    return sub << (bucket + unit)


@jit
def _range_size(index: int, unit: int, half_magnitude: int) -> int:
    bucket = max((index >> half_magnitude) - 1, 0)
    return 1 << (bucket + unit)


@jit
def _mean_sum(counts: I64Array, unit: int, half_magnitude: int, half: int) -> float:
    acc = 0.0
    for i in range(counts.shape[0]):
        c = counts[i]
        if c:
            median = _lowest_equivalent(i, unit, half_magnitude, half) + (
                _range_size(i, unit, half_magnitude) >> 1
            )
            acc += float(c) * float(median)
    return acc


@jit
def _values_at_ranks(
    counts: I64Array, ranks: I64Array, unit: int, half_magnitude: int, half: int
) -> I64Array:
    """Highest equivalent value where the running count reaches each sorted rank."""
    found = np.zeros(ranks.shape[0], dtype=np.int64)
    running = 0
    wanted = 0
    for i in range(counts.shape[0]):
        c = counts[i]
        if c == 0:
            continue
        running += c
        while wanted < ranks.shape[0] and ranks[wanted] <= running:
            found[wanted] = (
                _lowest_equivalent(i, unit, half_magnitude, half)
                + _range_size(i, unit, half_magnitude)
                - 1
            )
            wanted += 1
        if wanted == ranks.shape[0]:
            break
    return found


@jit
def _put_varint(out: npt.NDArray[np.uint8], pos: int, value: int) -> int:
    while value >= 0x80:
        out[pos] = (value & 0x7F) | 0x80
        value >>= 7
        pos += 1
    out[pos] = value
    return pos + 1


@jit
def _encode_entries(counts: I64Array, out: npt.NDArray[np.uint8]) -> int:
    pos = 0
    previous = -1
    for i in range(counts.shape[0]):
        c = counts[i]
        if c:
            pos = _put_varint(out, pos, i - previous - 1)
            pos = _put_varint(out, pos, c)
            previous = i
    return pos


@jit
def _decode_entries(
    data: npt.NDArray[np.uint8], pos: int, entries: int, counts: I64Array
) -> tuple[int, int, int, int, int]:
    """Fill *counts*; return ``(error, pos, first, last, total)``.

    ``error``: 0 ok, -1 truncated, -2 malformed varint, 1 index out of range,
    2 zero count, 3 total overflow (checked in this order per entry).  The
    varint reader is inlined: a helper returning a tuple is ~20x slower.
    """
    max_count = 0x7FFFFFFFFFFFFFFF
    size = data.shape[0]
    counts_len = counts.shape[0]
    previous = -1
    first = -1
    total = 0
    gap = 0
    c = 0
    for _ in range(entries):
        for field in range(2):
            result = 0
            shift = 0
            while True:
                if pos >= size:
                    return -1, pos, first, previous, total
                byte = int(data[pos])
                pos += 1
                result |= (byte & 0x7F) << shift
                if byte < 0x80:
                    if byte == 0 and shift > 0:
                        return -2, pos, first, previous, total
                    break
                shift += 7
                if shift == 63:
                    return -2, pos, first, previous, total
            if field == 0:
                gap = result
            else:
                c = result
        if gap >= counts_len - previous - 1:
            return 1, pos, first, previous, total
        if c == 0:
            return 2, pos, first, previous, total
        if c > max_count - total:
            return 3, pos, first, previous, total
        previous += gap + 1
        if first < 0:
            first = previous
        counts[previous] = c
        total += c
    return 0, pos, first, previous, total


@jit
def _add(into: I64Array, other: I64Array) -> None:
    for i in range(into.shape[0]):
        into[i] += other[i]


class Histogram:
    """Latency histogram of integer values (e.g. microseconds)."""

    __slots__ = (
        "_counts",
        "_geometry",
        "_highest",
        "_index_consts",
        "_layout",
        "_max",
        "_min",
        "_total",
    )
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(
        self,
        lowest: int = 1,
        highest: int = 3_600_000_000,
        significant_figures: int = 3,
    ) -> None:
        self._setup(L.make_layout(lowest, highest, significant_figures))

    def _setup(self, layout: L.Layout) -> None:
        self._layout = layout
        self._counts: I64Array = np.zeros(layout.counts_len, dtype=np.int64)
        self._geometry = (
            layout.unit_magnitude,
            layout.sub_bucket_half_count_magnitude,
            layout.sub_bucket_half_count,
        )
        self._index_consts = (
            layout.sub_bucket_mask,
            layout.unit_magnitude + layout.sub_bucket_count_magnitude,
            layout.unit_magnitude,
            layout.sub_bucket_half_count_magnitude,
            layout.sub_bucket_half_count,
        )
        self._highest = layout.highest
        self._total = 0
        self._min = 0
        self._max = 0

    # -- parameters and summary ---------------------------------------------

    @property
    def lowest(self) -> int:
        return self._layout.lowest

    @property
    def highest(self) -> int:
        return self._layout.highest

    @property
    def significant_figures(self) -> int:
        return self._layout.significant_figures

    @property
    def count(self) -> int:
        """Number of recorded values."""
        return self._total

    @property
    def min(self) -> int:
        """Smallest recorded value (exact; 0 when empty)."""
        return self._min

    @property
    def max(self) -> int:
        """Largest recorded value (exact; 0 when empty)."""
        return self._max

    @property
    def mean(self) -> float:
        """Mean of the bucket medians weighted by their counts (0.0 when empty)."""
        if not self._total:
            return 0.0
        return float(_mean_sum(self._counts, *self._geometry)) / self._total

    # -- recording ----------------------------------------------------------

    def _note_extremes(self, lo: int, hi: int) -> None:
        if self._total == 0:
            self._min, self._max = lo, hi
        else:
            self._min = min(self._min, lo)
            self._max = max(self._max, hi)

    def record(self, value: int, count: int = 1) -> None:
        """Record *value* (``0..highest``) *count* times."""
        # Plain-int fast path; anything unusual goes through the shared checks.
        if type(value) is not int or not 0 <= value <= self._highest:
            value = L.check_value(value, self._highest)
        if type(count) is not int or not 1 <= count <= L.MAX_COUNT - self._total:
            count = L.check_count(count, self._total)
        mask, magnitude, unit, half_magnitude, half = self._index_consts
        bucket = (value | mask).bit_length() - magnitude
        index = ((bucket + 1) << half_magnitude) + (value >> (bucket + unit)) - half
        self._counts[index] += count
        if not self._total:
            self._min = self._max = value
        elif value < self._min:
            self._min = value
        elif value > self._max:
            self._max = value
        self._total += count

    def _record_array(self, values: I64Array) -> None:
        if not values.shape[0]:
            return
        lo, hi = (int(x) for x in _min_max(values))
        L.check_extremes(lo, hi, self._layout.highest)
        L.check_added(values.shape[0], self._total)
        _record_all(self._counts, values, *self._index_consts)
        self._note_extremes(lo, hi)
        self._total += values.shape[0]

    def record_many(self, values: Iterable[int]) -> None:
        """Record every value of *values*; nothing is recorded if one is invalid."""
        if (
            isinstance(values, np.ndarray)
            and values.ndim == 1
            and values.dtype.kind in "iu"
        ):
            if values.dtype.kind == "u" and values.dtype.itemsize == 8 and values.size:
                top = int(values.max())
                if top > self._layout.highest:
                    raise L.value_error(top, self._layout.highest)
            self._record_array(np.ascontiguousarray(values, dtype=np.int64))
            return
        vals = L.index_all(values)
        if vals:
            L.check_extremes(min(vals), max(vals), self._layout.highest)
        self._record_array(np.array(vals, dtype=np.int64))

    def merge(self, other: Histogram) -> None:
        """Add the counts of *other* (same parameters) to this histogram."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into Histogram")
        L.check_mergeable(self._layout, other._layout)
        if not other._total:
            return
        L.check_added(other._total, self._total)
        _add(self._counts, other._counts)
        self._note_extremes(other._min, other._max)
        self._total += other._total

    def reset(self) -> None:
        """Forget every recorded value (the parameters stay)."""
        self._counts[:] = 0
        self._total = 0
        self._min = 0
        self._max = 0

    # -- percentiles --------------------------------------------------------

    def percentile(self, q: float) -> int:
        """Value at percentile *q* (``0..100``); see the reference docstring."""
        return self.percentiles((q,))[0]

    def percentiles(self, qs: Iterable[float]) -> list[int]:
        """``[percentile(q) for q in qs]`` computed in one pass over the counts."""
        checked = [L.check_percentile(q) for q in qs]
        total = self._total
        if not total:
            return [0] * len(checked)
        rank_of = [L.rank(q, total) if q > 0.0 else 0 for q in checked]
        order = sorted(set(rank_of) - {0})
        found = _values_at_ranks(
            self._counts, np.array(order, dtype=np.int64), *self._geometry
        )
        lookup = dict(zip(order, found.tolist(), strict=True))
        return [lookup[r] if r else self._min for r in rank_of]

    # -- serialisation ------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Compact, canonical encoding (see the reference docstring)."""
        entries = int(np.count_nonzero(self._counts))
        header = L.encode_header(self._layout, self._min, self._max, entries)
        out = np.empty(18 * entries + 1, dtype=np.uint8)
        size = _encode_entries(self._counts, out)
        return bytes(header) + out[:size].tobytes()

    @classmethod
    def from_bytes(cls, data: Buffer) -> Self:
        """Decode the output of ``to_bytes`` of any backend."""
        raw = L.as_bytes(data)
        header = L.decode_header(raw)
        hist = cls.__new__(cls)
        hist._setup(header.layout)
        error, pos, first, last, total = _decode_entries(
            np.frombuffer(raw, dtype=np.uint8), header.pos, header.entries, hist._counts
        )
        if error:
            raise ValueError(_ERRORS[int(error)])
        L.check_tail(header, int(pos), len(raw), int(first), int(last))
        hist._total = int(total)
        hist._min = header.min
        hist._max = header.max
        return hist

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (type(self).from_bytes, (self.to_bytes(),))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Histogram)
        return (
            self._layout.params == other._layout.params
            and self._total == other._total
            and self._min == other._min
            and self._max == other._max
            and bool(np.array_equal(self._counts, other._counts))
        )

    def __repr__(self) -> str:
        return (
            f"Histogram(lowest={self.lowest}, highest={self.highest}, "
            f"significant_figures={self.significant_figures}, count={self._total}, "
            f"min={self._min}, max={self._max})"
        )
