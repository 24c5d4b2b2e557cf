"""Latency histogram: behaviour of every backend, precision, and equivalence."""

from __future__ import annotations

import math
import pickle
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from plexichat.stats import _layout as L
from plexichat.stats import _reference as ref

HOUR = 3_600_000_000
FIXTURE_OK = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # modules only
)


def outcome(call: Any, *args: Any) -> tuple[str, object]:
    """``("ok", result)`` or ``(exception type name, message)``."""
    try:
        return ("ok", call(*args))
    except (TypeError, ValueError) as exc:
        return (type(exc).__name__, str(exc))


def snapshot(hist: Any) -> tuple[object, ...]:
    return (
        hist.to_bytes(),
        hist.count,
        hist.min,
        hist.max,
        hist.mean,
        hist.percentiles([0, 1, 25, 50, 90, 99, 99.9, 100]),
    )


# -- layout (HdrHistogram geometry) ------------------------------------------


@pytest.mark.parametrize(
    ("sf", "sub_buckets"),
    [(1, 32), (2, 256), (3, 2048), (4, 32768), (5, 262144)],
)
def test_sub_bucket_count_is_next_power_of_two(sf: int, sub_buckets: int) -> None:
    layout = L.make_layout(1, HOUR, sf)
    assert layout.sub_bucket_count == sub_buckets
    assert layout.sub_bucket_half_count >= 10**sf


def test_default_layout_matches_hdrhistogram() -> None:
    # HdrHistogram(1, 3_600_000_000, 3): 22 buckets, counts array of 23552
    layout = L.make_layout(1, HOUR, 3)
    assert (layout.bucket_count, layout.counts_len) == (22, 23552)
    assert layout.index_of(HOUR) < layout.counts_len


@settings(max_examples=300, deadline=None)
@given(
    lowest=st.integers(1, 10**6),
    sf=st.integers(1, 5),
    data=st.data(),
)
def test_every_value_maps_into_its_bucket(lowest: int, sf: int, data: Any) -> None:
    highest = data.draw(st.integers(2 * lowest, L.MAX_VALUE))
    layout = L.make_layout(lowest, highest, sf)
    value = data.draw(st.integers(0, highest))
    index = layout.index_of(value)
    assert 0 <= index < layout.counts_len
    low, high = layout.lowest_equivalent(index), layout.highest_equivalent(index)
    assert low <= value <= high
    assert high - low + 1 == layout.range_size(index)
    # precision: relative 10**-sf, except below the unit (2**floor(log2 lowest))
    assert high - low < max(value * 10.0**-sf, 2**layout.unit_magnitude)
    if index + 1 < layout.counts_len:
        assert layout.lowest_equivalent(index + 1) == high + 1


# -- construction -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 100, 3), "lowest"),
        ((-5, 100, 3), "lowest"),
        ((1, 100, 0), "significant_figures"),
        ((1, 100, 6), "significant_figures"),
        ((10, 19, 3), "highest"),
        ((1, 2**63, 3), "highest"),
        ((2**55, 2**62, 3), "too large"),
    ],
)
def test_bad_parameters(stats_impl: ModuleType, args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        stats_impl.Histogram(*args)


@pytest.mark.parametrize("args", [(1.0, 100, 3), (1, "100", 3), (1, 100, 2.5)])
def test_parameters_must_be_ints(stats_impl: ModuleType, args: tuple) -> None:
    with pytest.raises(TypeError):
        stats_impl.Histogram(*args)


def test_defaults_and_empty_state(stats_impl: ModuleType) -> None:
    hist = stats_impl.Histogram()
    assert (hist.lowest, hist.highest, hist.significant_figures) == (1, HOUR, 3)
    assert (hist.count, hist.min, hist.max, hist.mean) == (0, 0, 0, 0.0)
    assert hist.percentile(50) == 0
    assert hist.percentiles([0, 50, 100]) == [0, 0, 0]
    assert "count=0" in repr(hist)


# -- recording --------------------------------------------------------------


def test_record_and_summary(stats_impl: ModuleType) -> None:
    hist = stats_impl.Histogram(1, 10**6, 3)
    hist.record(5)
    hist.record(1000, 3)
    hist.record(np.int64(7))
    hist.record(True)  # operator.index semantics: 1
    assert (hist.count, hist.min, hist.max) == (6, 1, 1000)
    assert hist.mean == pytest.approx((5 + 3000 + 7 + 1) / 6)  # exact buckets < 2048
    assert hist.percentiles([0, 10, 50, 100]) == [1, 1, 7, 1000]


@pytest.mark.parametrize(
    ("value", "count", "error"),
    [
        (-1, 1, ValueError),
        (10**6 + 1, 1, ValueError),
        (2**64, 1, ValueError),
        (-(2**64), 1, ValueError),
        (1.5, 1, TypeError),
        ("5", 1, TypeError),
        (None, 1, TypeError),
        (5, 0, ValueError),
        (5, -3, ValueError),
        (5, 2**63, ValueError),
        (5, 1.0, TypeError),
    ],
)
def test_record_rejects(
    stats_impl: ModuleType, value: Any, count: Any, error: type
) -> None:
    hist = stats_impl.Histogram(1, 10**6, 3)
    spec = ref.Histogram(1, 10**6, 3)
    got = outcome(hist.record, value, count)
    assert got[0] == error.__name__
    assert got == outcome(spec.record, value, count)
    assert hist.count == 0
    assert hist.to_bytes() == spec.to_bytes()


BAD_MANY: list[Any] = [
    [1, 2, -1],
    [1, 10**6 + 1, 2],
    [10**30, -5, 3],
    [10**30, 7],
    [1, 2, "3"],
    [1, 2.0],
    [1, None],
    np.array([1, -1], dtype=np.int64),
    np.array([1, 10**6 + 1], dtype=np.int32),
    np.array([1, 2**64 - 1], dtype=np.uint64),
    np.array([1.0, 2.0]),
    np.array([True, False]),
    np.array([[1, 2], [3, 4]]),
    np.array(5),
    5,
    "12",
    [[1]],
]


@pytest.mark.parametrize("values", BAD_MANY, ids=[repr(v) for v in BAD_MANY])
def test_record_many_is_all_or_nothing(stats_impl: ModuleType, values: Any) -> None:
    hist = stats_impl.Histogram(1, 10**6, 3)
    hist.record(10)
    before = hist.to_bytes()
    got = outcome(hist.record_many, values)
    assert got[0] in ("TypeError", "ValueError")
    spec = ref.Histogram(1, 10**6, 3)
    assert got == outcome(spec.record_many, values)
    assert hist.to_bytes() == before


GOOD_MANY: list[Any] = [
    [],
    [0, 1, 2, 10**6],
    range(0, 10**6, 9973),
    (v for v in (5, 6, 7)),
    np.array([3, 1, 2], dtype=np.int8),
    np.array([3, 1, 2**19], dtype=np.uint32),
    np.array([3, 1, 10**6], dtype=np.uint64),
    np.arange(0, 4000, 3, dtype=np.int64)[::2],  # not contiguous
    np.array([1, 2, 3], dtype=object),
    [np.int16(4), True, 2**19],
]


@pytest.mark.parametrize("values", GOOD_MANY, ids=[repr(v) for v in GOOD_MANY])
def test_record_many_inputs(stats_impl: ModuleType, values: Any) -> None:
    if not isinstance(values, list | range | np.ndarray):
        values = list(values)  # a generator can be consumed only once
    hist = stats_impl.Histogram(1, 10**6, 3)
    spec = ref.Histogram(1, 10**6, 3)
    hist.record_many(values)
    spec.record_many(values)
    assert snapshot(hist) == snapshot(spec)
    assert hist.count == len(values)


def test_record_many_matches_record_loop(stats_impl: ModuleType) -> None:
    values = np.random.default_rng(7).integers(0, HOUR, 5000)
    many = stats_impl.Histogram()
    many.record_many(values)
    loop = stats_impl.Histogram()
    for value in values.tolist():
        loop.record(value)
    assert many == loop
    assert many.to_bytes() == loop.to_bytes()


def test_count_overflow(stats_impl: ModuleType) -> None:
    hist = stats_impl.Histogram(1, 1000, 2)
    hist.record(5, L.MAX_COUNT)
    with pytest.raises(ValueError, match="exceed"):
        hist.record(5)
    with pytest.raises(ValueError, match="exceed"):
        hist.record_many([1])
    other = stats_impl.Histogram(1, 1000, 2)
    other.record(6)
    with pytest.raises(ValueError, match="exceed"):
        hist.merge(other)
    assert hist.count == L.MAX_COUNT
    assert hist.percentile(100) == 5
    assert stats_impl.Histogram.from_bytes(hist.to_bytes()) == hist


# -- percentiles --------------------------------------------------------------


def exact_percentile(ordered: list[int], q: float) -> int:
    """Value of the sorted data at HdrHistogram's rank for *q*."""
    if q == 0:
        return ordered[0]
    # ceil(q% of n) on q lowered by one ulp: 99.9 % of 1000 values is rank 999
    wanted = math.ceil(math.nextafter(q, -math.inf) / 100.0 * len(ordered))
    return ordered[min(max(wanted, 1), len(ordered)) - 1]


QS = st.one_of(
    st.sampled_from([0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0]),
    st.floats(0.0, 100.0),
)


@FIXTURE_OK
@given(
    sf=st.integers(1, 5),
    values=st.lists(st.integers(0, HOUR), min_size=1, max_size=300),
    qs=st.lists(QS, min_size=1, max_size=8),
)
def test_percentiles_within_precision(
    stats_impl: ModuleType, sf: int, values: list[int], qs: list[float]
) -> None:
    hist = stats_impl.Histogram(1, HOUR, sf)
    hist.record_many(values)
    ordered = sorted(values)
    got = hist.percentiles(qs)
    assert got == [hist.percentile(q) for q in qs]
    for q, value in zip(qs, got, strict=True):
        exact = exact_percentile(ordered, q)
        assert value >= exact
        assert value - exact <= exact * 10.0**-sf
    assert hist.percentile(0) == ordered[0] == hist.min
    assert hist.max == ordered[-1]


@pytest.mark.parametrize("q", [-0.001, 100.0001, math.nan, math.inf])
def test_percentile_out_of_range(stats_impl: ModuleType, q: float) -> None:
    hist = stats_impl.Histogram()
    hist.record(5)
    with pytest.raises(ValueError, match="percentile"):
        hist.percentile(q)
    with pytest.raises(ValueError, match="percentile"):
        hist.percentiles([50, q])


@pytest.mark.parametrize("q", ["50", b"50", None, [50]])
def test_percentile_not_a_number(stats_impl: ModuleType, q: Any) -> None:
    hist = stats_impl.Histogram()
    with pytest.raises(TypeError):
        hist.percentile(q)


def test_percentile_rank_rounding(stats_impl: ModuleType) -> None:
    hist = stats_impl.Histogram()
    hist.record_many(range(1, 1001))
    assert hist.percentile(99.9) == 999
    assert hist.percentile(0.1) == 1
    assert hist.percentile(0.1000001) == 2
    assert hist.percentile(50) == 500
    assert hist.percentiles([100, 50, 50, 0]) == [1000, 500, 500, 1]


# -- merge, reset, equality, pickling ---------------------------------------------


def test_merge(stats_impl: ModuleType) -> None:
    a = stats_impl.Histogram()
    b = stats_impl.Histogram()
    both = stats_impl.Histogram()
    a.record_many([5, 50, 500])
    b.record_many([1, 10**6])
    both.record_many([5, 50, 500, 1, 10**6])
    a.merge(b)
    assert a == both
    assert (a.min, a.max, a.count) == (1, 10**6, 5)
    empty = stats_impl.Histogram()
    empty.merge(both)
    assert empty == both
    both.merge(stats_impl.Histogram())
    assert both == a


def test_merge_rejects(stats_impl: ModuleType) -> None:
    hist = stats_impl.Histogram()
    with pytest.raises(ValueError, match="different parameters"):
        hist.merge(stats_impl.Histogram(1, HOUR, 2))
    with pytest.raises(ValueError, match="different parameters"):
        hist.merge(stats_impl.Histogram(2, HOUR, 3))
    with pytest.raises(TypeError):
        hist.merge(object())
    with pytest.raises(TypeError):
        hist.merge(None)


def test_reset_and_equality(stats_impl: ModuleType) -> None:
    hist = stats_impl.Histogram()
    hist.record_many([3, 4, 5])
    assert hist != stats_impl.Histogram()
    assert hist != stats_impl.Histogram(1, HOUR, 2)
    assert hist != "histogram"
    hist.reset()
    assert hist == stats_impl.Histogram()
    assert hist.to_bytes() == stats_impl.Histogram().to_bytes()
    hist.record(9)
    assert (hist.min, hist.max) == (9, 9)
    with pytest.raises(TypeError):
        hash(hist)


def test_pickle_round_trip(stats_impl: ModuleType) -> None:
    hist = stats_impl.Histogram(10, 10**9, 2)
    hist.record_many([10, 20, 123456789])
    copy = pickle.loads(pickle.dumps(hist))
    assert copy == hist
    assert type(copy) is type(hist)


# -- equivalence with the reference -------------------------------------------

PARAMS = st.sampled_from(
    [(1, HOUR, 3), (1, 1000, 1), (1000, 10**9, 2), (1, 2**63 - 1, 2), (7, 10**5, 4)]
)


@st.composite
def workloads(draw: Any) -> tuple[tuple[int, int, int], list[tuple]]:
    params = draw(PARAMS)
    value = st.integers(-2, params[1] + 2)
    ops = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("record"), value, st.integers(-1, 2**40)),
                st.tuples(st.just("many"), st.lists(value, max_size=40)),
                st.tuples(st.just("merge"), st.lists(value, max_size=20)),
                st.tuples(st.just("reset")),
            ),
            max_size=12,
        )
    )
    return params, ops


def run(impl: ModuleType, params: tuple, ops: list[tuple]) -> list[object]:
    hist = impl.Histogram(*params)
    seen: list[object] = []
    for op in ops:
        if op[0] == "record":
            seen.append(outcome(hist.record, op[1], op[2]))
        elif op[0] == "many":
            seen.append(outcome(hist.record_many, op[1]))
        elif op[0] == "merge":
            other = impl.Histogram(*params)
            seen.append(outcome(other.record_many, op[1]))
            seen.append(outcome(hist.merge, other))
        else:
            hist.reset()
        seen.append(snapshot(hist))
    return seen


@FIXTURE_OK
@given(workload=workloads())
def test_matches_reference(stats_impl: ModuleType, workload: Any, skips: Any) -> None:
    if stats_impl is ref:
        skips.skip("reference-is-spec")
    params, ops = workload
    assert run(stats_impl, params, ops) == run(ref, params, ops)


# -- byte format ---------------------------------------------------------------


def sample(impl: ModuleType, values: list[int] | None = None) -> Any:
    hist = impl.Histogram(1, HOUR, 3)
    hist.record_many(values if values is not None else [0, 7, 7, 1500, 123456, HOUR])
    return hist


def test_bytes_load_across_backends(stats_impl: ModuleType) -> None:
    from plexichat import accel

    mine = sample(stats_impl)
    for backend in accel.available("stats"):
        other = accel.load_backend("stats", backend)
        theirs = sample(other)
        assert theirs.to_bytes() == mine.to_bytes()
        assert stats_impl.Histogram.from_bytes(theirs.to_bytes()) == mine
        assert other.Histogram.from_bytes(mine.to_bytes()) == theirs


def test_from_bytes_accepts_buffers(stats_impl: ModuleType) -> None:
    blob = sample(stats_impl).to_bytes()
    for data in (bytearray(blob), memoryview(blob)):
        assert stats_impl.Histogram.from_bytes(data).to_bytes() == blob


@pytest.mark.parametrize("data", ["PXHG", 5, None, [1, 2]])
def test_from_bytes_rejects_non_bytes(stats_impl: ModuleType, data: Any) -> None:
    with pytest.raises(TypeError):
        stats_impl.Histogram.from_bytes(data)


def test_every_truncation_is_rejected(stats_impl: ModuleType) -> None:
    blob = sample(stats_impl).to_bytes()
    for size in range(len(blob)):
        got = outcome(stats_impl.Histogram.from_bytes, blob[:size])
        assert got[0] == "ValueError", size
        assert got == outcome(ref.Histogram.from_bytes, blob[:size])


def header(
    lowest: int = 1,
    highest: int = 1000,
    lo: int = 5,
    hi: int = 5,
    entries: int = 1,
    *,
    sf: int = 2,
    version: int = 1,
) -> bytearray:
    out = bytearray(b"PXHG") + bytes([version, sf])
    for value in (lowest, highest, lo, hi, entries):
        L.put_varint(out, value)
    return out


CORRUPT: dict[str, tuple[bytes, str]] = {
    "bad magic": (b"PXHX" + bytes(header())[4:] + b"\x05\x01", "bad magic"),
    "short bad magic": (b"XY", "bad magic"),
    "empty": (b"", "truncated"),
    "version": (bytes(header(version=2)) + b"\x05\x01", "version 2"),
    "sf": (bytes(header(sf=9)) + b"\x05\x01", "significant_figures"),
    "params": (bytes(header(lowest=0)) + b"\x05\x01", "lowest"),
    "too many entries": (bytes(header(entries=10**6)), "buckets"),
    "overlong varint": (bytes(header()) + b"\x85\x00\x01", "malformed varint"),
    "varint too long": (bytes(header()) + b"\xff" * 9 + b"\x01\x01", "malformed"),
    "index out of range": (bytes(header()) + b"\xff\x7f\x01", "out of range"),
    "huge gap": (bytes(header()) + b"\xff" * 8 + b"\x7f\x01", "out of range"),
    "zero count": (bytes(header()) + b"\x05\x00", "zero bucket count"),
    "total overflow": (
        bytes(header(lo=5, hi=6, entries=2))
        + b"\x05"
        + b"\xff" * 8
        + b"\x7f"
        + b"\x00\x01",
        "total count",
    ),
    "trailing": (bytes(header()) + b"\x05\x01\x00", "trailing"),
    "min mismatch": (bytes(header(lo=4)) + b"\x05\x01", "min/max"),
    "max mismatch": (bytes(header(hi=6)) + b"\x05\x01", "min/max"),
    "max beyond highest": (bytes(header(hi=2000)) + b"\x05\x01", "min/max"),
    "min above max": (bytes(header(lo=6, hi=5)) + b"\x05\x01", "min/max"),
    "empty with min": (bytes(header(lo=1, hi=1, entries=0)), "min/max"),
}


def test_corruption_cases_are_valid_otherwise() -> None:
    good = bytes(header()) + b"\x05\x01"
    hist = ref.Histogram.from_bytes(good)
    assert (hist.count, hist.min, hist.max) == (1, 5, 5)
    assert hist.to_bytes() == good


@pytest.mark.parametrize("name", list(CORRUPT))
def test_from_bytes_rejects_corruption(stats_impl: ModuleType, name: str) -> None:
    data, match = CORRUPT[name]
    got = outcome(stats_impl.Histogram.from_bytes, data)
    assert got[0] == "ValueError"
    assert match in str(got[1])
    assert got == outcome(ref.Histogram.from_bytes, data)


@FIXTURE_OK
@given(
    values=st.lists(st.integers(0, HOUR), max_size=30),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 3),
)
def test_mutated_bytes_agree_with_reference(
    stats_impl: ModuleType, values: list[int], edits: list, cut: int
) -> None:
    blob = bytearray(sample(ref, values).to_bytes())
    for pos, byte in edits:
        if pos < len(blob):
            blob[pos] = byte
    data = bytes(blob[: len(blob) - cut] if cut else blob)
    assume(len(data) > 0)
    got = outcome(lambda d: stats_impl.Histogram.from_bytes(d).to_bytes(), data)
    want = outcome(lambda d: ref.Histogram.from_bytes(d).to_bytes(), data)
    assert got == want
    if got[0] == "ok":
        assert got[1] == data  # canonical: whatever decodes re-encodes identically


def test_package_exports_the_active_backend() -> None:
    import plexichat.stats
    from plexichat import accel

    assert accel.active("stats") == plexichat.stats.BACKEND
    assert plexichat.stats.Histogram is accel.load("stats").Histogram
    assert plexichat.stats.MAGIC == b"PXHG"
