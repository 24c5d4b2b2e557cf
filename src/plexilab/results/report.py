"""HTML + PNG report of one nightly run directory, and the index of all runs.

A run directory (``reports/<YYYY-mm-dd-HHMMSS>/``) holds ``nightly.json``
(steps, verdict), optionally ``benchmarks.json`` (asv speedups of HEAD, the
comparison with the previous commit, the per-commit history) and
``cluster.json`` (a ``local.cluster``/``qemu.cluster`` result).  :func:`build`
draws what the data supports and writes ``index.html`` next to the PNGs:

* ``latency.png``: latency distribution (percentile curve) per architecture
  when the cluster JSON splits it (``latency_by_arch`` or ``latency_ms`` per
  node), otherwise the whole cluster's, labelled with the nodes' arches;
* ``timeline.png``: throughput over time with the fault windows shaded, when
  the JSON has ``timeline`` (``[{t_s, acked, failed}]``, counts per interval
  ending at ``t_s``) and/or ``faults`` (``[{kind, target, start_s, end_s}]``);
* ``speedup.png``: each compiled kernel's (and peer's) speedup over the
  pure-Python reference;
* ``bench_history.png``: each benchmark's time across past commits.

``python -m plexilab.results.report RUN_DIR`` rebuilds one run's report;
``--index REPORTS`` rebuilds ``REPORTS/index.html`` from ``history.json``.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from plexilab.results import asvreport, history

BACKEND_COLORS = {
    "python": "#7f7f7f",
    "cython": "#1f77b4",
    "numba": "#ff7f0e",
    "lru-dict": "#2ca02c",
    "ordereddict": "#9467bd",
    "msgpack": "#8c564b",
}
ARCH_COLORS = {"x86_64": "#1f77b4", "aarch64": "#d62728"}
EXTRA_COLORS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
DPI = 110


def _log_y(ax: Any, fmt: Any) -> None:
    """Log y axis labelled at 1-2-5 steps with *fmt* (no minor labels)."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 3.0
    subs: tuple[float, ...] = (1.0, 2.0, 5.0)
    if decades < 1.2:
        subs = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    elif decades < 2.5:
        subs = (1.0, 2.0, 3.0, 5.0)
    elif decades > 4.5:
        subs = (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


# -- latency --------------------------------------------------------------------


def _percentile(label: str) -> float | None:
    """``p99.9`` / ``99.9%`` / ``99.9`` -> 99.9 (None if not a percentile)."""
    text = label.strip().removeprefix("p").removesuffix("%")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value <= 100 else None


def _nines(q: float) -> float:
    """Position of percentile *q* on a 'number of nines' axis (max -> 5)."""
    return 5.0 if q >= 100 else -math.log10(1 - q / 100)


def latency_series(cluster: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Latency percentile curves to plot, and how they were split.

    Returns ``[{label, arch, points: [(percentile, ms)]}]`` and a note.
    """

    def points(d: dict[str, Any]) -> list[tuple[float, float]]:
        out = []
        for k, v in d.items():
            q = _percentile(str(k))
            if q is not None and isinstance(v, int | float):
                out.append((q, float(v)))
        return sorted(out)

    by_arch = cluster.get("latency_by_arch")
    if isinstance(by_arch, dict) and by_arch:
        series = [
            {"label": arch, "arch": arch, "points": points(d)}
            for arch, d in sorted(by_arch.items())
        ]
        return series, "per architecture"
    nodes = [n for n in cluster.get("per_node") or [] if n.get("latency_ms")]
    if nodes:
        series = [
            {
                "label": f"{n.get('node_id', n.get('index'))} ({n.get('arch', '?')})",
                "arch": str(n.get("arch", "?")),
                "points": points(n["latency_ms"]),
            }
            for n in nodes
        ]
        return series, "per node"
    archs = sorted(
        {str(n.get("arch")) for n in cluster.get("per_node") or [] if n.get("arch")}
    )
    full: dict[str, Any] = {}
    locust = (cluster.get("load") or {}).get("locust") or []
    if locust and isinstance(locust[0].get("percentiles_ms"), dict):
        full = locust[0]["percentiles_ms"]
    data = full or cluster.get("latency_ms") or {}
    label = f"all nodes ({', '.join(archs) or 'arch unknown'})"
    arch = archs[0] if len(archs) == 1 else "mixed"
    note = (
        "whole cluster, measured at the load generator: the result JSON has no "
        "per-arch or per-node latency split"
    )
    return [{"label": label, "arch": arch, "points": points(data)}], note


def plot_latency(cluster: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    """Latency percentile curve(s); returns (png or None, how it was split)."""
    series, note = latency_series(cluster)
    series = [s for s in series if s["points"]]
    if not series:
        return None, "the cluster JSON has no latency percentiles"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    extra = iter(EXTRA_COLORS * 4)
    arch_count: dict[str, int] = {}
    for s in series:
        arch_count[s["arch"]] = arch_count.get(s["arch"], 0) + 1
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    ticks: dict[float, str] = {}
    for s in series:
        color = ARCH_COLORS.get(s["arch"]) or next(extra)
        n = seen.get(s["arch"], 0)
        seen[s["arch"]] = n + 1
        xs = [_nines(q) for q, _ in s["points"]]
        ys = [ms for _, ms in s["points"]]
        ax.plot(
            xs, ys, styles[n % 4], marker="o", color=color, label=s["label"], lw=1.8
        )
        for q, ms in s["points"]:
            name = "max" if q >= 100 else f"p{q:g}"
            ticks[_nines(q)] = name
            if len(series) <= 2 and name in ("p50", "p99", "p99.9", "max"):
                ax.annotate(
                    f"{ms:.3g}",
                    (_nines(q), ms),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=8,
                    color=color,
                )
    shown = {x: t for x, t in ticks.items() if t in _TICKS_SHOWN}
    ax.set_xticks(list(shown), list(shown.values()))
    _log_y(ax, lambda v: f"{v:g}")
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(f"Message latency distribution ({note.split(':')[0]})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    return _save(fig, out), note


_TICKS_SHOWN = {"p50", "p75", "p90", "p95", "p99", "p99.9", "p99.99", "max"}


# -- throughput over time and fault windows ---------------------------------------


def timeline_rates(
    timeline: Sequence[dict[str, Any]],
) -> list[tuple[float, float, float]]:
    """``(t_s, acked/s, failed/s)`` from per-interval counts ending at ``t_s``."""
    rows = sorted(timeline, key=lambda r: float(r["t_s"]))
    out = []
    prev_t = 0.0
    for i, row in enumerate(rows):
        t = float(row["t_s"])
        dt = t - prev_t
        if dt <= 0 and i + 1 < len(rows):
            dt = float(rows[i + 1]["t_s"]) - t
        dt = dt if dt > 0 else 1.0
        out.append(
            (
                t,
                float(row.get("acked", 0) or 0) / dt,
                float(row.get("failed", 0) or 0) / dt,
            )
        )
        prev_t = t
    return out


def plot_timeline(cluster: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    """Throughput over time with fault windows shaded (or just the windows)."""
    timeline = cluster.get("timeline") or []
    faults = cluster.get("faults") or []
    if not timeline and not faults:
        return None, (
            "the cluster JSON has no throughput time series ('timeline') and no "
            "fault windows ('faults'): nothing to draw over time"
        )
    fig, ax = plt.subplots(figsize=(9, 4.2))
    note = ""
    if timeline:
        rates = timeline_rates(timeline)
        ts = [r[0] for r in rates]
        ax.step(
            ts, [r[1] for r in rates], where="post", color="#2ca02c", label="acked/s"
        )
        if any(r[2] for r in rates):
            ax.step(
                ts, [r[2] for r in rates], where="post", color="#d62728",
                label="failed/s",
            )  # fmt: skip
        ax.set_ylabel("messages per second")
        ax.set_ylim(bottom=0)
    else:
        note = "no throughput time series in the cluster JSON: fault windows only"
        ax.set_yticks([])
    top = ax.get_ylim()[1] if timeline else 1.0
    for i, fault in enumerate(faults):
        start = float(fault.get("start_s", 0.0))
        end = fault.get("end_s")
        stop = float(end) if end is not None else start + 0.5
        label = f"{fault.get('kind', '?')} {fault.get('target', '')}".strip()
        ax.axvspan(start, stop, color="#ff7f0e", alpha=0.18, lw=0)
        ax.text(
            start,
            top * (0.97 - 0.07 * (i % 4)),
            f" {label}",
            fontsize=8,
            va="top",
            color="#a0522d",
        )
    if faults:
        ax.plot([], [], color="#ff7f0e", alpha=0.4, lw=8, label="fault window")
    ax.set_xlabel("time since load start (s)")
    ax.set_title("Cluster throughput over time" + (" and faults" if faults else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, out), note


# -- benchmarks -------------------------------------------------------------------


def _short(benchmark: str) -> str:
    return benchmark.removeprefix("bench_")


def plot_speedups(rows: Sequence[dict[str, Any]], out: Path) -> Path | None:
    """Horizontal bars: speedup of each non-reference backend over ``python``."""
    bars: list[tuple[str, str, float]] = []
    for row in rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        name = _short(row["benchmark"]) + (f" ({params})" if params else "")
        for backend, value in sorted(row.get("speedup", {}).items()):
            if backend != "python":
                bars.append((name, backend, float(value)))
    if not bars:
        return None
    names = list(dict.fromkeys(b[0] for b in bars))
    backends = list(dict.fromkeys(b[1] for b in sorted(bars, key=lambda b: b[1])))
    order = [b for b in ("cython", "numba") if b in backends]
    backends = order + [b for b in backends if b not in order]
    height = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.22 * len(bars) + 0.25 * len(names)))
    lookup = {(n, b): v for n, b, v in bars}
    for j, backend in enumerate(backends):
        ys, xs = [], []
        for i, name in enumerate(names):
            if (name, backend) in lookup:
                ys.append(i + (j - (len(backends) - 1) / 2) * height)
                xs.append(lookup[(name, backend)])
        ax.barh(
            ys,
            xs,
            height=height * 0.95,
            color=BACKEND_COLORS.get(backend, EXTRA_COLORS[j % len(EXTRA_COLORS)]),
            label=backend,
        )
        for y, x in zip(ys, xs, strict=True):
            ax.text(x * 1.04, y, f"{x:.3g}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the pure-Python reference (x, log scale; 1 = same)")
    ax.set_title("Compiled kernels vs reference (asv, HEAD)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, 0.5), hi * 1.6)
    return _save(fig, out)


def plot_bench_history(
    runs: Sequence[dict[str, Any]], out: Path, *, last: int = 30
) -> Path | None:
    """One small panel per benchmark: time per commit, one line per backend."""
    runs = list(runs)[-last:]
    if not runs:
        return None
    panels: dict[str, dict[str, dict[int, float]]] = {}
    for i, run in enumerate(runs):
        for p in run["points"]:
            params = ", ".join(f"{k}={v}" for k, v in p["params"].items())
            name = _short(p["benchmark"]) + (f"\n({params})" if params else "")
            panels.setdefault(name, {}).setdefault(p["backend"], {})[i] = p["seconds"]
    if not panels:
        return None
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(4 * cols, 2.4 * rows + 0.8),
        squeeze=False,
        layout="constrained",
    )
    labels = [str(r["commit"])[:7] for r in runs]
    backends_seen: dict[str, str] = {}
    for ax, (name, lines) in zip(axes.flat, sorted(panels.items()), strict=False):
        for j, (backend, values) in enumerate(sorted(lines.items())):
            color = BACKEND_COLORS.get(backend, EXTRA_COLORS[j % len(EXTRA_COLORS)])
            backends_seen[backend] = color
            xs = sorted(values)
            ax.plot(xs, [values[x] for x in xs], marker="o", ms=4, lw=1.2, color=color)
        ax.set_yscale("log")
        ax.margins(y=0.12)
        _log_y(ax, asvreport._fmt_seconds)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], color=c, marker="o", label=b) for b, c in backends_seen.items()
    ]
    fig.legend(
        handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9
    )
    fig.suptitle(
        f"Benchmark time per commit (log scale; {len(runs)} commit(s), oldest left)"
    )
    return _save(fig, out)


# -- HTML -----------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.25em .7em;
border:1px solid #ddd;text-align:left;font-size:.92em} th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:600} .failed,.timeout{color:#c62828;font-weight:600}
.skipped{color:#777} .warn{background:#fff4d6;border-left:4px solid #f0a500;
padding:.5em .8em;margin:.6em 0} .bad{background:#fde8e8;border-left:4px solid
#c62828;padding:.5em .8em;margin:.6em 0} .good{background:#e7f6ea;border-left:4px
solid #1a7f37;padding:.5em .8em;margin:.6em 0} img{max-width:100%;border:1px solid
#eee;margin:.5em 0} code{background:#f4f4f4;padding:0 .25em} .note{color:#555}
tr.regression td{background:#fde8e8} tr.improvement td{background:#e7f6ea}
tr.noisy td{background:#fff8e6}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _td(value: object, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(value)}</td>' if cls else f"<td>{_e(value)}</td>"


def _fmt_num(value: Any, fmt: str = ",.0f") -> str:
    if isinstance(value, int | float):
        return format(value, fmt)
    return "-" if value is None else str(value)


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def _steps_html(steps: Sequence[dict[str, Any]]) -> str:
    rows = []
    for s in steps:
        log = s.get("log")
        link = f'<td><a href="{_e(log)}">{_e(log)}</a></td>' if log else _td("-")
        rc = s.get("returncode")
        rows.append(
            [
                _td(s["name"]),
                _td(s["status"], s["status"]),
                _td(f"{s.get('seconds', 0.0):.1f} s", "num"),
                _td("-" if rc is None else rc, "num"),
                link,
                _td(s.get("note", "")),
            ]
        )
    return _table(["step", "status", "time", "exit", "log", "note"], rows)


def _cluster_html(
    info: dict[str, Any] | None,
    cluster: dict[str, Any] | None,
    plots: dict[str, str],
    notes: list[str],
) -> str:
    if info is None:
        return "<p class='note'>cluster step not run.</p>"
    parts = []
    provider = info.get("provider", "?")
    parts.append(
        f"<p>provider: <b>{_e(provider)}</b> ({_e(info.get('command', ''))})</p>"
    )
    if info.get("fallback_reason"):
        parts.append(
            f"<div class='warn'><b>Fallback:</b> {_e(info['fallback_reason'])}</div>"
        )
    if info.get("faults_note"):
        parts.append(
            f"<div class='warn'><b>Faults:</b> {_e(info['faults_note'])}</div>"
        )
    if cluster is None:
        parts.append("<div class='bad'>no cluster result JSON was written.</div>")
        return "".join(parts)
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
    parts.append(
        _table(
            ["metric", "value"],
            [
                [
                    _td(k),
                    _td(v, "num failed" if bad and k.startswith("lost") else "num"),
                ]
                for k, v in rows
            ],
        )
    )
    nodes = cluster.get("per_node") or []
    if nodes:
        extra = sorted({k for n in nodes for k in ("boot_s",) if k in n})
        header = ["node", "host", "arch", "backend", "acked", *extra]
        parts.append(
            _table(
                header,
                [
                    [
                        _td(n.get("node_id")),
                        _td(n.get("host")),
                        _td(n.get("arch")),
                        _td(n.get("backend", "-")),
                        _td(_fmt_num((n.get("counters") or {}).get("acked")), "num"),
                        *[_td(_fmt_num(n.get(k), ".1f"), "num") for k in extra],
                    ]
                    for n in nodes
                ],
            )
        )
    faults = cluster.get("faults") or []
    if faults:
        parts.append("<h3>Fault timeline</h3>")
        # per fault: how the nodes it did not touch were served meanwhile
        service = cluster.get("fault_service") or []
        served = {
            (row.get("kind"), row.get("start_s")): row
            for row in service
            if isinstance(row, dict)
        }
        rows1 = []
        for f in faults:
            row = served.get((f.get("kind"), f.get("start_s")), {})
            share = row.get("healthy_ok_share")
            rows1.append(
                [
                    _td(f.get("kind")),
                    _td(f.get("target")),
                    _td(_fmt_num(f.get("start_s"), ".1f"), "num"),
                    _td(_fmt_num(f.get("end_s"), ".1f"), "num"),
                    _td("-" if share is None else f"{share:.2%}", "num"),
                    _td(_fmt_num(row.get("served_after_s"), ".1f"), "num"),
                    _td(f.get("error") or ""),
                ]
            )
        parts.append(
            _table(
                [
                    "kind",
                    "target",
                    "start (s)",
                    "end (s)",
                    "healthy side ok",
                    "served again after (s)",
                    "error",
                ],
                rows1,
            )
        )
    availability = cluster.get("availability")
    if isinstance(availability, dict) and availability:
        parts.append("<h3>Availability</h3>")
        rows2 = []
        for window, v in availability.items():
            if isinstance(v, dict):
                ok, failed = v.get("ok", 0) or 0, v.get("failed", 0) or 0
                share = ok / (ok + failed) if ok + failed else float("nan")
                rows2.append(
                    [
                        _td(window),
                        _td(_fmt_num(ok), "num"),
                        _td(_fmt_num(failed), "num"),
                        _td(f"{share:.2%}", "num"),
                    ]
                )
            else:
                rows2.append([_td(window), _td(v), _td(""), _td("")])
        parts.append(_table(["window", "ok", "failed", "ok share"], rows2))
    for key, alt in (("latency", "latency distribution"), ("timeline", "throughput")):
        if key in plots:
            parts.append(f'<img src="{_e(plots[key])}" alt="{alt}">')
    parts.extend(f"<p class='note'>{_e(n)}</p>" for n in notes)
    return "".join(parts)


def _bench_html(bench: dict[str, Any] | None, plots: dict[str, str]) -> str:
    if bench is None:
        return "<p class='note'>benchmarks not run or not recorded.</p>"
    parts = []
    comp = bench.get("comparison") or {}
    prev = comp.get("prev_commit")
    head = comp.get("head_commit")
    if prev:
        parts.append(
            f"<p>HEAD <code>{_e(str(head)[:10])}</code> vs previous commit "
            f"<code>{_e(str(prev)[:10])}</code>, factor {_e(comp.get('factor'))}: "
            f"{comp.get('compared', 0)} compared, "
            f"<b>{comp.get('regressions', 0)} regression(s)</b>, "
            f"{comp.get('improvements', 0)} improvement(s).</p>"
        )
    if comp.get("note"):
        parts.append(f"<p class='note'>{_e(comp['note'])}</p>")
    factor = float(comp.get("factor") or 1.1)
    shown = [
        c
        for c in comp.get("changes", [])
        if c["regression"] or c["improvement"] or c["noisy"]
    ]
    if shown:
        rows = []
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
            rows.append(
                "<tr class='" + kind + "'>"
                + _td(label)
                + _td(asvreport._fmt_seconds(c["before"]), "num")
                + _td(asvreport._fmt_seconds(c["after"]), "num")
                + _td(f"{c['ratio']:.2f}x", "num")
                + _td(kind if kind != "noisy" else "beyond factor, within noise")
                + "</tr>"
            )  # fmt: skip
        parts.append(
            "<table><tr><th>benchmark</th><th>before</th><th>after</th>"
            "<th>after/before</th><th>verdict</th></tr>" + "".join(rows) + "</table>"
        )
    elif prev:
        parts.append(
            f"<p class='good'>no benchmark changed by more than {factor:g}x.</p>"
        )
    for key, alt in (("speedup", "speedups"), ("bench_history", "history")):
        if key in plots:
            parts.append(f'<img src="{_e(plots[key])}" alt="{alt}">')
    return "".join(parts)


def render_run(
    summary: dict[str, Any],
    *,
    bench: dict[str, Any] | None,
    cluster: dict[str, Any] | None,
    plots: dict[str, str],
    notes: list[str],
) -> str:
    """The run's ``index.html`` (PNG paths relative to the run directory)."""
    status = summary.get("status", "?")
    reasons = summary.get("reasons") or []
    commit = str(summary.get("commit", ""))
    dirty = " (dirty tree)" if summary.get("dirty") else ""
    banner = (
        "<div class='bad'><b>FAILED</b><ul>"
        + "".join(f"<li>{_e(r)}</li>" for r in reasons)
        + "</ul></div>"
        if status != "ok"
        else "<div class='good'><b>OK</b>: every step passed, no regression.</div>"
    )
    body = [
        f"<p><a href='../index.html'>&larr; all runs</a></p>"
        f"<h1>Nightly {_e(summary.get('id', ''))}</h1>",
        f"<p>commit <code>{_e(commit[:12])}</code>{_e(dirty)} &middot; "
        f"{'quick' if summary.get('quick') else 'full'} run &middot; "
        f"{_fmt_num(summary.get('duration_s'), '.0f')} s &middot; "
        f"factor {_e(summary.get('factor'))} &middot; "
        f"host {_e((summary.get('host') or {}).get('name', '?'))}</p>",
        banner,
        "<h2>Steps</h2>",
        _steps_html(summary.get("steps") or []),
        "<h2>Cluster</h2>",
        _cluster_html(summary.get("cluster"), cluster, plots, notes),
        "<h2>Benchmarks</h2>",
        _bench_html(bench, plots),
        "<p class='note'>data: <a href='nightly.json'>nightly.json</a>"
        + (" &middot; <a href='cluster.json'>cluster.json</a>" if cluster else "")
        + (" &middot; <a href='benchmarks.json'>benchmarks.json</a>" if bench else "")
        + "</p>",
    ]
    return _page(f"Nightly {summary.get('id', '')}: {status}", "".join(body))


def build(run_dir: Path) -> dict[str, Any]:
    """Draw the plots and write ``index.html`` of *run_dir*; return what was made."""
    summary: dict[str, Any] = _read_json(run_dir / "nightly.json") or {}
    bench: dict[str, Any] | None = _read_json(run_dir / "benchmarks.json")
    cluster: dict[str, Any] | None = _read_json(run_dir / "cluster.json")
    plots: dict[str, str] = {}
    notes: list[str] = []
    if cluster is not None:
        png, note = plot_latency(cluster, run_dir / "latency.png")
        if png:
            plots["latency"] = png.name
        notes.append(f"latency plot: {note}.")
        png, note = plot_timeline(cluster, run_dir / "timeline.png")
        if png:
            plots["timeline"] = png.name
        if note:
            notes.append(note + ".")
    if bench is not None:
        png = plot_speedups(bench.get("speedups") or [], run_dir / "speedup.png")
        if png:
            plots["speedup"] = png.name
        png = plot_bench_history(
            bench.get("history") or [], run_dir / "bench_history.png"
        )
        if png:
            plots["bench_history"] = png.name
    page = render_run(summary, bench=bench, cluster=cluster, plots=plots, notes=notes)
    (run_dir / "index.html").write_text(page)
    return {"plots": plots, "notes": notes, "html": "index.html"}


# -- the index of all runs -----------------------------------------------------------


def plot_trend(runs: Sequence[dict[str, Any]], out: Path) -> Path | None:
    """Cluster throughput and p99 latency across nightly runs."""
    points = [r for r in runs if (r.get("cluster") or {}).get("throughput_msgs_per_s")]
    if not points:
        return None
    points = points[-60:]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    xs = list(range(len(points)))
    for provider in sorted({str(r["cluster"].get("provider")) for r in points}):
        sel = [
            i for i, r in enumerate(points) if r["cluster"].get("provider") == provider
        ]
        ax1.plot(
            sel,
            [points[i]["cluster"]["throughput_msgs_per_s"] for i in sel],
            marker="o",
            label=provider,
        )
        ax2.plot(
            sel,
            [points[i]["cluster"].get("p99_ms") or float("nan") for i in sel],
            marker="o",
            label=provider,
        )
    for i, r in enumerate(points):
        if r.get("status") != "ok":
            ax1.axvspan(i - 0.4, i + 0.4, color="#c62828", alpha=0.12, lw=0)
    ax1.set_ylabel("throughput (msg/s)")
    ax1.set_ylim(bottom=0)
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_ylim(bottom=0)
    ax2.set_xticks(
        xs, [_short_id(str(r["id"])) for r in points], rotation=60, fontsize=7
    )
    ax2.set_xlim(-0.5, len(points) - 0.5)
    ax1.legend(fontsize=8)
    ax1.set_title("Cluster results across nightly runs (red: failed run)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    return _save(fig, out)


def _short_id(run_id: str) -> str:
    """``2026-01-02-030000`` -> ``01-02 03:00``."""
    if len(run_id) >= 15 and run_id[4] == "-":
        return f"{run_id[5:10]} {run_id[11:13]}:{run_id[13:15]}"
    return run_id


def build_index(reports: Path) -> Path:
    """``reports/index.html``: every run, newest first, with its key numbers."""
    index = history.load_index(reports)
    runs = list(index.get("runs", []))
    trend = plot_trend(runs, reports / "trend.png")
    rows = []
    for r in reversed(runs):
        c = r.get("cluster") or {}
        b = r.get("benchmarks") or {}
        status = str(r.get("status", "?"))
        lost = (
            f"{c.get('lost')}/{c.get('duplicated')}/{c.get('reordered')}" if c else "-"
        )
        report = r.get("report")
        link = (
            f'<a href="{_e(report)}">{_e(r.get("id"))}</a>' if report else _e(r["id"])
        )
        rows.append(
            [
                f"<td>{link}</td>",
                _td(str(r.get("commit", ""))[:10] + ("+" if r.get("dirty") else "")),
                _td(status, status),
                _td("quick" if r.get("quick") else "full"),
                _td(_fmt_num(c.get("throughput_msgs_per_s")), "num"),
                _td(_fmt_num(c.get("p99_ms"), ".1f"), "num"),
                _td(lost, "num"),
                _td(
                    f"{c.get('provider', '-')}"
                    + (" (fallback)" if c.get("fallback") else "")
                ),
                _td(_fmt_num(b.get("regressions"), "d"), "num"),
                _td(_fmt_num(r.get("duration_s"), ".0f"), "num"),
                _td("; ".join(r.get("reasons") or [])[:300]),
            ]
        )
    header = [
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
    body = "<h1>PlexiChat nightly runs</h1>"
    body += f"<p>{len(runs)} run(s); data: <a href='history.json'>history.json</a></p>"
    if trend is not None:
        body += f'<img src="{trend.name}" alt="trend">'
    body += _table(header, rows)
    out = reports / "index.html"
    out.write_text(_page("PlexiChat nightly runs", body))
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
