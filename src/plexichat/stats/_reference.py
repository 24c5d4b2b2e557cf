"""Pure-Python reference latency histogram: the specification of every backend.

HdrHistogram layout
-------------------
For ``Histogram(lowest, highest, significant_figures=sf)``::

    sub_bucket_count      = 2 ** ceil(log2(2 * 10**sf))   # 32, 256, 2048, 32768, 262144
    sub_bucket_half_count = sub_bucket_count // 2          # >= 10**sf
    unit_magnitude        = floor(log2(lowest))
    sub_bucket_mask       = (sub_bucket_count - 1) << unit_magnitude
    bucket_count          = smallest n with (sub_bucket_count << unit_magnitude)
                            << (n - 1) > highest
    counts_len            = (bucket_count + 1) * sub_bucket_half_count

A value ``v`` (``0 <= v <= highest``) is counted at::

    bucket     = bit_length(v | sub_bucket_mask) - unit_magnitude
                 - log2(sub_bucket_count)
    sub_bucket = v >> (bucket + unit_magnitude)
    index      = (bucket + 1) * sub_bucket_half_count + sub_bucket
                 - sub_bucket_half_count

Bucket 0 counts ``[0, sub_bucket_count << unit)`` in steps of ``2**unit``;
bucket ``b >= 1`` counts ``[half << (b + unit), sub_bucket_count << (b + unit))``
in steps of ``2**(b + unit)``.  Every index therefore covers a range whose
width is at most ``1/sub_bucket_half_count <= 10**-sf`` of its smallest value
(or ``2**unit_magnitude`` in bucket 0): with ``lowest=1`` every value is
represented within a relative error of ``10**-sf``.

Statistics
----------
* ``min``/``max`` are the exact extremes recorded (0 when empty).
* ``percentile(q)``: 0 when empty; ``min`` for ``q == 0``; otherwise the
  highest value equivalent to the index at which the running count first
  reaches ``rank = max(1, ceil(nextafter(q, -inf) / 100 * count))``
  (HdrHistogram's value-at-percentile).
* ``mean``: ``sum(float(c) * float(median(i))) / count`` summed over the
  indexes in ascending order, where ``median(i)`` is the lowest equivalent
  value plus half the range width (HdrHistogram's mean); 0.0 when empty.

Byte format (``to_bytes``), version 1
-------------------------------------
``b"PXHG"``, version byte ``1``, significant-figures byte, then unsigned
LEB128 varints ``lowest``, ``highest``, ``min``, ``max``, ``n`` (the number of
non-zero counts), then ``n`` pairs ``(gap, count)``: ``gap`` is the number of
zero counts skipped since the previous non-zero index (the first pair counts
from index 0) and ``count >= 1``.  Varints are canonical (no overlong
encoding, at most 9 bytes).  ``from_bytes`` rejects anything else
(truncation, bad magic/version/parameters, indexes past the layout, zero
counts, total over 2**63-1, trailing bytes, min/max inconsistent with the
counts) with ``ValueError``; a valid input round-trips byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self

import numpy as np

from plexichat.stats import _layout as L

Buffer = bytes | bytearray | memoryview


class Histogram:
    """Latency histogram of integer values (e.g. microseconds)."""

    __slots__ = ("_counts", "_layout", "_max", "_min", "_total")
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(
        self,
        lowest: int = 1,
        highest: int = 3_600_000_000,
        significant_figures: int = 3,
    ) -> None:
        self._layout = L.make_layout(lowest, highest, significant_figures)
        self._counts = [0] * self._layout.counts_len
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
        median = self._layout.median_equivalent
        acc = 0.0
        for index, c in enumerate(self._counts):
            if c:
                acc += float(c) * float(median(index))
        return acc / self._total

    # -- recording ----------------------------------------------------------

    def _note_extremes(self, lo: int, hi: int) -> None:
        if self._total == 0:
            self._min, self._max = lo, hi
        else:
            self._min = min(self._min, lo)
            self._max = max(self._max, hi)

    def record(self, value: int, count: int = 1) -> None:
        """Record *value* (``0..highest``) *count* times."""
        value = L.check_value(value, self._layout.highest)
        count = L.check_count(count, self._total)
        self._counts[self._layout.index_of(value)] += count
        self._note_extremes(value, value)
        self._total += count

    def record_many(self, values: Iterable[int]) -> None:
        """Record every value of *values*; nothing is recorded if one is invalid."""
        if (
            isinstance(values, np.ndarray)
            and values.ndim == 1
            and values.dtype.kind in "iu"
        ):
            vals: list[int] = values.tolist()  # same ints as index_all, faster
        else:
            vals = L.index_all(values)
        if not vals:
            return
        lo, hi = min(vals), max(vals)
        L.check_extremes(lo, hi, self._layout.highest)
        L.check_added(len(vals), self._total)
        layout = self._layout
        counts = self._counts
        mask = layout.sub_bucket_mask
        unit = layout.unit_magnitude
        magnitude = layout.unit_magnitude + layout.sub_bucket_count_magnitude
        hmag = layout.sub_bucket_half_count_magnitude
        half = layout.sub_bucket_half_count
        for v in vals:
            bucket = (v | mask).bit_length() - magnitude
            counts[((bucket + 1) << hmag) + (v >> (bucket + unit)) - half] += 1
        self._note_extremes(lo, hi)
        self._total += len(vals)

    def merge(self, other: Histogram) -> None:
        """Add the counts of *other* (same parameters) to this histogram."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into Histogram")
        L.check_mergeable(self._layout, other._layout)
        if not other._total:
            return
        L.check_added(other._total, self._total)
        self._counts = [a + b for a, b in zip(self._counts, other._counts, strict=True)]
        self._note_extremes(other._min, other._max)
        self._total += other._total

    def reset(self) -> None:
        """Forget every recorded value (the parameters stay)."""
        self._counts = [0] * self._layout.counts_len
        self._total = 0
        self._min = 0
        self._max = 0

    # -- percentiles --------------------------------------------------------

    def percentile(self, q: float) -> int:
        """Value at percentile *q* (``0..100``); see the module docstring."""
        return self.percentiles([q])[0]

    def percentiles(self, qs: Iterable[float]) -> list[int]:
        """``[percentile(q) for q in qs]`` computed in one pass over the counts."""
        checked = [L.check_percentile(q) for q in qs]
        total = self._total
        if not total:
            return [0] * len(checked)
        ranks = sorted({L.rank(q, total) for q in checked if q > 0.0})
        found: dict[int, int] = {}
        running = 0
        wanted = 0
        for index, c in enumerate(self._counts):
            if not c:
                continue
            running += c
            while wanted < len(ranks) and ranks[wanted] <= running:
                found[ranks[wanted]] = self._layout.highest_equivalent(index)
                wanted += 1
            if wanted == len(ranks):
                break
        return [found[L.rank(q, total)] if q > 0.0 else self._min for q in checked]

    # -- serialisation ------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Compact, canonical encoding (see the module docstring)."""
        nonzero = [(i, c) for i, c in enumerate(self._counts) if c]
        out = L.encode_header(self._layout, self._min, self._max, len(nonzero))
        previous = -1
        for index, c in nonzero:
            L.put_varint(out, index - previous - 1)
            L.put_varint(out, c)
            previous = index
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: Buffer) -> Self:
        """Decode the output of ``to_bytes`` of any backend."""
        raw = L.as_bytes(data)
        header = L.decode_header(raw)
        layout = header.layout
        counts = [0] * layout.counts_len
        pos = header.pos
        previous = -1
        first = -1
        total = 0
        for _ in range(header.entries):
            gap, pos = L.read_varint(raw, pos)
            c, pos = L.read_varint(raw, pos)
            if gap >= layout.counts_len - previous - 1:
                raise ValueError(L.ERR_INDEX)
            if c == 0:
                raise ValueError(L.ERR_ZERO)
            if c > L.MAX_COUNT - total:
                raise ValueError(L.ERR_TOTAL)
            previous += gap + 1
            if first < 0:
                first = previous
            counts[previous] = c
            total += c
        L.check_tail(header, pos, len(raw), first, previous)
        hist = cls(layout.lowest, layout.highest, layout.significant_figures)
        hist._counts = counts
        hist._total = total
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
            and self._counts == other._counts
        )

    def __repr__(self) -> str:
        return (
            f"Histogram(lowest={self.lowest}, highest={self.highest}, "
            f"significant_figures={self.significant_figures}, count={self._total}, "
            f"min={self._min}, max={self._max})"
        )
