"""Bucket layout, argument checks and the byte format shared by every stats backend.

Everything here is O(1) per call (or per histogram); the per-value and
per-bucket loops live in each backend.  Keeping the checks and messages in
one place is what makes the backends raise identical errors.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

MAX_VALUE: Final = 2**63 - 1
MAX_COUNT: Final = 2**63 - 1
MAGIC: Final = b"PXHG"
FORMAT_VERSION: Final = 1
HEADER_FIXED: Final = 6  # magic, version byte, significant-figures byte
MAX_VARINT_BYTES: Final = 9  # 9 * 7 = 63 bits

ERR_TRUNCATED: Final = "histogram bytes are truncated"
ERR_VARINT: Final = "malformed varint in histogram bytes"
ERR_INDEX: Final = "bucket index out of range in histogram bytes"
ERR_ZERO: Final = "zero bucket count in histogram bytes"
ERR_TOTAL: Final = "total count exceeds 2**63 - 1 in histogram bytes"
ERR_TRAILING: Final = "trailing bytes after histogram"
ERR_EXTREMES: Final = "min/max in histogram bytes do not match the bucket counts"
ERR_COUNT_OVERFLOW: Final = "total count would exceed 2**63 - 1"


@dataclass(frozen=True)
class Layout:
    """HdrHistogram bucket geometry for one ``(lowest, highest, sf)``.

    See :mod:`plexichat.stats._reference` for the formulas.
    """

    lowest: int
    highest: int
    significant_figures: int
    unit_magnitude: int
    sub_bucket_count_magnitude: int
    sub_bucket_half_count_magnitude: int
    sub_bucket_count: int
    sub_bucket_half_count: int
    sub_bucket_mask: int
    bucket_count: int
    counts_len: int

    @property
    def params(self) -> tuple[int, int, int]:
        return (self.lowest, self.highest, self.significant_figures)

    def index_of(self, value: int) -> int:
        """Counts index of *value* (``0 <= value <= MAX_VALUE``)."""
        bucket = (value | self.sub_bucket_mask).bit_length() - (
            self.unit_magnitude + self.sub_bucket_count_magnitude
        )
        sub_bucket = value >> (bucket + self.unit_magnitude)
        return (
            ((bucket + 1) << self.sub_bucket_half_count_magnitude)
            + sub_bucket
            - self.sub_bucket_half_count
        )

    def lowest_equivalent(self, index: int) -> int:
        """Smallest value counted at *index*."""
        bucket = (index >> self.sub_bucket_half_count_magnitude) - 1
        sub_bucket = (index & (self.sub_bucket_half_count - 1)) + (
            self.sub_bucket_half_count
        )
        if bucket < 0:
            sub_bucket -= self.sub_bucket_half_count
            bucket = 0
        return sub_bucket << (bucket + self.unit_magnitude)

    def range_size(self, index: int) -> int:
        """Number of distinct values counted at *index*."""
        bucket = max((index >> self.sub_bucket_half_count_magnitude) - 1, 0)
        return 1 << (bucket + self.unit_magnitude)

    def highest_equivalent(self, index: int) -> int:
        """Largest value counted at *index*."""
        return self.lowest_equivalent(index) + self.range_size(index) - 1

    def median_equivalent(self, index: int) -> int:
        """Middle of the values counted at *index* (used by ``mean``)."""
        return self.lowest_equivalent(index) + (self.range_size(index) >> 1)


def make_layout(lowest: int, highest: int, significant_figures: int) -> Layout:
    """Validate the parameters and compute the bucket geometry."""
    lowest = operator.index(lowest)
    highest = operator.index(highest)
    sf = operator.index(significant_figures)
    if lowest < 1:
        raise ValueError(f"lowest must be >= 1, got {lowest}")
    if not 1 <= sf <= 5:
        raise ValueError(f"significant_figures must be in 1..5, got {sf}")
    if highest < 2 * lowest:
        raise ValueError(f"highest must be >= 2 * lowest ({2 * lowest}), got {highest}")
    if highest > MAX_VALUE:
        raise ValueError(f"highest must be <= 2**63 - 1, got {highest}")
    largest_single_unit = 2 * 10**sf
    sub_count_magnitude = (largest_single_unit - 1).bit_length()  # ceil(log2)
    half_magnitude = sub_count_magnitude - 1
    unit_magnitude = lowest.bit_length() - 1  # floor(log2(lowest))
    if unit_magnitude + half_magnitude > 61:
        raise ValueError(f"lowest={lowest} is too large for {sf} significant figures")
    sub_count = 1 << sub_count_magnitude
    half_count = sub_count >> 1
    smallest_untrackable = sub_count << unit_magnitude
    bucket_count = 1
    while smallest_untrackable <= highest:
        smallest_untrackable <<= 1
        bucket_count += 1
    return Layout(
        lowest=lowest,
        highest=highest,
        significant_figures=sf,
        unit_magnitude=unit_magnitude,
        sub_bucket_count_magnitude=sub_count_magnitude,
        sub_bucket_half_count_magnitude=half_magnitude,
        sub_bucket_count=sub_count,
        sub_bucket_half_count=half_count,
        sub_bucket_mask=(sub_count - 1) << unit_magnitude,
        bucket_count=bucket_count,
        counts_len=(bucket_count + 1) * half_count,
    )


# -- argument checks -----------------------------------------------------------


def value_error(value: int, highest: int) -> ValueError:
    return ValueError(f"value {value} outside 0..{highest}")


def check_value(value: int, highest: int) -> int:
    """*value* as an ``int`` in ``0..highest`` (``TypeError``/``ValueError``)."""
    value = operator.index(value)
    if not 0 <= value <= highest:
        raise value_error(value, highest)
    return value


def check_count(count: int, total: int) -> int:
    """*count* as an ``int`` >= 1 that keeps the total count in int64."""
    count = operator.index(count)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count > MAX_COUNT - total:
        raise ValueError(ERR_COUNT_OVERFLOW)
    return count


def index_all(values: Iterable[int]) -> list[int]:
    """Every element of *values* through ``operator.index`` (the generic path)."""
    return [operator.index(v) for v in values]


def check_extremes(lo: int, hi: int, highest: int) -> None:
    """Raise the error for the smallest bad value if ``lo``/``hi`` is out of range."""
    if lo < 0:
        raise value_error(lo, highest)
    if hi > highest:
        raise value_error(hi, highest)


def check_added(added: int, total: int) -> None:
    if added > MAX_COUNT - total:
        raise ValueError(ERR_COUNT_OVERFLOW)


def check_percentile(q: float) -> float:
    """*q* as a float in ``[0, 100]`` (strings are a ``TypeError``, NaN invalid)."""
    if isinstance(q, str | bytes | bytearray):
        raise TypeError(f"percentile must be a number, got {type(q).__name__}")
    q = float(q)
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    return q


def rank(q: float, total: int) -> int:
    """1-based rank reached at percentile *q* > 0 of *total* recorded values.

    ``ceil(q / 100 * total)`` computed on ``q`` lowered by one ulp, as
    HdrHistogram does, so that e.g. 99.9 % of 1000 is rank 999 (not 1000).
    """
    fraction = math.nextafter(q, -math.inf) / 100.0 * total
    return max(1, min(total, math.ceil(fraction)))


def check_mergeable(a: Layout, b: Layout) -> None:
    if a.params != b.params:
        raise ValueError(
            "cannot merge histograms with different parameters "
            f"(lowest, highest, significant_figures) {a.params} != {b.params}"
        )


# -- byte format -----------------------------------------------------------------


def put_varint(out: bytearray, value: int) -> None:
    """Append *value* (0..2**63-1) as unsigned LEB128."""
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode one canonical LEB128 varint at *pos*; return ``(value, new_pos)``."""
    result = 0
    for i in range(MAX_VARINT_BYTES):
        if pos >= len(data):
            raise ValueError(ERR_TRUNCATED)
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if byte == 0 and i > 0:
                raise ValueError(ERR_VARINT)  # overlong encoding
            return result, pos
    raise ValueError(ERR_VARINT)


def encode_header(layout: Layout, lo: int, hi: int, entries: int) -> bytearray:
    """Header of the byte format (everything before the bucket entries)."""
    out = bytearray(MAGIC)
    out.append(FORMAT_VERSION)
    out.append(layout.significant_figures)
    for value in (layout.lowest, layout.highest, lo, hi, entries):
        put_varint(out, value)
    return out


@dataclass(frozen=True)
class Header:
    layout: Layout
    min: int
    max: int
    entries: int
    pos: int  # offset of the first bucket entry


def as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected a bytes-like object, got {type(data).__name__}")
    return bytes(data)


def decode_header(data: bytes) -> Header:
    """Parse and validate the header of *data*."""
    head = data[:4]
    if head != MAGIC[: len(head)]:
        raise ValueError(f"not a histogram (bad magic {head!r})")
    if len(data) < HEADER_FIXED:
        raise ValueError(ERR_TRUNCATED)
    if data[4] != FORMAT_VERSION:
        raise ValueError(f"unsupported histogram format version {data[4]}")
    pos = HEADER_FIXED
    fields = []
    for _ in range(5):
        value, pos = read_varint(data, pos)
        fields.append(value)
    lowest, highest, lo, hi, entries = fields
    layout = make_layout(lowest, highest, data[5])
    if entries > layout.counts_len:
        raise ValueError(
            f"histogram bytes list {entries} buckets, "
            f"the layout has only {layout.counts_len}"
        )
    return Header(layout, lo, hi, entries, pos)


def check_tail(header: Header, end: int, size: int, first: int, last: int) -> None:
    """Checks after the entries: no trailing bytes, min/max match the counts."""
    if end != size:
        raise ValueError(ERR_TRAILING)
    layout, lo, hi = header.layout, header.min, header.max
    if header.entries == 0:
        ok = lo == 0 and hi == 0
    else:
        ok = (
            0 <= lo <= hi <= layout.highest
            and layout.index_of(lo) == first
            and layout.index_of(hi) == last
        )
    if not ok:
        raise ValueError(ERR_EXTREMES)
