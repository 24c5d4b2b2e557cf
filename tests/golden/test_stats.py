"""Golden vectors of the stats histogram, checked on every available backend.

The vectors (tests/vectors/stats.json) were produced by the reference backend
(tests/vectors/generate_stats.py).  This module must not import hypothesis:
it runs inside minimal guests that only have pytest.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "stats.json"
CASES: list[dict[str, Any]] = json.loads(VECTORS.read_text())["cases"]


def build(impl: ModuleType, case: dict[str, Any]) -> Any:
    hist = impl.Histogram(*case["params"])
    hist.record_many(case["values"])
    for value, count in case["weighted"]:
        hist.record(value, count)
    return hist


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_recording_gives_golden_bytes(stats_impl: ModuleType, case: dict) -> None:
    hist = build(stats_impl, case)
    assert hist.to_bytes().hex() == case["bytes"]
    assert (hist.count, hist.min, hist.max) == (case["count"], case["min"], case["max"])
    assert hist.mean == case["mean"]
    assert hist.percentiles(case["quantiles"]) == case["percentiles"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_bytes_decode(stats_impl: ModuleType, case: dict) -> None:
    blob = bytes.fromhex(case["bytes"])
    hist = stats_impl.Histogram.from_bytes(blob)
    assert [hist.lowest, hist.highest, hist.significant_figures] == case["params"]
    assert (hist.count, hist.min, hist.max) == (case["count"], case["min"], case["max"])
    assert hist.mean == case["mean"]
    assert [hist.percentile(q) for q in case["quantiles"]] == case["percentiles"]
    assert hist.to_bytes() == blob
    assert hist == build(stats_impl, case)


def test_vectors_cover_every_precision() -> None:
    assert {c["params"][2] for c in CASES} == {1, 2, 3, 4, 5}
