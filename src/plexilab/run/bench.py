"""Alternating rounds of cluster runs and what they add up to (``local.bench``,
``local.bench-security``): medians, ratios, every reason a run failed."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from plexilab.run.result import RunResult

Runs = dict[str, list[RunResult]]
Shown = Callable[[int, str, RunResult], None]


def throughput(result: RunResult) -> float:
    return result.throughput_msgs_per_s or 0.0


def p99(result: RunResult) -> float:
    return float((result.latency_ms or {}).get("p99", 0.0))


def alternate(
    rounds: int,
    variants: Sequence[str],
    run: Callable[[str, str], RunResult],
    show: Shown,
    results: str = "",
) -> Runs:
    """*rounds* rounds of one ``run(variant, results_dir)`` per variant,
    variants alternating (``results/<variant>-<round>`` when *results*);
    *show* each result."""
    runs: Runs = {v: [] for v in variants}
    for round_ in range(max(1, rounds)):
        for variant in variants:
            sub = str(Path(results) / f"{variant}-{round_}") if results else ""
            res = run(variant, sub)
            runs[variant].append(res)
            show(round_, variant, res)
    return runs


def median_throughput(rows: Sequence[RunResult]) -> float:
    return statistics.median(throughput(r) for r in rows)


def security_summary(runs: Runs, modes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per mode: median msg/s, its ratio to the first mode's, median p99."""
    base = median_throughput(runs[modes[0]])
    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        median = median_throughput(runs[mode])
        out[mode] = {
            "msgs_per_s": median,
            "ratio": median / base if base else float("nan"),
            "p99_ms": statistics.median(p99(r) for r in runs[mode]),
        }
    return out


def docs(runs: Runs) -> dict[str, list[dict[str, Any]]]:
    """The runs' JSON documents."""
    return {k: [r.to_dict() for r in rows] for k, rows in runs.items()}


def reasons(runs: Runs) -> list[str]:
    """Every reason any of *runs* failed for (sorted, once each)."""
    every = [r for rows in runs.values() for r in rows]
    return sorted({reason for r in every for reason in r.verdict()})
