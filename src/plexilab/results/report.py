"""HTML report of one nightly run directory, and the index of all runs.

A run directory (``reports/<YYYY-mm-dd-HHMMSS>/``) holds ``nightly.json``
(steps, verdict), optionally ``benchmarks.json`` (asv speedups of HEAD, the
comparison with the previous commit, the per-commit history) and
``cluster.json`` (a ``local.cluster``/``qemu.cluster`` result).  :func:`build`
draws what the data supports (:mod:`plexilab.results.plots`: ``latency.png``,
``timeline.png``, ``speedup.png``, ``bench_history.png``) and writes
``index.html`` next to the PNGs; :func:`build_index` writes
``reports/index.html`` (and ``trend.png``) from ``reports/history.json``.

This module shapes the data into rows of :class:`Cell`; the markup lives in
Jinja2 templates shipped with the package (``results/templates/*.html.j2``,
read through :class:`jinja2.PackageLoader`) with autoescape on, so whatever
a result file holds is escaped.

``python -m plexilab.results.report RUN_DIR`` rebuilds one run's report;
``--index REPORTS`` rebuilds ``REPORTS/index.html`` from ``history.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from plexilab.results import asvreport, history, plots

TEMPLATES = "templates"
ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("plexilab.results", TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


@dataclass(frozen=True)
class Cell:
    """One table cell: its text (escaped by the template), class and link."""

    text: str
    cls: str = ""
    href: str = ""


@dataclass(frozen=True)
class Row:
    cells: list[Cell]
    cls: str = ""


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[Row] = field(default_factory=list)


def _cell(value: object, cls: str = "", href: str = "") -> Cell:
    return Cell("" if value is None else str(value), cls, href)


def _fmt_num(value: Any, fmt: str = ",.0f") -> str:
    if isinstance(value, int | float):
        return format(value, fmt)
    return "-" if value is None else str(value)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def render(template: str, **context: Any) -> str:
    """Render one of the package's templates with *context*."""
    return ENV.get_template(template).render(**context)


# -- one run ------------------------------------------------------------------------


def steps_table(steps: Sequence[dict[str, Any]]) -> Table:
    table = Table(["step", "status", "time", "exit", "log", "note"])
    for s in steps:
        log = s.get("log")
        rc = s.get("returncode")
        table.rows.append(
            Row(
                [
                    _cell(s["name"]),
                    _cell(s["status"], s["status"]),
                    _cell(f"{s.get('seconds', 0.0):.1f} s", "num"),
                    _cell("-" if rc is None else rc, "num"),
                    _cell(log, href=log) if log else _cell("-"),
                    _cell(s.get("note", "")),
                ]
            )
        )
    return table


def cluster_metrics(cluster: dict[str, Any], info: dict[str, Any]) -> Table:
    """The key numbers of a cluster result (one metric a row)."""
    lat = cluster.get("latency_ms") or {}
    p2p = cluster.get("p2p_latency_ms") or {}
    counts = (cluster.get("lost"), cluster.get("duplicated"), cluster.get("reordered"))
    rows = [
        ("nodes / replicas", f"{cluster.get('nodes')} / {cluster.get('replicas')}"),
        ("backend", cluster.get("backend")),
        ("acked", _fmt_num(cluster.get("acked"))),
        ("failures", _fmt_num(cluster.get("failures"))),
        ("lost / duplicated / reordered", " / ".join(str(c) for c in counts)),
        (
            "other violations",
            ", ".join(
                f"{k.replace('_', ' ')} {v:,}"
                for k, v in (cluster.get("violations") or {}).items()
                if k not in ("lost", "duplicated", "reordered")
            )
            or "none",
        ),
        ("throughput (msg/s)", _fmt_num(cluster.get("throughput_msgs_per_s"))),
        (
            "latency p50 / p99 / p99.9 (ms)",
            " / ".join(_fmt_num(lat.get(k), ".2f") for k in ("p50", "p99", "p99.9")),
        ),
        ("convergence (s)", _fmt_num(cluster.get("convergence_s"), ".2f")),
        (
            "p2p latency p50 / p99 (ms)",
            " / ".join(_fmt_num(p2p.get(k), ".2f") for k in ("p50", "p99")),
        ),
    ]
    prev = info.get("previous")
    if prev:
        rows.append(
            (
                "previous comparable run",
                f"{prev.get('id')} ({str(prev.get('commit'))[:8]}): "
                f"{_fmt_num(prev.get('throughput_msgs_per_s'))} msg/s",
            )
        )
    bad = any(counts)
    return Table(
        ["metric", "value"],
        [
            Row(
                [
                    _cell(k),
                    _cell(v, "num failed" if bad and k.startswith("lost") else "num"),
                ]
            )
            for k, v in rows
        ],
    )


def nodes_table(nodes: Sequence[dict[str, Any]]) -> Table:
    extra = sorted({k for n in nodes for k in ("boot_s",) if k in n})
    return Table(
        ["node", "host", "arch", "backend", "acked", *extra],
        [
            Row(
                [
                    _cell(n.get("node_id")),
                    _cell(n.get("host")),
                    _cell(n.get("arch")),
                    _cell(n.get("backend", "-")),
                    _cell(_fmt_num((n.get("counters") or {}).get("acked")), "num"),
                    *[_cell(_fmt_num(n.get(k), ".1f"), "num") for k in extra],
                ]
            )
            for n in nodes
        ],
    )


def faults_table(cluster: dict[str, Any]) -> Table:
    """Each fault, with how the nodes it did not touch were served meanwhile."""
    served = {
        (row.get("kind"), row.get("start_s")): row
        for row in cluster.get("fault_service") or []
        if isinstance(row, dict)
    }
    table = Table(
        [
            "kind",
            "target",
            "start (s)",
            "end (s)",
            "healthy side ok",
            "served again after (s)",
            "error",
        ]
    )
    for f in cluster.get("faults") or []:
        row = served.get((f.get("kind"), f.get("start_s")), {})
        share = row.get("healthy_ok_share")
        table.rows.append(
            Row(
                [
                    _cell(f.get("kind")),
                    _cell(f.get("target")),
                    _cell(_fmt_num(f.get("start_s"), ".1f"), "num"),
                    _cell(_fmt_num(f.get("end_s"), ".1f"), "num"),
                    _cell("-" if share is None else f"{share:.2%}", "num"),
                    _cell(_fmt_num(row.get("served_after_s"), ".1f"), "num"),
                    _cell(f.get("error") or ""),
                ]
            )
        )
    return table


def availability_table(availability: dict[str, Any]) -> Table:
    table = Table(["window", "ok", "failed", "ok share"])
    for window, v in availability.items():
        if isinstance(v, dict):
            ok, failed = v.get("ok", 0) or 0, v.get("failed", 0) or 0
            share = ok / (ok + failed) if ok + failed else float("nan")
            cells = [
                _cell(window),
                _cell(_fmt_num(ok), "num"),
                _cell(_fmt_num(failed), "num"),
                _cell(f"{share:.2%}", "num"),
            ]
        else:
            cells = [_cell(window), _cell(v), _cell(""), _cell("")]
        table.rows.append(Row(cells))
    return table


def cluster_context(
    info: dict[str, Any] | None,
    cluster: dict[str, Any] | None,
    plots_made: dict[str, str],
    notes: list[str],
) -> dict[str, Any] | None:
    """What the Cluster section shows (None: the step did not run)."""
    if info is None:
        return None
    ctx: dict[str, Any] = {
        "provider": info.get("provider", "?"),
        "command": info.get("command", ""),
        "fallback_reason": info.get("fallback_reason") or "",
        "faults_note": info.get("faults_note") or "",
        "result": None,
    }
    if cluster is None:
        return ctx
    availability = cluster.get("availability")
    ctx["result"] = {
        "metrics": cluster_metrics(cluster, info),
        "nodes": nodes_table(cluster["per_node"]) if cluster.get("per_node") else None,
        "faults": faults_table(cluster) if cluster.get("faults") else None,
        "availability": availability_table(availability)
        if isinstance(availability, dict) and availability
        else None,
        "images": [
            (plots_made[key], alt)
            for key, alt in (
                ("latency", "latency distribution"),
                ("timeline", "throughput"),
            )
            if key in plots_made
        ],
        "notes": notes,
    }
    return ctx


def bench_context(
    bench: dict[str, Any] | None, plots_made: dict[str, str]
) -> dict[str, Any] | None:
    """What the Benchmarks section shows (None: not run or not recorded)."""
    if bench is None:
        return None
    comp = bench.get("comparison") or {}
    changes = None
    shown = [
        c
        for c in comp.get("changes", [])
        if c["regression"] or c["improvement"] or c["noisy"]
    ]
    if shown:
        changes = Table(["benchmark", "before", "after", "after/before", "verdict"])
        for c in shown:
            kind = (
                "regression"
                if c["regression"]
                else "improvement"
                if c["improvement"]
                else "noisy"
            )
            label = history.label_of(
                (c["benchmark"], tuple(c["params"].items()), c["backend"])
            )
            changes.rows.append(
                Row(
                    [
                        _cell(label),
                        _cell(asvreport.fmt_seconds(c["before"]), "num"),
                        _cell(asvreport.fmt_seconds(c["after"]), "num"),
                        _cell(f"{c['ratio']:.2f}x", "num"),
                        _cell(
                            kind if kind != "noisy" else "beyond factor, within noise"
                        ),
                    ],
                    cls=kind,
                )
            )
    prev = comp.get("prev_commit")
    return {
        "head": str(comp.get("head_commit"))[:10],
        "prev": str(prev)[:10] if prev else "",
        "factor": comp.get("factor"),
        "factor_text": f"{float(comp.get('factor') or 1.1):g}",
        "compared": comp.get("compared", 0),
        "regressions": comp.get("regressions", 0),
        "improvements": comp.get("improvements", 0),
        "note": comp.get("note") or "",
        "changes": changes,
        "images": [
            (plots_made[key], alt)
            for key, alt in (("speedup", "speedups"), ("bench_history", "history"))
            if key in plots_made
        ],
    }


def render_run(
    summary: dict[str, Any],
    *,
    bench: dict[str, Any] | None,
    cluster: dict[str, Any] | None,
    plots: dict[str, str],
    notes: list[str],
) -> str:
    """The run's ``index.html`` (PNG paths relative to the run directory)."""
    return render(
        "run.html.j2",
        title=f"Nightly {summary.get('id', '')}: {summary.get('status', '?')}",
        run={
            "id": summary.get("id", ""),
            "ok": summary.get("status", "?") == "ok",
            "reasons": summary.get("reasons") or [],
            "commit": str(summary.get("commit", ""))[:12],
            "dirty": bool(summary.get("dirty")),
            "mode": "quick" if summary.get("quick") else "full",
            "duration": _fmt_num(summary.get("duration_s"), ".0f"),
            "factor": summary.get("factor"),
            "host": (summary.get("host") or {}).get("name", "?"),
        },
        steps=steps_table(summary.get("steps") or []),
        cluster=cluster_context(summary.get("cluster"), cluster, plots, notes),
        bench=bench_context(bench, plots),
        data={"cluster": cluster is not None, "bench": bench is not None},
    )


def build(run_dir: Path) -> dict[str, Any]:
    """Draw the plots and write ``index.html`` of *run_dir*; return what was made."""
    summary: dict[str, Any] = _read_json(run_dir / "nightly.json") or {}
    bench: dict[str, Any] | None = _read_json(run_dir / "benchmarks.json")
    cluster: dict[str, Any] | None = _read_json(run_dir / "cluster.json")
    made: dict[str, str] = {}
    notes: list[str] = []
    if cluster is not None:
        png, note = plots.plot_latency(cluster, run_dir / "latency.png")
        if png:
            made["latency"] = png.name
        notes.append(f"latency plot: {note}.")
        png, note = plots.plot_timeline(cluster, run_dir / "timeline.png")
        if png:
            made["timeline"] = png.name
        if note:
            notes.append(note + ".")
    if bench is not None:
        png = plots.plot_speedups(bench.get("speedups") or [], run_dir / "speedup.png")
        if png:
            made["speedup"] = png.name
        png = plots.plot_bench_history(
            bench.get("history") or [], run_dir / "bench_history.png"
        )
        if png:
            made["bench_history"] = png.name
    page = render_run(summary, bench=bench, cluster=cluster, plots=made, notes=notes)
    (run_dir / "index.html").write_text(page)
    return {"plots": made, "notes": notes, "html": "index.html"}


# -- the index of all runs -----------------------------------------------------------


def runs_table(runs: Sequence[dict[str, Any]]) -> Table:
    """Every run of ``history.json``, newest first, with its key numbers."""
    table = Table(
        [
            "run",
            "commit",
            "status",
            "mode",
            "msg/s",
            "p99 ms",
            "lost/dup/reord",
            "cluster",
            "bench regressions",
            "time (s)",
            "reasons",
        ]
    )
    for r in reversed(runs):
        c = r.get("cluster") or {}
        b = r.get("benchmarks") or {}
        status = str(r.get("status", "?"))
        lost = (
            f"{c.get('lost')}/{c.get('duplicated')}/{c.get('reordered')}" if c else "-"
        )
        table.rows.append(
            Row(
                [
                    _cell(r.get("id"), href=str(r.get("report") or "")),
                    _cell(
                        str(r.get("commit", ""))[:10] + ("+" if r.get("dirty") else "")
                    ),
                    _cell(status, status),
                    _cell("quick" if r.get("quick") else "full"),
                    _cell(_fmt_num(c.get("throughput_msgs_per_s")), "num"),
                    _cell(_fmt_num(c.get("p99_ms"), ".1f"), "num"),
                    _cell(lost, "num"),
                    _cell(
                        f"{c.get('provider', '-')}"
                        + (" (fallback)" if c.get("fallback") else "")
                    ),
                    _cell(_fmt_num(b.get("regressions"), "d"), "num"),
                    _cell(_fmt_num(r.get("duration_s"), ".0f"), "num"),
                    _cell("; ".join(r.get("reasons") or [])[:300]),
                ]
            )
        )
    return table


def build_index(reports: Path) -> Path:
    """``reports/index.html``: every run, newest first, with its key numbers."""
    runs = list(history.load_index(reports).get("runs", []))
    trend = plots.plot_trend(runs, reports / "trend.png")
    out = reports / "index.html"
    out.write_text(
        render(
            "index.html.j2",
            title="PlexiChat nightly runs",
            count=len(runs),
            trend=trend.name if trend is not None else "",
            runs=runs_table(runs),
        )
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild nightly reports.")
    parser.add_argument("run_dir", nargs="?", type=Path, help="one run directory")
    parser.add_argument("--index", type=Path, help="rebuild REPORTS/index.html")
    args = parser.parse_args(argv)
    if args.run_dir is None and args.index is None:
        parser.error("give a run directory and/or --index REPORTS")
    if args.run_dir is not None:
        made = build(args.run_dir)
        print(f"{args.run_dir / made['html']}: plots {', '.join(made['plots'])}")
    if args.index is not None:
        print(build_index(args.index))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
