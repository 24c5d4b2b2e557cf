"""asv result parsing and the speedup table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from plexilab.results import asvreport

COLUMNS = ["result", "params", "version", "started_at", "duration"]


def write_results(folder: Path, date: int, cython_seconds: float) -> Path:
    machine = folder / "lab"
    machine.mkdir(parents=True, exist_ok=True)
    (machine / "machine.json").write_text("{}")
    results = {
        "bench_wire.Encode.time_encode": [
            [0.010, cython_seconds, None],
            [["'python'", "'cython'", "'numba'"]],
            "v1",
            0,
            1.0,
        ],
        "bench_stats.Sizes.track_bytes": [[123.0], [["'python'"]], "v1", 0, 1.0],
        "bench_routing.Batch.time_batch": [
            [2.0, 4.0, 0.01, 0.02],  # itertools.product order
            [["'python'", "'cython'"], ["1", "3"]],
            "v1",
            0,
            1.0,
        ],
    }
    path = machine / f"{date:08x}-env.json"
    path.write_text(
        json.dumps({"date": date, "result_columns": COLUMNS, "results": results})
    )
    benchmarks = {
        "bench_wire.Encode.time_encode": {"type": "time", "param_names": ["backend"]},
        "bench_stats.Sizes.track_bytes": {"type": "track", "param_names": ["backend"]},
        "bench_routing.Batch.time_batch": {
            "type": "time",
            "param_names": ["backend", "replicas"],
        },
        "version": 2,
    }
    (folder / "benchmarks.json").write_text(json.dumps(benchmarks))
    return path


def test_speedups_group_by_benchmark_and_other_params(tmp_path: Path) -> None:
    write_results(tmp_path, 1, 0.001)
    newest = write_results(tmp_path, 2, 0.002)
    files = asvreport.result_files("lab", tmp_path)
    assert files[-1] == newest
    names = asvreport.param_names_of(tmp_path / "benchmarks.json")
    assert "bench_stats.Sizes.track_bytes" not in names
    rows = asvreport.speedups(asvreport.load_timings(files[-1], names))
    by_key = {(r["benchmark"], tuple(r["params"].items())): r for r in rows}
    encode = by_key[("bench_wire.Encode.time_encode", ())]
    assert encode["speedup"]["cython"] == pytest.approx(5.0)
    assert "numba" not in encode["seconds"]  # skipped (None) results are dropped
    batch3 = by_key[("bench_routing.Batch.time_batch", (("replicas", "3"),))]
    assert batch3["speedup"]["cython"] == pytest.approx(4.0 / 0.02)
    assert len(rows) == 3


def test_render_and_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_results(tmp_path, 1, 0.001)
    console = Console(width=200, record=True)
    names = asvreport.param_names_of(tmp_path / "benchmarks.json")
    files = asvreport.result_files("lab", tmp_path)
    asvreport.render(
        asvreport.speedups(asvreport.load_timings(files[0], names)), console
    )
    text = console.export_text()
    assert "Encode.time_encode" in text
    assert "10.0x" in text
    out = tmp_path / "rows.json"
    assert asvreport.main(["--results", str(tmp_path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["benchmark"]


def test_main_without_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        asvreport.main(["--results", str(tmp_path)])
