"""plexilab.nightly: the verdict, the history, the cluster plan from the checkout's
options schema, the schedule (systemd timer, crontab line)."""

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

from plexilab import options as options_model
from plexilab.cli import nightly as nightly_cli
from plexilab.nightly import config, plan, schedule
from plexilab.nightly import run as nightly_run

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
def qemu_cluster(
    c, nodes=3, json="", faults="", duration=30.0, fault_interval=20.0, results="",
    options="",
):
    given = jsonlib.loads(Path(options).read_text()) if options else {}
    _write(given.get("json", json), task="qemu.cluster", options=given)


ns.add_collection(Collection("qemu", qemu_cluster))
"""

# the checkout's `python -m plexilab.options`: prints the schema.json beside it
FAKE_OPTIONS = """
import sys
from pathlib import Path

sys.stdout.write(Path(__file__).with_name("schema.json").read_text())
"""


def fake_repo(
    tmp_path: Path,
    result: dict[str, object],
    qemu: bool,
    lacks: tuple[str, ...] = (),
    extra: tuple[str, ...] = (),
) -> Path:
    """A checkout with tasks.py and an options schema (without *lacks*)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    tasks = FAKE_TASKS + (FAKE_QEMU if qemu else "")
    (repo / "tasks.py").write_text(textwrap.dedent(tasks))
    (repo / "result.json").write_text(json.dumps(result))
    package = repo / "src" / "plexilab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "options.py").write_text(FAKE_OPTIONS)
    schema = {k: v for k, v in options_model.schema().items() if k not in lacks}
    schema.update({name: {"type": "str", "default": ""} for name in extra})
    (package / "schema.json").write_text(json.dumps(schema))
    return repo


def cluster_only(repo: Path, reports: Path, **kw: object) -> config.NightlyOptions:
    skip = config.expand_skip(["compile,tests,benchmark,compare,wheels"])
    return config.NightlyOptions(
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
    result = nightly_run.run_nightly(
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
    first = nightly_run.run_nightly(cluster_only(repo, reports, faults="kill"), console)
    assert first.exit_code == 0, first.reasons
    called = json.loads((repo / "called.json").read_text())
    assert called == {
        "task": "qemu.cluster",
        "options": {
            "nodes": 3,
            "json": str(first.run_dir / "cluster.json"),
            "duration": 2.0,
            "results": str(first.run_dir / "cluster"),
            "faults": "kill",
            "fault_interval": 15.0,
        },
    }
    assert (first.run_dir / "timeline.png").exists()
    summary = json.loads((first.run_dir / "nightly.json").read_text())
    assert summary["cluster"]["provider"] == "qemu"
    assert summary["cluster"]["handover"] == "json"
    assert summary["cluster"]["command"].endswith(
        f"qemu.cluster --options={first.run_dir / 'cluster-options.json'}"
    )
    assert "fallback_reason" not in summary["cluster"]

    slower = {**RESULT, "throughput_msgs_per_s": 800.0}
    (repo / "result.json").write_text(json.dumps(slower))
    # under faults the throughput is not gated (it measures the faults)
    second = nightly_run.run_nightly(
        cluster_only(repo, reports, faults="kill"), console
    )
    assert second.exit_code == 0, second.reasons
    # without faults a drop beyond the factor fails the night
    (repo / "result.json").write_text(json.dumps(RESULT))
    calm = nightly_run.run_nightly(cluster_only(repo, reports, faults=""), console)
    assert calm.exit_code == 0, calm.reasons
    (repo / "result.json").write_text(json.dumps(slower))
    third = nightly_run.run_nightly(cluster_only(repo, reports, faults=""), console)
    assert third.exit_code == 1
    (reason,) = third.reasons
    assert reason.startswith("cluster throughput dropped 1.25x: 800 msg/s")
    assert calm.run_dir.name in reason


def test_expand_skip_and_bad_names():
    assert config.expand_skip(["wheels", "tests,compile"]) == {
        "wheels-x86_64",
        "wheels-aarch64",
        "tests",
        "compile",
    }
    with pytest.raises(config.NightlyError, match="unknown step 'test'"):
        config.expand_skip(["test"])


SCHEMA = options_model.schema()


def checkout(tasks: dict[str, set[str]], schema=SCHEMA) -> plan.Checkout:
    return plan.Checkout({k: frozenset(v) for k, v in tasks.items()}, schema)


def test_cluster_plan_passes_only_options_the_task_has(tmp_path):
    opts = config.NightlyOptions(quick=True, faults="kill")
    made = plan.cluster_plan(
        checkout({"local.cluster": {"nodes", "json"}}), opts, tmp_path
    )
    assert made["argv"][-2:] == ["--nodes=3", f"--json={tmp_path / 'cluster.json'}"]
    assert made["handover"] == "flags"
    assert made["fallback"]
    assert made["faults"] is None
    tasks = {"qemu.cluster": {"nodes", "json", "faults", "duration"}}
    made = plan.cluster_plan(checkout(tasks), opts, tmp_path)
    assert made["argv"][3] == "qemu.cluster"
    assert "--faults=kill" in made["argv"]
    assert "--duration=40" in made["argv"]
    assert not any(a.startswith("--fault-interval") for a in made["argv"])
    assert not made["fallback"]
    tasks["qemu.cluster"].add("fault_interval")
    made = plan.cluster_plan(checkout(tasks), opts, tmp_path)
    assert "--fault-interval=9" in made["argv"]
    full = config.NightlyOptions(faults="kill", fault_interval=12.5)
    made = plan.cluster_plan(checkout(tasks), full, tmp_path)
    assert "--fault-interval=12.5" in made["argv"]
    assert "--duration=120" in made["argv"]
    assert not (tmp_path / plan.OPTIONS_FILE).exists()


def test_an_option_the_schema_lacks_is_not_passed(tmp_path):
    """The task takes --duration and --fault-interval; the schema lists neither."""
    opts = config.NightlyOptions(faults="kill", duration=7.0)
    schema = {
        k: v for k, v in SCHEMA.items() if k not in ("duration", "fault_interval")
    }
    takes = {"nodes", "json", "duration", "faults", "fault_interval", "results"}
    made = plan.cluster_plan(checkout({"qemu.cluster": takes}, schema), opts, tmp_path)
    assert not any(
        a.startswith(("--duration", "--fault-interval")) for a in made["argv"]
    )
    assert "--faults=kill" in made["argv"]
    assert set(made["options"]) == {"nodes", "json", "results", "faults"}
    # the same through the JSON hand-over
    made = plan.cluster_plan(
        checkout({"qemu.cluster": {*takes, "options"}}, schema), opts, tmp_path
    )
    handed = json.loads((tmp_path / plan.OPTIONS_FILE).read_text())
    assert set(handed) == {"nodes", "json", "results", "faults"}
    # and a schema without faults: none passed, and the report says why
    schema.pop("faults")
    made = plan.cluster_plan(checkout({"qemu.cluster": takes}, schema), opts, tmp_path)
    assert not any(a.startswith("--faults") for a in made["argv"])
    assert "options schema has no faults option" in made["faults_note"]


def test_options_go_over_as_json_typed_as_the_schema_says(tmp_path):
    opts = config.NightlyOptions(faults="kill,pause", duration=60)
    takes = {"nodes", "json", "duration", "faults", "fault_interval", "results"}
    made = plan.cluster_plan(
        checkout({"qemu.cluster": {*takes, "options"}}), opts, tmp_path
    )
    path = tmp_path / plan.OPTIONS_FILE
    assert made["argv"][3:] == ["qemu.cluster", f"--options={path}"]
    assert made["handover"] == "json"
    handed = json.loads(path.read_text())
    assert handed == made["options"]
    assert handed == {
        "nodes": 3,
        "json": str(tmp_path / "cluster.json"),
        "results": str(tmp_path / "cluster"),
        "duration": 60.0,
        "faults": "kill,pause",
        "fault_interval": 15.0,
    }
    assert isinstance(handed["duration"], float)
    # what the generated task reads back: every name is one it knows
    built = options_model.build(options_model.GROUPS, handed, preset="qemu")
    assert built[options_model.LoadOptions].duration == 60.0


def test_a_checkout_without_a_schema_gets_nodes_and_json_only(tmp_path):
    opts = config.NightlyOptions(faults="kill")
    takes = {"nodes", "json", "duration", "faults", "options"}
    made = plan.cluster_plan(checkout({"qemu.cluster": takes}, None), opts, tmp_path)
    assert made["argv"][4:] == ["--nodes=3", f"--json={tmp_path / 'cluster.json'}"]
    assert made["handover"] == "flags"
    assert "no options schema" in made["schema_note"]
    assert "ran without faults" in made["faults_note"]


def test_inspect_checkout_asks_the_checkout_and_parses_no_help(tmp_path, monkeypatch):
    repo = fake_repo(tmp_path, RESULT, qemu=True, lacks=("p2p_rate",), extra=("mine",))
    calls: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(argv, *args, **kwargs):
        calls.append(list(argv))
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(plan.subprocess, "run", recording_run)
    seen = plan.inspect_checkout(sys.executable, repo)
    assert set(seen.tasks) == {"qemu.cluster", "local.cluster"}
    assert seen.tasks["local.cluster"] == {"nodes", "json", "duration", "results"}
    assert "options" in seen.tasks["qemu.cluster"]
    assert seen.schema is not None
    assert "mine" in seen.schema  # the checkout's own schema, not this one's
    assert "p2p_rate" not in seen.schema
    assert calls
    assert not [a for a in calls if {"--help", "-h"} & set(a)]
    assert [sys.executable, "-m", "plexilab.options"] in calls
    # a checkout older than the options model has no schema
    (repo / "src" / "plexilab" / "options.py").unlink()
    assert plan.inspect_checkout(sys.executable, repo).schema is None


def test_run_command_times_out_and_kills_the_group(tmp_path):
    log = tmp_path / "logs" / "x.log"
    code, _ = nightly_run.run_command(
        [sys.executable, "-c", "print('hi', flush=True); import time; time.sleep(60)"],
        log,
        cwd=tmp_path,
        timeout=1.0,
    )
    assert code is None
    text = log.read_text()
    assert "hi\n" in text
    assert "timed out" in text
    code, _ = nightly_run.run_command(
        [sys.executable, "-c", "raise SystemExit(3)"], log, cwd=tmp_path, timeout=60
    )
    assert code == 3


def test_one_nightly_at_a_time(tmp_path):
    with (
        nightly_run.run_lock(tmp_path),
        pytest.raises(config.NightlyError, match="another nightly"),
        nightly_run.run_lock(tmp_path),
    ):
        pass


def test_cron_line():
    line = schedule.cron_line(Path("/srv/plexi lab"), hour=4, minute=30)
    assert line == (
        "30 4 * * * cd '/srv/plexi lab' && mkdir -p reports && ./lab invoke nightly "
        ">> reports/cron.log 2>&1 # plexilab-nightly /srv/plexi lab"
    )
    with pytest.raises(config.NightlyError):
        schedule.cron_line(REPO, hour=24)


def no_system_schedulers(monkeypatch, tmp_path, systemd: bool) -> list[list[str]]:
    """Point the schedule at a temporary unit directory and a fake systemctl."""
    calls: list[list[str]] = []

    def fake_systemctl(argv):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(schedule, "systemd_running", lambda: systemd)
    scope = schedule.Scope(tmp_path / "units", ("systemctl", "--user"))
    monkeypatch.setattr(schedule, "default_scope", lambda: scope)
    monkeypatch.setattr(schedule, "run_command", fake_systemctl)
    monkeypatch.setattr(schedule, "crontab_program", lambda: None)
    return calls


def test_schedule_task_prints_the_line_without_systemd(capsys, monkeypatch, tmp_path):
    calls = no_system_schedulers(monkeypatch, tmp_path, systemd=False)
    nightly_cli.schedule(Context(), hour=5)
    out = capsys.readouterr().out.strip()
    assert out == schedule.cron_line(config.REPO, 5)
    assert out.startswith(f"0 5 * * * cd {config.REPO} && ")
    with pytest.raises(Exit):
        nightly_cli.schedule(Context(), hour=-1)
    assert calls == []
    assert not (tmp_path / "units").exists()


def test_schedule_task_installs_the_systemd_timer(capsys, monkeypatch, tmp_path):
    calls = no_system_schedulers(monkeypatch, tmp_path, systemd=True)
    nightly_cli.schedule(Context(), hour=5, minute=7)
    out = capsys.readouterr().out
    assert f"# {tmp_path / 'units' / 'plexilab-nightly.timer'}" in out
    assert "OnCalendar=*-*-* 05:07:00" in out
    assert schedule.cron_line(config.REPO, 5, 7) in out  # the documented fallback
    assert calls == []  # printing installs nothing
    nightly_cli.schedule(Context(), install=True, hour=5, minute=7)
    out = capsys.readouterr().out
    assert "systemd timer: installed" in out
    assert calls == [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", "plexilab-nightly.timer"],
    ]
    units = schedule.units(config.REPO, 5, 7)
    for name, text in units.items():
        assert (tmp_path / "units" / name).read_text() == text
    with pytest.raises(Exit) as raised:  # --cron, and this machine has no cron
        nightly_cli.schedule(Context(), install=True, cron=True)
    assert "crontab not found" in str(raised.value.message)
    assert capsys.readouterr().out.strip() == schedule.cron_line(config.REPO)
    nightly_cli.schedule(Context(), uninstall=True)
    assert "systemd timer: removed" in capsys.readouterr().out
    assert calls[-2][2:] == ["disable", "--now", "plexilab-nightly.timer"]
    assert not list((tmp_path / "units").iterdir())


def test_timer_units():
    units = schedule.units(Path("/srv/plexi lab 100%"), hour=4, minute=30)
    assert set(units) == {"plexilab-nightly.service", "plexilab-nightly.timer"}
    service = units["plexilab-nightly.service"].splitlines()
    assert "Type=oneshot" in service
    assert "WorkingDirectory=/srv/plexi lab 100%%" in service
    assert 'ExecStart="/srv/plexi lab 100%%/lab" invoke nightly' in service
    timer = units["plexilab-nightly.timer"].splitlines()
    assert "OnCalendar=*-*-* 04:30:00" in timer
    assert "Persistent=true" in timer
    assert "Unit=plexilab-nightly.service" in timer
    assert "WantedBy=timers.target" in timer
    assert (
        "ExecStart=/srv/lab/lab invoke nightly"
        in schedule.units(Path("/srv/lab"))["plexilab-nightly.service"].splitlines()
    )
    with pytest.raises(config.NightlyError):
        schedule.units(REPO, minute=60)


def test_install_and_uninstall_timer_in_a_temporary_unit_dir(tmp_path):
    calls: list[list[str]] = []
    code = {"rc": 0}

    def systemctl(argv):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, code["rc"], "", "no bus")

    scope = schedule.Scope(tmp_path / "system")
    repo = Path("/srv/lab")
    assert schedule.install_timer(scope, systemctl, repo, 3) == "installed"
    assert calls == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "plexilab-nightly.timer"],
    ]
    assert schedule.install_timer(scope, systemctl, repo, 3) == "already installed"
    assert schedule.install_timer(scope, systemctl, repo, 4) == "replaced"
    timer = (tmp_path / "system" / "plexilab-nightly.timer").read_text()
    assert "OnCalendar=*-*-* 04:00:00" in timer
    code["rc"] = 1
    with pytest.raises(
        config.NightlyError, match="systemctl daemon-reload failed: no bus"
    ):
        schedule.install_timer(scope, systemctl, repo, 4)
    code["rc"] = 0
    calls.clear()
    assert schedule.uninstall_timer(scope, systemctl) == "removed"
    assert calls == [
        ["systemctl", "disable", "--now", "plexilab-nightly.timer"],
        ["systemctl", "daemon-reload"],
    ]
    assert list((tmp_path / "system").iterdir()) == []
    assert schedule.uninstall_timer(scope, systemctl) == "not installed"
    assert scope.journal == "journalctl -u plexilab-nightly"


def fake_crontab(tmp_path: Path, monkeypatch) -> tuple[str, Path]:
    """A ``crontab`` program keeping its table in a file: (program, file)."""
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
    return str(fake), store


def test_install_cron_keeps_other_entries_and_is_idempotent(tmp_path, monkeypatch):
    fake, store = fake_crontab(tmp_path, monkeypatch)
    repo = Path("/srv/lab")
    line3 = schedule.cron_line(repo, 3)
    assert schedule.install_cron(line3, repo, fake) == "installed"
    assert store.read_text() == line3 + "\n"
    other = "15 1 * * * /usr/local/bin/backup # plexilab-nightly /srv/other"
    store.write_text(f"MAILTO=root\n{other}\n{line3}\n")
    assert schedule.install_cron(line3, repo, fake) == "already installed"
    line5 = schedule.cron_line(repo, 5)
    assert schedule.install_cron(line5, repo, fake) == "replaced"
    assert store.read_text().splitlines() == ["MAILTO=root", other, line5]
    assert schedule.uninstall_cron(repo, fake) == "removed"
    assert store.read_text().splitlines() == ["MAILTO=root", other]
    assert schedule.uninstall_cron(repo, fake) == "not installed"


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
    assert config.expand_skip(skips) == {"wheels-x86_64", "wheels-aarch64"}
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
    options = config.NightlyOptions(reports=tmp_path / "reports", asv_results=asv)
    run = nightly_run.Nightly(options, Console(file=io.StringIO()))
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
    again = nightly_run.Nightly(options, Console(file=io.StringIO()))
    assert again.compare("a" * 40, True).note.startswith("no asv result for HEAD")


def test_the_timer_replaces_this_repos_crontab_line(tmp_path, monkeypatch):
    fake, store = fake_crontab(tmp_path, monkeypatch)
    repo = Path("/srv/lab")
    other = schedule.cron_line(Path("/srv/other"), 1)
    store.write_text(f"{other}\n{schedule.cron_line(repo, 2)}\n")
    calls: list[list[str]] = []

    def systemctl(argv):
        calls.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, "", "")

    scope = schedule.Scope(tmp_path / "units")
    chosen = schedule.choose(repo, 3, scope=scope)
    done = schedule.install(chosen, systemctl, fake)
    assert done[0].startswith("systemd timer: installed in ")
    assert done[1] == "crontab: removed this repo's line (the timer replaces it)"
    assert store.read_text() == other + "\n"
    # units of another checkout are not removed by this one's --uninstall
    elsewhere = schedule.choose(Path("/srv/other"), scope=scope)
    assert schedule.uninstall(elsewhere, systemctl, fake) == [
        "systemd timer: left alone: the units run /srv/lab",
        "crontab: removed",
    ]
    assert (tmp_path / "units" / "plexilab-nightly.timer").exists()
    assert schedule.uninstall(chosen, systemctl, None) == ["systemd timer: removed"]
    # no systemd and no cron: installing says what is missing
    with pytest.raises(config.NightlyError, match="crontab not found"):
        schedule.install(schedule.choose(repo), systemctl, None)


def test_default_scope_and_systemd_detection(tmp_path, monkeypatch):
    monkeypatch.setattr(schedule.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    scope = schedule.default_scope()
    assert scope == schedule.Scope(
        tmp_path / "cfg" / "systemd" / "user", ("systemctl", "--user")
    )
    assert scope.journal == "journalctl --user -u plexilab-nightly"
    monkeypatch.setattr(schedule.os, "geteuid", lambda: 0)
    assert schedule.default_scope() == schedule.Scope(Path("/etc/systemd/system"))
    assert not schedule.systemd_running(tmp_path / "absent")
    (tmp_path / "booted").mkdir()
    monkeypatch.setattr(schedule.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert schedule.systemd_running(tmp_path / "booted")
    monkeypatch.setattr(schedule.shutil, "which", lambda name: None)
    assert not schedule.systemd_running(tmp_path / "booted")
    assert schedule.crontab_program() is None
