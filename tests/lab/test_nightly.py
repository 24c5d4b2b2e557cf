"""plexilab.nightly: the verdict, the history, the cluster fallback, cron."""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
from invoke.context import Context
from invoke.exceptions import Exit
from rich.console import Console

from plexilab import nightly
from plexilab.cli import nightly as nightly_cli

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["result", "params", "version", "started_at", "duration"]
COLUMNS += ["stats_ci_99_a", "stats_ci_99_b", "stats_repeat"]
ALL_BUT_COMPARE = "compile,tests,benchmark,wheels,cluster"


def head_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def write_asv(results: Path, commit: str, date: int, scale: float) -> None:
    """One asv result file: two benchmarks x (python, cython), times x *scale*."""
    folder = results / "lab"
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, base in (("bench_wire.Encode.time_a", 1e-3), ("bench_stats.Q.time_b", 2)):
        values = [base * scale, base * scale / 20]
        rows[name] = [
            values,
            [["'python'", "'cython'"]],
            "v",
            date,
            1.0,
            [v * 0.98 for v in values],
            [v * 1.02 for v in values],
            [10, 10],
        ]
    doc = {
        "commit_hash": commit,
        "env_name": "existing-py",
        "date": date,
        "result_columns": COLUMNS,
        "results": rows,
        "version": 2,
    }
    (folder / f"{commit[:8]}-existing-py.json").write_text(json.dumps(doc))
    bench = {n: {"type": "time", "param_names": ["backend"]} for n in rows}
    (results / "benchmarks.json").write_text(json.dumps(bench))


def run_invoke(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m invoke ...`` from the repo, stdout and stderr in one stream."""
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )


def test_planted_benchmark_regression_fails_the_nightly_reason_last(tmp_path):
    asv, reports = tmp_path / "asv", tmp_path / "reports"
    head = head_commit()
    write_asv(asv, head, date=2000, scale=1.0)
    write_asv(asv, "0" * 40, date=1000, scale=1.0)
    args = ["nightly", "--skip", ALL_BUT_COMPARE, "--reports", str(reports)]
    args += ["--asv-results", str(asv)]
    clean = run_invoke(*args)
    assert clean.returncode == 0, clean.stdout
    assert "nightly OK" in clean.stdout

    write_asv(asv, "0" * 40, date=1000, scale=0.5)  # the previous commit: 2x faster
    proc = run_invoke(*args)
    assert proc.returncode == 1, proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[-1].startswith("  - benchmark regression: ")
    assert "2.00x slower than 00000000" in lines[-1]
    reasons = [line for line in lines if "benchmark regression" in line]
    assert len(reasons) >= 4  # 4 regressions, listed at the very end
    assert lines[-5] == "nightly FAILED:"

    index = json.loads((reports / "history.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["ok", "failed"]
    assert index["runs"][1]["benchmarks"]["regressions"] == 4
    assert index["runs"][1]["commit"] == head
    page = (reports / "index.html").read_text()
    for run in index["runs"]:
        assert f'href="{run["report"]}"' in page
    run_dir = reports / index["runs"][1]["id"]
    summary = json.loads((run_dir / "nightly.json").read_text())
    assert summary["status"] == "failed"
    assert {s["name"]: s["status"] for s in summary["steps"]}["compare"] == "failed"
    assert (run_dir / "speedup.png").exists()
    assert (run_dir / "bench_history.png").exists()
    assert "class='regression'" in (run_dir / "index.html").read_text()


FAKE_TASKS = """
import json as jsonlib
from pathlib import Path

from invoke import Collection, task

HERE = Path(__file__).parent


def _write(json, **kw):
    result = jsonlib.loads((HERE / "result.json").read_text())
    (HERE / "called.json").write_text(jsonlib.dumps(kw))
    Path(json).write_text(jsonlib.dumps(result))


@task
def cluster(c, nodes=3, json="", duration=30.0, results=""):
    _write(json, task="local.cluster", nodes=nodes, duration=duration)


local = Collection("local", cluster)
ns = Collection(local)
"""

FAKE_QEMU = """

@task(name="cluster")
def qemu_cluster(c, nodes=3, json="", faults=""):
    _write(json, task="qemu.cluster", nodes=nodes, faults=faults)


ns.add_collection(Collection("qemu", qemu_cluster))
"""


def fake_repo(tmp_path: Path, result: dict[str, object], qemu: bool) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    tasks = FAKE_TASKS + (FAKE_QEMU if qemu else "")
    (repo / "tasks.py").write_text(textwrap.dedent(tasks))
    (repo / "result.json").write_text(json.dumps(result))
    return repo


def cluster_only(repo: Path, reports: Path, **kw: object) -> nightly.NightlyOptions:
    skip = nightly.expand_skip(["compile,tests,benchmark,compare,wheels"])
    return nightly.NightlyOptions(
        repo=repo, reports=reports, skip=skip, duration=2.0, **kw
    )


RESULT = {
    "nodes": 3,
    "acked": 100,
    "lost": 0,
    "duplicated": 0,
    "reordered": 0,
    "throughput_msgs_per_s": 1000.0,
    "latency_ms": {"p50": 1.0, "p99": 5.0, "p99.9": 9.0},
    "per_node": [{"node_id": "n0", "arch": "x86_64"}],
}


def test_local_fallback_is_recorded_and_checker_loss_fails(tmp_path):
    repo = fake_repo(tmp_path, {**RESULT, "lost": 2}, qemu=False)
    out = io.StringIO()
    result = nightly.run_nightly(
        cluster_only(repo, tmp_path / "reports"), Console(file=out, width=200)
    )
    assert result.exit_code == 1
    assert result.reasons == ["cluster checker: 2 lost message(s)"]
    called = json.loads((repo / "called.json").read_text())
    assert called == {"task": "local.cluster", "nodes": 3, "duration": 2.0}
    summary = json.loads((result.run_dir / "nightly.json").read_text())
    assert summary["cluster"]["provider"] == "local"
    assert "no `invoke qemu.cluster` task" in summary["cluster"]["fallback_reason"]
    assert "has no --faults option" in summary["cluster"]["faults_note"]
    page = (result.run_dir / "index.html").read_text()
    assert "Fallback:" in page
    assert "no `invoke qemu.cluster` task" in page
    assert "fallback" in out.getvalue()
    log = (result.run_dir / "logs" / "cluster.log").read_text()
    assert log.startswith("$ ")
    assert "# exit 0 after" in log


def test_qemu_cluster_with_faults_and_a_throughput_drop(tmp_path):
    timeline = [{"t_s": t, "acked": 100, "failed": 0} for t in range(1, 6)]
    faults = [{"kind": "kill", "target": "n1", "start_s": 2, "end_s": 3}]
    reports = tmp_path / "reports"
    repo = fake_repo(tmp_path, {**RESULT, "timeline": timeline, "faults": faults}, True)
    console = Console(file=io.StringIO())
    first = nightly.run_nightly(cluster_only(repo, reports, faults="kill"), console)
    assert first.exit_code == 0, first.reasons
    called = json.loads((repo / "called.json").read_text())
    assert called == {"task": "qemu.cluster", "nodes": 3, "faults": "kill"}
    assert (first.run_dir / "timeline.png").exists()
    summary = json.loads((first.run_dir / "nightly.json").read_text())
    assert summary["cluster"]["provider"] == "qemu"
    assert "fallback_reason" not in summary["cluster"]

    slower = {**RESULT, "throughput_msgs_per_s": 800.0}
    (repo / "result.json").write_text(json.dumps(slower))
    # under faults the throughput is not gated (it measures the faults)
    second = nightly.run_nightly(cluster_only(repo, reports, faults="kill"), console)
    assert second.exit_code == 0, second.reasons
    # without faults a drop beyond the factor fails the night
    (repo / "result.json").write_text(json.dumps(RESULT))
    calm = nightly.run_nightly(cluster_only(repo, reports, faults=""), console)
    assert calm.exit_code == 0, calm.reasons
    (repo / "result.json").write_text(json.dumps(slower))
    third = nightly.run_nightly(cluster_only(repo, reports, faults=""), console)
    assert third.exit_code == 1
    (reason,) = third.reasons
    assert reason.startswith("cluster throughput dropped 1.25x: 800 msg/s")
    assert calm.run_dir.name in reason


def test_expand_skip_and_bad_names():
    assert nightly.expand_skip(["wheels", "tests,compile"]) == {
        "wheels-x86_64",
        "wheels-aarch64",
        "tests",
        "compile",
    }
    with pytest.raises(nightly.NightlyError, match="unknown step 'test'"):
        nightly.expand_skip(["test"])


def test_cluster_plan_passes_only_options_the_task_has(tmp_path):
    opts = nightly.NightlyOptions(quick=True, faults="kill")
    plan = nightly.cluster_plan({"local.cluster": {"nodes", "json"}}, opts, tmp_path)
    assert plan["argv"][-2:] == ["--nodes=3", f"--json={tmp_path / 'cluster.json'}"]
    assert plan["fallback"]
    assert plan["faults"] is None
    tasks = {"qemu.cluster": {"nodes", "json", "faults", "duration"}}
    plan = nightly.cluster_plan(tasks, opts, tmp_path)
    assert plan["argv"][3] == "qemu.cluster"
    assert "--faults=kill" in plan["argv"]
    assert "--duration=40" in plan["argv"]
    assert not any(a.startswith("--fault-interval") for a in plan["argv"])
    assert not plan["fallback"]
    tasks["qemu.cluster"].add("fault-interval")
    plan = nightly.cluster_plan(tasks, opts, tmp_path)
    assert "--fault-interval=9" in plan["argv"]
    full = nightly.NightlyOptions(faults="kill", fault_interval=12.5)
    plan = nightly.cluster_plan(tasks, full, tmp_path)
    assert "--fault-interval=12.5" in plan["argv"]
    assert "--duration=120" in plan["argv"]


def test_run_command_times_out_and_kills_the_group(tmp_path):
    log = tmp_path / "logs" / "x.log"
    code, _ = nightly.run_command(
        [sys.executable, "-c", "print('hi', flush=True); import time; time.sleep(60)"],
        log,
        cwd=tmp_path,
        timeout=1.0,
    )
    assert code is None
    text = log.read_text()
    assert "hi\n" in text
    assert "timed out" in text
    code, _ = nightly.run_command(
        [sys.executable, "-c", "raise SystemExit(3)"], log, cwd=tmp_path, timeout=60
    )
    assert code == 3


def test_one_nightly_at_a_time(tmp_path):
    with (
        nightly.run_lock(tmp_path),
        pytest.raises(nightly.NightlyError, match="another nightly"),
        nightly.run_lock(tmp_path),
    ):
        pass


def test_cron_line():
    line = nightly.cron_line(Path("/srv/plexi lab"), hour=4, minute=30)
    assert line == (
        "30 4 * * * cd '/srv/plexi lab' && mkdir -p reports && ./lab invoke nightly "
        ">> reports/cron.log 2>&1 # plexilab-nightly /srv/plexi lab"
    )
    with pytest.raises(nightly.NightlyError):
        nightly.cron_line(REPO, hour=24)


def test_schedule_task_prints_the_line(capsys):
    nightly_cli.schedule(Context(), hour=5)
    out = capsys.readouterr().out.strip()
    assert out == nightly.cron_line(nightly.REPO, 5)
    assert out.startswith(f"0 5 * * * cd {nightly.REPO} && ")
    with pytest.raises(Exit):
        nightly_cli.schedule(Context(), hour=-1)


def test_install_cron_keeps_other_entries_and_is_idempotent(tmp_path, monkeypatch):
    store = tmp_path / "crontab.txt"
    fake = tmp_path / "crontab"
    fake.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            if [ "$1" = "-l" ]; then
                [ -f "$FAKE_CRONTAB" ] && exec cat "$FAKE_CRONTAB"
                echo "no crontab for root" >&2; exit 1
            fi
            [ "$1" = "-" ] && exec cat > "$FAKE_CRONTAB"
            exit 2
            """
        )
    )
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_CRONTAB", str(store))
    repo = Path("/srv/lab")
    line3 = nightly.cron_line(repo, 3)
    assert nightly.install_cron(line3, repo, str(fake)) == "installed"
    assert store.read_text() == line3 + "\n"
    other = "15 1 * * * /usr/local/bin/backup # plexilab-nightly /srv/other"
    store.write_text(f"MAILTO=root\n{other}\n{line3}\n")
    assert nightly.install_cron(line3, repo, str(fake)) == "already installed"
    line5 = nightly.cron_line(repo, 5)
    assert nightly.install_cron(line5, repo, str(fake)) == "replaced"
    assert store.read_text().splitlines() == ["MAILTO=root", other, line5]


def load_yaml(path: Path) -> dict[str, object]:
    try:
        import yaml
    except ImportError:  # the tests venv has invoke, which vendors PyYAML
        from invoke.vendor import yaml  # type: ignore[no-redef]
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def test_hosted_ci_workflow_structure():
    """No actionlint offline: parse the workflow and check what it relies on."""
    wf = load_yaml(REPO / ".github" / "workflows" / "nightly.yml")
    assert "on" in wf, "quote the 'on' key (YAML 1.1 reads a bare on as true)"
    (cron,) = [entry["cron"] for entry in wf["on"]["schedule"]]
    minute, hour, *rest = cron.split()
    assert 0 <= int(minute) <= 59
    assert 0 <= int(hour) <= 23
    assert rest == ["*", "*", "*"]
    assert "workflow_dispatch" in wf["on"]
    jobs = wf["jobs"]
    assert set(jobs) == {"wheels", "nightly"}
    for job in jobs.values():
        assert job["runs-on"]
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@v\d+(\.\d+)*", step["uses"])
    wheels = jobs["wheels"]
    include = wheels["strategy"]["matrix"]["include"]
    assert {m["arch"] for m in include} == {"x86_64", "aarch64"}
    assert wheels["runs-on"] == "${{ matrix.runner }}"
    assert all(m["runner"].startswith("ubuntu-") for m in include)
    (build,) = [s for s in wheels["steps"] if "cibuildwheel" in s.get("uses", "")]
    assert build["env"]["CIBW_ARCHS_LINUX"] == "${{ matrix.arch }}"
    cibw = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["cibuildwheel"]
    assert set(cibw["linux"]["archs"]) == {"x86_64", "aarch64"}
    runs = [s["run"] for s in jobs["nightly"]["steps"] if "run" in s]
    (command,) = [r for r in runs if "nightly" in r]
    argv = shlex.split(command)
    assert argv[:3] == ["./lab", "invoke", "nightly"]
    assert os.access(REPO / "lab", os.X_OK)
    skips = [argv[i + 1] for i, a in enumerate(argv) if a == "--skip"]
    assert nightly.expand_skip(skips) == {"wheels-x86_64", "wheels-aarch64"}
    flags = {a.split("=")[0] for a in argv[3:] if a.startswith("--")}
    params = set(inspect.signature(nightly_cli.run.body).parameters)
    assert {f[2:].replace("-", "_") for f in flags} <= params
    cached = [
        s for s in jobs["nightly"]["steps"] if "actions/cache" in s.get("uses", "")
    ]
    assert {s["uses"].split("@")[0] for s in cached} == {
        "actions/cache/restore",
        "actions/cache/save",
    }
    assert all(".asv/results" in s["with"]["path"] for s in cached)
    assert cached[-1]["if"] == "always()"


def test_compare_follows_the_commit_the_benchmark_step_recorded(tmp_path):
    asv = tmp_path / "asv"
    write_asv(asv, "0" * 40, date=1000, scale=1.0)
    since = time.time()
    write_asv(asv, "b" * 40, date=2000, scale=1.0)  # HEAD moved to b... meanwhile
    options = nightly.NightlyOptions(reports=tmp_path / "reports", asv_results=asv)
    run = nightly.Nightly(options, Console(file=io.StringIO()))
    comparison = run.compare("a" * 40, True, since=since)
    assert comparison is not None
    assert comparison.head_commit == "b" * 40
    assert comparison.prev_commit == "0" * 40
    assert "HEAD moved during the run: started at aaaaaaaa" in comparison.note
    (step,) = run.steps
    assert step.status == "ok"
    assert "4 compared with 00000000, 0 regression(s)" in step.note
    assert run.reasons == []
    # without a file written by the benchmark step, HEAD as given is compared
    again = nightly.Nightly(options, Console(file=io.StringIO()))
    assert again.compare("a" * 40, True).note.startswith("no asv result for HEAD")
