"""The PNG plots of a nightly run and of the runs index (matplotlib, Agg).

* :func:`plot_latency`: latency distribution (percentile curve) per
  architecture when the cluster JSON splits it (``latency_by_arch`` or
  ``latency_ms`` per node), otherwise the whole cluster's, labelled with the
  nodes' arches;
* :func:`plot_timeline`: throughput over time with the fault windows shaded,
  when the JSON has ``timeline`` (``[{t_s, acked, failed}]``, counts per
  interval ending at ``t_s``) and/or ``faults`` (``[{kind, target, start_s,
  end_s}]``);
* :func:`plot_speedups`: each compiled kernel's (and peer's) speedup over the
  pure-Python reference;
* :func:`plot_bench_history`: each benchmark's time across past commits;
* :func:`plot_trend`: cluster throughput and p99 across nightly runs.

Each returns the PNG written, or ``None`` (with a note where the data falls
short) when there is nothing to draw.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from plexilab.results import asvreport


def _mpl(name: str) -> ModuleType:
    """A matplotlib module, imported on the first plot (Agg backend).

    Deferred so that loading the invoke tasks (which import the nightly and
    so this module) does not pay matplotlib's half second.
    """
    _agg()
    return importlib.import_module(f"matplotlib.{name}")


@functools.cache
def _agg() -> None:
    importlib.import_module("matplotlib").use("Agg")


def _subplots(*args: Any, **kw: Any) -> Any:
    return _mpl("pyplot").subplots(*args, **kw)


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
    ticker = _mpl("ticker")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: fmt(v)))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _mpl("pyplot").close(fig)
    return path


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
    fig, ax = _subplots(figsize=(8, 4.5))
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
    fig, ax = _subplots(figsize=(9, 4.2))
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
    fig, ax = _subplots(figsize=(10, 1.2 + 0.22 * len(bars) + 0.25 * len(names)))
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
    fig, axes = _subplots(
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
        _log_y(ax, asvreport.fmt_seconds)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    handles = [
        _mpl("lines").Line2D([], [], color=c, marker="o", label=b)
        for b, c in backends_seen.items()
    ]
    fig.legend(
        handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9
    )
    fig.suptitle(
        f"Benchmark time per commit (log scale; {len(runs)} commit(s), oldest left)"
    )
    return _save(fig, out)


# -- across runs ----------------------------------------------------------------------


def plot_trend(runs: Sequence[dict[str, Any]], out: Path) -> Path | None:
    """Cluster throughput and p99 latency across nightly runs."""
    points = [r for r in runs if (r.get("cluster") or {}).get("throughput_msgs_per_s")]
    if not points:
        return None
    points = points[-60:]
    fig, (ax1, ax2) = _subplots(2, 1, figsize=(9, 5), sharex=True)
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
