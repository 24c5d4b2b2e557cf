"""plexilab.results.report and .plots: HTML (Jinja2 templates) and PNGs of a run
directory, and the runs index."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import matplotlib.image
import pytest

from plexilab.providers.local import LocalHost
from plexilab.results import history, plots, report
from plexilab.run.cluster import ClusterConfig, run_cluster

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cluster_result(**extra: object) -> dict[str, object]:
    """A cluster JSON shaped like ``qemu.cluster``'s (two arches, no faults)."""
    nodes = [
        {"index": i, "node_id": f"n{i}", "host": f"vm{i}", "arch": arch, "boot_s": 11.5}
        for i, arch in enumerate(["x86_64", "aarch64", "x86_64"])
    ]
    for node in nodes:
        node["backend"] = "compiled"
        node["counters"] = {"acked": 1000}
    doc: dict[str, object] = {
        "nodes": 3,
        "replicas": 2,
        "backend": "compiled",
        "acked": 3000,
        "failures": 4,
        "lost": 0,
        "duplicated": 0,
        "reordered": 0,
        "throughput_msgs_per_s": 1500.0,
        "latency_ms": {"p50": 3.1, "p99": 40.2, "p99.9": 88.0},
        "convergence_s": 2.5,
        "p2p_latency_ms": {"p50": 1.0, "p99": 9.0},
        "per_node": nodes,
    }
    doc.update(extra)
    return doc


FAULTS = [
    {"kind": "kill", "target": "n1", "start_s": 4.0, "end_s": 7.0},
    {"kind": "partition", "target": "n0|n2", "start_s": 10.0, "end_s": 12.5},
]
TIMELINE = [
    {"t_s": float(t), "acked": 0 if 4 <= t < 7 else 1500, "failed": 30 if t == 5 else 0}
    for t in range(1, 16)
]


def write_run(run_dir: Path, cluster: dict[str, object] | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "id": run_dir.name,
        "commit": "c" * 40,
        "status": "failed",
        "reasons": ["benchmark regression: <script>x</script> 2.00x slower"],
        "steps": [
            {"name": "tests", "status": "ok", "seconds": 3.0, "log": "logs/tests.log"},
            {"name": "wheels-aarch64", "status": "skipped", "seconds": 0.0},
        ],
        "cluster": {
            "provider": "local",
            "fallback_reason": "this checkout has no `invoke qemu.cluster` task yet",
            "faults_note": "no --faults",
        },
    }
    (run_dir / "nightly.json").write_text(json.dumps(summary))
    if cluster is not None:
        (run_dir / "cluster.json").write_text(json.dumps(cluster))
    bench = {
        "speedups": [
            {
                "benchmark": "bench_wire.Encode.time_encode_batch_64",
                "params": {},
                "seconds": {"python": 1e-3, "cython": 5e-5, "numba": 2e-4},
                "speedup": {"python": 1.0, "cython": 20.0, "numba": 5.0},
            },
            {
                "benchmark": "bench_routing.OwnersBatch.time_owners_batch_100k",
                "params": {"replicas": "3"},
                "seconds": {"python": 2.7, "cython": 0.02},
                "speedup": {"python": 1.0, "cython": 135.0},
            },
        ],
        "comparison": {
            "factor": 1.1,
            "head_commit": "c" * 40,
            "prev_commit": "b" * 40,
            "compared": 2,
            "regressions": 1,
            "improvements": 0,
            "changes": [
                {
                    "benchmark": "bench_wire.Encode.time_encode_batch_64",
                    "params": {},
                    "backend": "cython",
                    "before": 2.5e-5,
                    "after": 5e-5,
                    "ratio": 2.0,
                    "significant": True,
                    "regression": True,
                    "improvement": False,
                    "noisy": False,
                }
            ],
        },
        "history": [
            {
                "commit": commit * 40,
                "date": i,
                "points": [
                    {
                        "benchmark": "bench_wire.Encode.time_encode_batch_64",
                        "params": {},
                        "backend": backend,
                        "seconds": seconds * (1 + i),
                    }
                    for backend, seconds in (("python", 1e-3), ("cython", 2.5e-5))
                ],
            }
            for i, commit in enumerate("abc")
        ],
    }
    (run_dir / "benchmarks.json").write_text(json.dumps(bench))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 400
    assert height > 200


def test_full_report_has_every_plot_and_escapes_html(tmp_path):
    run = tmp_path / "2026-11-26-030000"
    availability = {
        "during_faults": {"ok": 900, "failed": 30},
        "outside_faults": {"ok": 20000, "failed": 0},
    }
    service = [
        {
            "kind": "kill",
            "start_s": 4.0,
            "healthy_ok_share": 0.8125,
            "served_after_s": 2.5,
        },
        {
            "kind": "partition",
            "start_s": 10.0,
            "healthy_ok_share": None,
            "served_after_s": None,
        },
    ]
    write_run(
        run,
        cluster_result(
            faults=FAULTS,
            timeline=TIMELINE,
            availability=availability,
            fault_service=service,
        ),
    )
    made = report.build(run)
    assert set(made["plots"]) == {"latency", "timeline", "speedup", "bench_history"}
    for name in made["plots"].values():
        assert_png(run / name)
    page = (run / "index.html").read_text()
    for name in made["plots"].values():
        assert f'src="{name}"' in page
    assert "&lt;script&gt;" in page
    assert "<script>" not in page
    assert "Fallback:" in page
    assert "partition" in page
    assert "n0|n2" in page
    assert "96.77%" in page  # 900 ok of 930 during the fault windows
    assert "81.25%" in page  # fault_service: the kill's healthy side
    assert "served again after" in page
    assert 'href="logs/tests.log"' in page
    assert "class='regression'" in page


def test_report_without_time_series_says_so_and_draws_no_timeline(tmp_path):
    run = tmp_path / "run"
    write_run(run, cluster_result())
    made = report.build(run)
    assert "timeline" not in made["plots"]
    assert not (run / "timeline.png").exists()
    page = (run / "index.html").read_text()
    assert "no throughput time series" in page
    assert "Fault timeline" not in page


def test_faults_without_time_series_draw_the_windows_only(tmp_path):
    png, note = plots.plot_timeline({"faults": FAULTS}, tmp_path / "t.png")
    assert png is not None
    assert_png(png)
    assert "fault windows only" in note


def test_report_of_a_run_without_cluster_or_benchmarks(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "nightly.json").write_text(
        json.dumps({"id": "run", "status": "ok", "steps": [], "cluster": None})
    )
    made = report.build(run)
    assert made["plots"] == {}
    page = (run / "index.html").read_text()
    assert "cluster step not run" in page
    assert "benchmarks not run" in page


def test_latency_series_prefers_arch_then_node_splits():
    by_arch = {"x86_64": {"p50": 1, "p99": 5}, "aarch64": {"p50": 3, "p99": 20}}
    series, how = plots.latency_series(cluster_result(latency_by_arch=by_arch))
    assert how == "per architecture"
    assert [(s["label"], s["points"]) for s in series] == [
        ("aarch64", [(50.0, 3.0), (99.0, 20.0)]),
        ("x86_64", [(50.0, 1.0), (99.0, 5.0)]),
    ]
    doc = cluster_result()
    for node in doc["per_node"]:
        node["latency_ms"] = {"p50": 2.0, "p99.9": 9.0}
    series, how = plots.latency_series(doc)
    assert how == "per node"
    assert [s["label"] for s in series] == [
        "n0 (x86_64)",
        "n1 (aarch64)",
        "n2 (x86_64)",
    ]
    series, how = plots.latency_series(cluster_result())
    assert "no per-arch" in how
    assert series[0]["label"] == "all nodes (aarch64, x86_64)"
    assert series[0]["points"] == [(50.0, 3.1), (99.0, 40.2), (99.9, 88.0)]


def test_timeline_rates_divide_interval_counts_by_interval_length():
    rows = [{"t_s": 0.5, "acked": 50}, {"t_s": 1.0, "acked": 100, "failed": 5}]
    assert plots.timeline_rates(rows) == [(0.5, 100.0, 0.0), (1.0, 200.0, 10.0)]


def test_index_lists_runs_newest_first_with_links(tmp_path):
    for run_id, status, tput in (("2026-01-01-030000", "ok", 1000.0),
                                 ("2026-01-02-030000", "failed", 700.0)):  # fmt: skip
        summary = history.cluster_summary(
            cluster_result(throughput_msgs_per_s=tput), provider="local", faults=None
        )
        history.record_run(
            tmp_path,
            {
                "id": run_id,
                "commit": "e" * 40,
                "status": status,
                "quick": True,
                "cluster": summary,
                "benchmarks": {"regressions": 0},
                "reasons": ["cluster throughput dropped"] if status != "ok" else [],
                "report": f"{run_id}/index.html",
            },
        )
    out = report.build_index(tmp_path)
    page = out.read_text()
    assert page.index("2026-01-02-030000") < page.index("2026-01-01-030000")
    assert 'href="2026-01-01-030000/index.html"' in page
    assert "cluster throughput dropped" in page
    assert_png(tmp_path / "trend.png")


EVIL = "<img src=x onerror=alert(1)>"


def test_everything_from_the_results_is_escaped(tmp_path):
    """Values from result files are text, never markup: run page and index."""
    run = tmp_path / "run"
    cluster = cluster_result(
        backend=EVIL,
        faults=[
            {
                "kind": "kill",
                "target": EVIL,
                "start_s": 1.0,
                "end_s": 2.0,
                "error": f'"{EVIL}"',
            }
        ],
        availability={EVIL: "n/a"},
    )
    cluster["per_node"][0]["node_id"] = EVIL
    write_run(run, cluster)
    summary = json.loads((run / "nightly.json").read_text())
    summary["steps"][0].update(name=EVIL, log=f'logs/"{EVIL}.log', note=EVIL)
    summary["cluster"].update(command=EVIL, faults_note=EVIL)
    summary.update(id=EVIL, host={"name": EVIL})
    (run / "nightly.json").write_text(json.dumps(summary))
    report.build(run)
    page = (run / "index.html").read_text()
    assert "<img src=x" not in page
    assert page.count("&lt;img src=x onerror=alert(1)&gt;") >= 9
    assert 'href="logs/&#34;&lt;img' in page  # a quote cannot end the attribute
    history.record_run(
        tmp_path,
        {
            "id": EVIL,
            "commit": EVIL,
            "status": EVIL,
            "reasons": [EVIL],
            "report": f'"{EVIL}',
            "cluster": None,
        },
    )
    index = report.build_index(tmp_path).read_text()
    assert "<img src=x" not in index
    assert index.count("&lt;img src=x onerror=alert(1)&gt;") >= 3


def test_templates_ship_in_the_package_and_escape_by_default():
    folder = resources.files("plexilab.results") / report.TEMPLATES
    names = {p.name for p in folder.iterdir()}
    assert {"base.html.j2", "run.html.j2", "index.html.j2"} <= names
    assert report.ENV.autoescape is True
    table = report.Table(["a"], [report.Row([report.Cell("<b>", "num", "x.html")])])
    html = report.ENV.from_string(
        '{% from "macros.html.j2" import table %}{{ table(t) }}'
    ).render(t=table)
    assert '<td class="num"><a href="x.html">&lt;b&gt;</a></td>' in html


def test_run_page_sections_and_markup(tmp_path):
    run = tmp_path / "2026-11-26-030000"
    write_run(run, cluster_result(faults=FAULTS))
    report.build(run)
    page = (run / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>Nightly 2026-11-26-030000: failed</title>" in page
    headings = [
        h for h in ("Steps", "Cluster", "Benchmarks") if f"<h2>{h}</h2>" in page
    ]
    assert headings == ["Steps", "Cluster", "Benchmarks"]
    assert page.index("<h2>Steps</h2>") < page.index("<h2>Cluster</h2>")
    assert "<div class='bad'><b>FAILED</b><ul>" in page
    assert '<td class="skipped">skipped</td>' in page
    assert '<td class="num">3,000</td>' in page  # acked, formatted
    assert "<h3>Fault timeline</h3>" in page
    assert (
        "<tr class='regression'><td>wire.Encode.time_encode_batch_64 [cython]" in page
    )
    assert "<a href='cluster.json'>cluster.json</a>" in page


@pytest.mark.slow
def test_report_from_a_real_local_cluster_run(tmp_path):
    host = LocalHost(workdir=tmp_path / "host")
    config = ClusterConfig(
        nodes=3,
        duration=2.0,
        clients=4,
        inflight=16,
        channels=32,
        p2p_count=20,
        install="dev",
        results_dir=tmp_path / "cluster",
        gossip_interval=0.1,
    )
    try:
        result = run_cluster([host], config)
    finally:
        host.close()
    run = tmp_path / "2026-11-26-031500"
    run.mkdir()
    (run / "cluster.json").write_text(json.dumps(result))
    (run / "nightly.json").write_text(
        json.dumps({"id": run.name, "status": "ok", "cluster": {"provider": "local"}})
    )
    made = report.build(run)
    assert result["timeline"], "the load generator records a per-second timeline"
    assert made["plots"] == {"latency": "latency.png", "timeline": "timeline.png"}
    for name in made["plots"].values():
        assert_png(run / name)
    series, _ = plots.latency_series(result)
    assert len(series[0]["points"]) >= 3  # the load generator's percentiles
    page = (run / "index.html").read_text()
    assert f"{result['acked']:,}" in page
    assert "no throughput time series" not in page
