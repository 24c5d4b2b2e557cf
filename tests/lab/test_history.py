"""plexilab.results.history: asv results, HEAD-vs-previous comparison, run index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plexilab.results import history

COLUMNS = [
    "result",
    "params",
    "version",
    "started_at",
    "duration",
    "stats_ci_99_a",
    "stats_ci_99_b",
    "stats_q_25",
    "stats_q_75",
    "stats_number",
    "stats_repeat",
    "samples",
    "profile",
]


def write_result(
    results: Path,
    commit: str,
    date: int,
    times: dict[str, list[float]],
    *,
    ci: float | None = 0.05,
    env: str = "existing-py",
) -> Path:
    """An asv result file in asv's own layout (``backend`` is the parameter)."""
    folder = results / "lab"
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, values in times.items():
        backends = ["'python'", "'cython'"][: len(values)]
        lo = [v * (1 - ci) for v in values] if ci is not None else None
        hi = [v * (1 + ci) for v in values] if ci is not None else None
        rows[name] = [values, [backends], "v1", date, 1.0, lo, hi, None, None]
        rows[name] += [[1] * len(values), [10] * len(values), None, None]
    doc = {
        "commit_hash": commit,
        "env_name": env,
        "date": date,
        "params": {"machine": "lab"},
        "result_columns": COLUMNS,
        "results": rows,
        "version": 2,
    }
    path = folder / f"{commit[:8]}-{env}.json"
    path.write_text(json.dumps(doc))
    listing = results / "benchmarks.json"
    bench = json.loads(listing.read_text()) if listing.exists() else {"version": 2}
    for name in times:
        bench[name] = {"type": "time", "param_names": ["backend"], "unit": "seconds"}
    bench["bench_x.Track.track_size"] = {"type": "track", "param_names": []}
    listing.write_text(json.dumps(bench))
    return path


OLD, MID, HEAD = "a" * 40, "b" * 40, "c" * 40


def test_load_runs_orders_by_commit_date_and_keeps_asv_statistics(tmp_path):
    write_result(tmp_path, HEAD, 3000, {"bench_w.A.time_a": [2.0, 0.5]})
    write_result(tmp_path, OLD, 1000, {"bench_w.A.time_a": [2.0, 0.4]}, ci=None)
    runs = history.load_runs(tmp_path)
    assert [r.commit for r in runs] == [OLD, HEAD]
    point = runs[1].points[("bench_w.A.time_a", (), "cython")]
    assert point.seconds == 0.5
    assert point.ci_99 == pytest.approx((0.475, 0.525))
    assert point.repeat == 10
    assert point.label == "w.A.time_a [cython]"
    assert runs[0].points[("bench_w.A.time_a", (), "python")].ci_99 is None
    assert history.load_runs(tmp_path / "missing") == []


def test_compare_flags_significant_slowdowns_beyond_the_factor_only(tmp_path):
    names = ["bench_w.A.time_slow", "bench_w.A.time_same", "bench_w.A.time_fast"]
    write_result(tmp_path, OLD, 1000, {n: [1.0, 0.1] for n in names})
    write_result(
        tmp_path,
        HEAD,
        2000,
        {names[0]: [1.0, 0.2], names[1]: [1.05, 0.1], names[2]: [1.0, 0.05]},
    )
    comp = history.compare_head(history.load_runs(tmp_path), HEAD, 1.1)
    assert comp.prev_commit == OLD
    assert [c.label for c in comp.regressions] == ["w.A.time_slow [cython]"]
    assert comp.regressions[0].ratio == pytest.approx(2.0)
    assert [c.label for c in comp.improvements] == ["w.A.time_fast [cython]"]
    (reason,) = comp.reasons()
    assert reason.startswith("benchmark regression: w.A.time_slow [cython] 2.00x")
    assert "aaaaaaaa" in reason
    doc = comp.to_json()
    assert (doc["regressions"], doc["improvements"], doc["compared"]) == (1, 1, 6)


def test_overlapping_confidence_intervals_are_noise_not_regressions(tmp_path):
    write_result(tmp_path, OLD, 1000, {"bench_w.A.time_a": [1.0]}, ci=0.5)
    write_result(tmp_path, HEAD, 2000, {"bench_w.A.time_a": [1.3]}, ci=0.5)
    comp = history.compare_head(history.load_runs(tmp_path), HEAD, 1.1)
    (change,) = comp.changes
    assert change.noisy
    assert not change.regression
    assert comp.reasons() == []


def test_without_statistics_the_factor_alone_decides(tmp_path):
    write_result(tmp_path, OLD, 1000, {"bench_w.A.time_a": [1.0]}, ci=None)
    write_result(tmp_path, HEAD, 2000, {"bench_w.A.time_a": [1.2]}, ci=None)
    runs = history.load_runs(tmp_path)
    assert len(history.compare_head(runs, HEAD, 1.1).regressions) == 1
    assert history.compare_head(runs, HEAD, 1.25).regressions == []


def test_compare_head_picks_the_newest_earlier_commit_and_explains_gaps(tmp_path):
    write_result(tmp_path, OLD, 1000, {"bench_w.A.time_a": [1.0]})
    write_result(tmp_path, MID, 2000, {"bench_w.A.time_a": [2.0], "bench_w.B.t": [1]})
    write_result(tmp_path, HEAD, 3000, {"bench_w.A.time_a": [2.0]})
    runs = history.load_runs(tmp_path)
    comp = history.compare_head(runs, HEAD, 1.1)
    assert comp.prev_commit == MID
    assert comp.regressions == []
    assert comp.only_prev == ["w.B.t [python]"]
    assert "no asv result for HEAD" in history.compare_head(runs, "d" * 40, 1.1).note
    first = history.compare_head(runs, OLD, 1.1)
    assert first.prev_commit is None
    assert "nothing to compare" in first.note
    series = history.series(runs)
    assert [s["commit"] for s in series] == [OLD, MID, HEAD]
    assert {"benchmark", "params", "backend", "seconds"} <= set(series[0]["points"][0])


def _entry(run_id: str, throughput: float, **cluster: object) -> dict[str, object]:
    summary = {"provider": "local", "nodes": 3, "faults": None}
    summary.update(cluster, throughput_msgs_per_s=throughput)
    return {"id": run_id, "commit": run_id * 4, "status": "ok", "cluster": summary}


def test_index_records_runs_in_order_and_replaces_by_id(tmp_path):
    assert history.load_index(tmp_path) == {"version": 1, "runs": []}
    history.record_run(tmp_path, _entry("2026-01-02-000000", 10.0))
    history.record_run(tmp_path, _entry("2026-01-01-000000", 20.0))
    index = history.record_run(tmp_path, _entry("2026-01-02-000000", 30.0))
    assert [r["id"] for r in index["runs"]] == [
        "2026-01-01-000000",
        "2026-01-02-000000",
    ]
    stored = json.loads((tmp_path / "history.json").read_text())
    assert stored["runs"][1]["cluster"]["throughput_msgs_per_s"] == 30.0
    assert not list(tmp_path.glob(".history.json.*"))


def test_previous_cluster_matches_provider_nodes_and_faults():
    index = {
        "runs": [
            _entry("r1", 100.0),
            _entry("r2", 200.0, provider="qemu"),
            _entry("r3", 300.0, faults="kill"),
            {"id": "r4", "cluster": None},
        ]
    }
    summary = {"provider": "local", "nodes": 3, "faults": None}
    assert history.previous_cluster(index, summary)["id"] == "r1"
    assert history.previous_cluster(index, {**summary, "faults": "kill"})["id"] == "r3"
    assert history.previous_cluster(index, {**summary, "nodes": 5}) is None


def test_cluster_regressions_checker_findings_and_throughput_drop():
    result = {
        "nodes": 3,
        "acked": 10,
        "lost": 2,
        "duplicated": 0,
        "reordered": 1,
        "throughput_msgs_per_s": 800.0,
        "latency_ms": {"p50": 1.0, "p99": 2.0},
        "per_node": [{"arch": "x86_64"}, {"arch": "aarch64"}],
        "availability": {"during_faults": {"ok": 1, "failed": 1}},
    }
    summary = history.cluster_summary(result, provider="qemu", faults="kill")
    assert summary["archs"] == ["aarch64", "x86_64"]
    assert summary["availability"] == result["availability"]
    previous = _entry("r1", 1000.0)
    reasons = history.cluster_regressions(summary, previous, 1.1)
    assert reasons == [
        "cluster checker: 2 lost message(s)",
        "cluster checker: 1 reordered message(s)",
    ]  # a run with faults: its throughput is not gated
    calm = history.cluster_summary(result, provider="qemu", faults=None)
    reasons = history.cluster_regressions(calm, previous, 1.1)
    assert reasons[2].startswith("cluster throughput dropped 1.25x: 800 msg/s")
    clean = {**calm, "lost": 0, "reordered": 0}
    assert history.cluster_regressions(clean, previous, 1.3) == []
    assert history.cluster_regressions(clean, None, 1.1) == []
