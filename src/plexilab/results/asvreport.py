"""Read asv result files and show compiled-vs-interpreted speedups.

asv stores one JSON file per (machine, commit, environment) under
``.asv/results/<machine>/``.  Benchmarks here take a ``backend`` parameter, so
the speedup of a backend is the reference time divided by its time, for the
same benchmark and the same values of every other parameter.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(".asv/results")


@dataclass(frozen=True)
class Timing:
    """One benchmark result: name, non-backend parameters, backend, seconds."""

    benchmark: str
    params: tuple[tuple[str, str], ...]
    backend: str
    seconds: float


def result_files(machine: str, results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Result files of *machine*, oldest first (by the date asv recorded)."""
    folder = results_dir / machine
    files = [p for p in folder.glob("*.json") if p.name != "machine.json"]
    return sorted(files, key=lambda p: json.loads(p.read_text()).get("date", 0))


def _unquote(value: str) -> str:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    return str(parsed)


def load_timings(path: Path, param_names: dict[str, list[str]]) -> list[Timing]:
    """Flatten one asv result file into :class:`Timing` rows (skipped ones dropped)."""
    data = json.loads(path.read_text())
    columns: list[str] = data["result_columns"]
    timings: list[Timing] = []
    for name, row in data["results"].items():
        entry = dict(zip(columns, row, strict=False))
        values = entry.get("result")
        if values is None or (param_names and name not in param_names):
            continue  # failed, or not a timing (track_/peakmem_ values)
        params: list[list[str]] = entry.get("params") or []
        names = param_names.get(name) or [f"param{i}" for i in range(len(params))]
        combos = list(itertools.product(*params)) if params else [()]
        for combo, value in zip(combos, values, strict=False):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            labelled = [(n, _unquote(v)) for n, v in zip(names, combo, strict=False)]
            backend = next((v for n, v in labelled if n == "backend"), "-")
            rest = tuple((n, v) for n, v in labelled if n != "backend")
            timings.append(Timing(name, rest, backend, float(value)))
    return timings


def param_names_of(benchmarks_json: Path) -> dict[str, list[str]]:
    """Map each *timing* benchmark -> its parameter names (``benchmarks.json``)."""
    if not benchmarks_json.exists():
        return {}
    data: dict[str, Any] = json.loads(benchmarks_json.read_text())
    return {
        name: list(info.get("param_names", []))
        for name, info in data.items()
        if isinstance(info, dict) and info.get("type") == "time"
    }


def speedups(timings: Sequence[Timing]) -> list[dict[str, Any]]:
    """Group by benchmark and parameters; compute each backend's speedup."""
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, float]] = {}
    for t in timings:
        groups.setdefault((t.benchmark, t.params), {})[t.backend] = t.seconds
    rows = []
    for (bench, params), by_backend in sorted(groups.items()):
        reference = by_backend.get("python")
        rows.append(
            {
                "benchmark": bench,
                "params": dict(params),
                "seconds": by_backend,
                "speedup": {
                    b: reference / s for b, s in by_backend.items() if reference and s
                },
            }
        )
    return rows


def render(rows: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    """Print the speedup table: one column per backend/peer, time and speedup."""
    order = ["python", "cython", "numba"]
    seen = {b for r in rows for b in r["seconds"]}
    backends = [b for b in order if b in seen] + sorted(seen - set(order))
    table = Table(title="asv: compiled vs interpreted (time, speedup over python)")
    table.add_column("benchmark")
    for backend in backends:
        table.add_column(backend, justify="right")
    for row in rows:
        name = row["benchmark"].removeprefix("bench_").split(".", 1)[-1]
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        cells = [f"{name} ({params})" if params else name]
        for backend in backends:
            seconds = row["seconds"].get(backend)
            speedup = row["speedup"].get(backend)
            cell = fmt_seconds(seconds)
            if speedup is not None and backend != "python":
                cell += f" [bold]{speedup:.1f}x[/bold]"
            cells.append(cell)
        table.add_row(*cells)
    (console or Console(width=160)).print(table)


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--machine", default="lab", help="asv machine name")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    files = result_files(args.machine, args.results)
    if not files:
        parser.error(f"no asv results for machine {args.machine!r} in {args.results}")
    names = param_names_of(args.results / "benchmarks.json")
    rows = speedups(load_timings(files[-1], names))
    render(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
