"""Past results: asv benchmark history, HEAD-vs-previous comparison, run index.

Benchmarks.  asv keeps one result file per (commit, environment) under
``.asv/results/<machine>/``.  :func:`compare_head` compares HEAD's file with
the newest file of an earlier commit, the way ``asv compare --factor F
--only-changed`` does: a benchmark is a *regression* when it got slower by more
than the factor **and** the change is significant (the 99 % confidence
intervals asv stored do not overlap; with ``repeat == 1`` or no statistics
the factor alone decides).  Slower-than-factor changes inside the noise are
kept as ``noisy`` so a report can show them without failing the night.

Runs.  ``reports/history.json`` lists every nightly run (date, commit,
status, key numbers); :func:`cluster_regressions` compares a cluster result
with the previous comparable run (same provider, nodes and fault plan).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plexilab.results import asvreport

INDEX_NAME = "history.json"
INDEX_VERSION = 1

Key = tuple[str, tuple[tuple[str, str], ...], str]


@dataclass(frozen=True)
class BenchPoint:
    """One timing of one asv result file, with asv's statistics when stored."""

    benchmark: str
    params: tuple[tuple[str, str], ...]
    backend: str
    seconds: float
    ci_99: tuple[float, float] | None = None
    repeat: int | None = None

    @property
    def key(self) -> Key:
        return (self.benchmark, self.params, self.backend)

    @property
    def label(self) -> str:
        return label_of(self.key)


def label_of(key: Key) -> str:
    """``cache.HitPath.time_get_hits (n=1) [cython]`` for a benchmark key."""
    benchmark, params, backend = key
    name = benchmark.removeprefix("bench_")
    args = ", ".join(f"{k}={v}" for k, v in params)
    return f"{name} ({args}) [{backend}]" if args else f"{name} [{backend}]"


@dataclass
class AsvRun:
    """One asv result file: commit, commit date (ms), environment, timings."""

    commit: str
    date: int
    env_name: str
    path: Path
    points: dict[Key, BenchPoint]


def _stat(entry: dict[str, Any], name: str, i: int) -> float | None:
    values = entry.get(name)
    if not isinstance(values, list) or i >= len(values):
        return None
    value = values[i]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def load_run(path: Path, param_names: dict[str, list[str]]) -> AsvRun:
    """Parse one asv result file (failed and non-timing benchmarks dropped)."""
    data = json.loads(path.read_text())
    columns: list[str] = data["result_columns"]
    points: dict[Key, BenchPoint] = {}
    for name, row in data["results"].items():
        entry = dict(zip(columns, row, strict=False))
        values = entry.get("result")
        if values is None or (param_names and name not in param_names):
            continue
        params: list[list[str]] = entry.get("params") or []
        names = param_names.get(name) or [f"param{i}" for i in range(len(params))]
        combos = list(itertools.product(*params)) if params else [()]
        for i, (combo, value) in enumerate(zip(combos, values, strict=False)):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            pairs = zip(names, combo, strict=False)
            labelled = [(n, asvreport._unquote(v)) for n, v in pairs]
            backend = next((v for n, v in labelled if n == "backend"), "-")
            rest = tuple((n, v) for n, v in labelled if n != "backend")
            lo = _stat(entry, "stats_ci_99_a", i)
            hi = _stat(entry, "stats_ci_99_b", i)
            repeat = _stat(entry, "stats_repeat", i)
            point = BenchPoint(
                name,
                rest,
                backend,
                float(value),
                (lo, hi) if lo is not None and hi is not None else None,
                int(repeat) if repeat is not None else None,
            )
            points[point.key] = point
    return AsvRun(
        commit=str(data.get("commit_hash", "")),
        date=int(data.get("date") or 0),
        env_name=str(data.get("env_name", "")),
        path=path,
        points=points,
    )


def load_runs(results_dir: Path, machine: str = "lab") -> list[AsvRun]:
    """Every result file of *machine*, oldest commit first."""
    if not (results_dir / machine).is_dir():
        return []
    names = asvreport.param_names_of(results_dir / "benchmarks.json")
    return [load_run(p, names) for p in asvreport.result_files(machine, results_dir)]


@dataclass(frozen=True)
class Change:
    """One benchmark in both runs: before/after seconds and the verdict."""

    benchmark: str
    params: dict[str, str]
    backend: str
    before: float
    after: float
    ratio: float  # after / before: > 1 is slower
    significant: bool
    regression: bool
    improvement: bool
    noisy: bool  # beyond the factor but inside the confidence intervals

    @property
    def label(self) -> str:
        return label_of((self.benchmark, tuple(self.params.items()), self.backend))


def is_different(a: BenchPoint, b: BenchPoint) -> bool:
    """asv's fallback significance test: the 99 % confidence intervals overlap?"""
    if a.ci_99 is None or b.ci_99 is None or 1 in (a.repeat, b.repeat):
        return True  # no statistics to go on: the factor alone decides
    (a_lo, a_hi), (b_lo, b_hi) = a.ci_99, b.ci_99
    return not (a_hi >= b_lo and a_lo <= b_hi)


def compare_runs(prev: AsvRun, head: AsvRun, factor: float) -> list[Change]:
    """Every benchmark present in both runs, slowest-getting first."""
    changes = []
    for key, after in head.points.items():
        before = prev.points.get(key)
        if before is None or before.seconds <= 0:
            continue
        ratio = after.seconds / before.seconds
        significant = is_different(before, after)
        slower = after.seconds > before.seconds * factor
        faster = after.seconds * factor < before.seconds
        changes.append(
            Change(
                benchmark=key[0],
                params=dict(key[1]),
                backend=key[2],
                before=before.seconds,
                after=after.seconds,
                ratio=ratio,
                significant=significant,
                regression=slower and significant,
                improvement=faster and significant,
                noisy=(slower or faster) and not significant,
            )
        )
    return sorted(changes, key=lambda c: -c.ratio)


@dataclass
class BenchComparison:
    """HEAD's asv result against the previous commit's."""

    factor: float
    head_commit: str | None = None
    prev_commit: str | None = None
    changes: list[Change] = field(default_factory=list)
    only_head: list[str] = field(default_factory=list)
    only_prev: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regression]

    @property
    def improvements(self) -> list[Change]:
        return [c for c in self.changes if c.improvement]

    def reasons(self) -> list[str]:
        """One line per regression (for the nightly's exit message)."""
        prev = (self.prev_commit or "?")[:8]
        return [
            f"benchmark regression: {c.label} {c.ratio:.2f}x slower than {prev} "
            f"({_fmt_s(c.before)} -> {_fmt_s(c.after)}, factor {self.factor:g})"
            for c in self.regressions
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "head_commit": self.head_commit,
            "prev_commit": self.prev_commit,
            "note": self.note,
            "compared": len(self.changes),
            "regressions": len(self.regressions),
            "improvements": len(self.improvements),
            "changes": [asdict(c) for c in self.changes],
            "only_head": self.only_head,
            "only_prev": self.only_prev,
        }


def _fmt_s(seconds: float) -> str:
    return asvreport.fmt_seconds(seconds)


def compare_head(
    runs: Sequence[AsvRun], head_commit: str, factor: float
) -> BenchComparison:
    """Compare HEAD's result with the newest result of an older commit.

    Both sides use the same asv environment when HEAD's exists in both; the
    note says why nothing was compared (no HEAD result, no earlier commit).
    """
    out = BenchComparison(factor=factor, head_commit=head_commit)
    heads = [r for r in runs if r.commit == head_commit]
    if not heads:
        out.note = f"no asv result for HEAD {head_commit[:8]}: nothing compared"
        return out
    head = heads[-1]
    older = [r for r in runs if r.commit != head_commit and r.date <= head.date]
    same_env = [r for r in older if r.env_name == head.env_name]
    candidates = same_env or older
    if not candidates:
        out.note = "no result of an earlier commit: nothing to compare with"
        return out
    prev = candidates[-1]
    out.prev_commit = prev.commit
    out.changes = compare_runs(prev, head, factor)
    out.only_head = sorted(label_of(k) for k in head.points.keys() - prev.points)
    out.only_prev = sorted(label_of(k) for k in prev.points.keys() - head.points)
    if not out.changes:
        out.note = "no benchmark in common with the previous result"
    return out


def series(runs: Sequence[AsvRun]) -> list[dict[str, Any]]:
    """JSON-friendly history: one entry per result file with its timings."""
    return [
        {
            "commit": run.commit,
            "date": run.date,
            "env": run.env_name,
            "points": [
                {
                    "benchmark": p.benchmark,
                    "params": dict(p.params),
                    "backend": p.backend,
                    "seconds": p.seconds,
                }
                for p in run.points.values()
            ],
        }
        for run in runs
    ]


# -- the run index ---------------------------------------------------------------


def load_index(reports: Path) -> dict[str, Any]:
    """``reports/history.json`` (an empty index when missing)."""
    path = reports / INDEX_NAME
    if not path.exists():
        return {"version": INDEX_VERSION, "runs": []}
    data: dict[str, Any] = json.loads(path.read_text())
    data.setdefault("runs", [])
    return data


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_run(reports: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Add (or replace, by ``id``) one run in the index; runs stay date-ordered."""
    index = load_index(reports)
    runs = [r for r in index["runs"] if r.get("id") != entry["id"]]
    runs.append(entry)
    runs.sort(key=lambda r: str(r.get("id", "")))
    index["runs"] = runs
    index["version"] = INDEX_VERSION
    _write_atomic(reports / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return index


def cluster_key(summary: dict[str, Any]) -> tuple[Any, ...]:
    """Runs are comparable when provider, node count and fault plan match."""
    return (summary.get("provider"), summary.get("nodes"), summary.get("faults"))


def previous_cluster(
    index: dict[str, Any], summary: dict[str, Any], exclude_id: str = ""
) -> dict[str, Any] | None:
    """The newest earlier run with a comparable cluster result, as its index row."""
    want = cluster_key(summary)
    for run in reversed(index.get("runs", [])):
        cluster = run.get("cluster")
        if run.get("id") == exclude_id or not cluster:
            continue
        if cluster_key(cluster) == want and cluster.get("throughput_msgs_per_s"):
            return dict(run)
    return None


def cluster_summary(
    result: dict[str, Any], *, provider: str, faults: str | None
) -> dict[str, Any]:
    """Key numbers of a cluster result JSON for the index and the comparison."""
    latency = result.get("latency_ms") or {}
    summary: dict[str, Any] = {
        "provider": provider,
        "nodes": result.get("nodes"),
        "faults": faults,
        "backend": result.get("backend"),
        "acked": result.get("acked"),
        "failures": result.get("failures"),
        "lost": result.get("lost"),
        "duplicated": result.get("duplicated"),
        "reordered": result.get("reordered"),
        "violations": result.get("violations") or {},
        "throughput_msgs_per_s": result.get("throughput_msgs_per_s"),
        "p50_ms": latency.get("p50"),
        "p99_ms": latency.get("p99"),
        "convergence_s": result.get("convergence_s"),
        "archs": sorted(
            {str(n.get("arch")) for n in result.get("per_node") or [] if n.get("arch")}
        ),
    }
    availability = result.get("availability")
    if isinstance(availability, dict):
        summary["availability"] = availability
    return summary


def cluster_regressions(
    summary: dict[str, Any], previous: dict[str, Any] | None, factor: float
) -> list[str]:
    """Checker findings, and a throughput drop beyond *factor* vs *previous*.

    The throughput gate applies to runs without faults only: under faults the
    throughput measures when the faults hit and how long recovery took (two
    quick nightlies of one commit in QEMU: 182 and 117 msg/s), not speed; the
    report still shows it next to the previous run's.
    """
    reasons = [
        f"cluster checker: {count:,} {what.replace('_', ' ')}"
        for what, count in (summary.get("violations") or {}).items()
    ]
    if not summary.get("violations"):  # a summary of an older result
        for what in ("lost", "duplicated", "reordered"):
            count = summary.get(what) or 0
            if count:
                reasons.append(f"cluster checker: {count} {what} message(s)")
    if previous is not None and not summary.get("faults"):
        before = (previous.get("cluster") or {}).get("throughput_msgs_per_s") or 0.0
        now = summary.get("throughput_msgs_per_s") or 0.0
        if before > 0 and now * factor < before:
            reasons.append(
                f"cluster throughput dropped {before / max(now, 1e-9):.2f}x: "
                f"{now:,.0f} msg/s vs {before:,.0f} msg/s in run "
                f"{previous.get('id')} ({str(previous.get('commit'))[:8]}), "
                f"factor {factor:g}"
            )
    return reasons
