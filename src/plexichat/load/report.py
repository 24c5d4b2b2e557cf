"""Locust-style reports: request counts, rates and latency percentiles."""

from __future__ import annotations

import csv
import io
from typing import Any, Final

from plexichat.stats import Histogram

PERCENTILES: Final = (50, 66, 75, 80, 90, 95, 98, 99, 99.9, 99.99, 100)
CSV_HEADER: Final = [
    "Type",
    "Name",
    "Request Count",
    "Failure Count",
    "Median Response Time",
    "Average Response Time",
    "Min Response Time",
    "Max Response Time",
    "Average Content Size",
    "Requests/s",
    "Failures/s",
    *[f"{q:g}%" for q in PERCENTILES],
]


def label(q: float) -> str:
    return f"{q:g}%"


def percentiles_ms(hist: Histogram) -> dict[str, float]:
    """Percentiles of a histogram of microseconds, in milliseconds."""
    values = hist.percentiles(PERCENTILES)
    return {
        label(q): round(v / 1000.0, 3) for q, v in zip(PERCENTILES, values, strict=True)
    }


def summary(
    name: str,
    hist: Histogram,
    *,
    requests: int,
    failures: int,
    seconds: float,
    content_size: float = 0.0,
) -> dict[str, Any]:
    """One Locust-style row as a dict (times in milliseconds)."""
    rate = requests / seconds if seconds > 0 else 0.0
    return {
        "name": name,
        "requests": requests,
        "failures": failures,
        "duration_s": round(seconds, 3),
        "requests_per_s": round(rate, 1),
        "failures_per_s": round(failures / seconds, 3) if seconds > 0 else 0.0,
        "avg_ms": round(hist.mean / 1000.0, 3),
        "min_ms": round(hist.min / 1000.0, 3),
        "max_ms": round(hist.max / 1000.0, 3),
        "median_ms": round(hist.percentile(50) / 1000.0, 3),
        "avg_content_size": content_size,
        "percentiles_ms": percentiles_ms(hist),
    }


def to_csv(rows: list[dict[str, Any]], type_: str = "SEND") -> str:
    """Rows in the column layout of Locust's ``*_stats.csv``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        pct = row["percentiles_ms"]
        writer.writerow(
            [
                type_,
                row["name"],
                row["requests"],
                row["failures"],
                row["median_ms"],
                row["avg_ms"],
                row["min_ms"],
                row["max_ms"],
                row["avg_content_size"],
                row["requests_per_s"],
                row["failures_per_s"],
                *[pct[label(q)] for q in PERCENTILES],
            ]
        )
    return out.getvalue()
