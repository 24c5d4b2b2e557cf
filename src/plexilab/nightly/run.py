"""The nightly run: steps, verdict, ``nightly.json``, report, history.

Steps (each a subprocess of this interpreter's ``nox``/``invoke``, timed, its
output in ``<run>/logs/<step>.log``):

1. ``compile`` (``nox -s compile``) and ``tests`` (``nox -s tests``; with
   ``quick``: ``nox -s tests -- -m "not qemu and not docker"``);
2. ``benchmark`` (``nox -s benchmark``: asv on HEAD into ``.asv/results/lab``)
   and ``compare`` (in process: HEAD's asv result against the previous
   commit's, see :func:`plexilab.results.history.compare_head`);
3. ``wheels-x86_64`` and ``wheels-aarch64`` (``nox -s wheels -- --arch A``);
4. ``cluster``: ``invoke qemu.cluster`` when this checkout has that task,
   otherwise ``invoke local.cluster`` -- the fallback is recorded in the report;
   its options come from the checkout's options schema and go over as
   ``--options FILE.json`` when the task takes it (:mod:`plexilab.nightly.plan`);
   ``--faults`` only to a task that has it (recorded too).

Everything lands in ``reports/<YYYY-mm-dd-HHMMSS>/`` (``nightly.json``,
``benchmarks.json``, ``cluster.json``, PNGs, ``index.html``, ``logs/``) and in
``reports/history.json`` + ``reports/index.html``.  The run fails (exit 1) on
a broken step, a benchmark slower than the factor vs the previous commit, a
cluster throughput drop beyond the factor vs the previous comparable run, or
any checker violation (lost, duplicated, reordered or misplaced messages,
gaps, shared seqs, replicas that disagree); the reasons are printed last.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from plexilab import proc
from plexilab.nightly import plan as planlib
from plexilab.nightly.config import QUICK_MARKERS, NightlyError, NightlyOptions
from plexilab.results import asvreport, history, report

KILL_GRACE = 10.0


@dataclass
class StepResult:
    """One step as recorded in ``nightly.json``."""

    name: str
    status: str  # ok, failed, timeout, skipped
    seconds: float = 0.0
    returncode: int | None = None
    log: str | None = None  # relative to the run directory
    command: str | None = None
    note: str = ""


# -- subprocesses --------------------------------------------------------------------


def _tail_line(path: Path, limit: int = 4096) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).strip()
        if line:
            return line
    return ""


def run_command(
    argv: Sequence[str],
    log: Path,
    *,
    cwd: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    tick: Callable[[str], None] = lambda _line: None,
) -> tuple[int | None, float]:
    """Run *argv* with its output in *log*; ``(returncode or None on timeout, s)``.

    The child gets its own process group, which is killed on timeout and on
    Ctrl-C.  *tick* receives the last line of the log about twice a second.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        out.write(f"$ {shlex.join(argv)}\n# cwd {cwd}\n")
        out.flush()
        child = proc.spawn(
            argv,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        code: int | None = None
        try:
            while True:
                try:
                    code = child.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    tick(_tail_line(log))
                    if time.monotonic() - started > timeout:
                        proc.terminate(child, grace=KILL_GRACE, kill_grace=KILL_GRACE)
                        break
        except BaseException:
            proc.terminate(child, grace=KILL_GRACE, kill_grace=KILL_GRACE)
            raise
        seconds = time.monotonic() - started
        verdict = f"exit {code}" if code is not None else f"timed out ({timeout:g} s)"
        out.write(f"\n# {verdict} after {seconds:.1f} s\n")
    return code, seconds


def git_info(repo: Path) -> dict[str, Any]:
    """HEAD's hash and whether the tree has uncommitted changes."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "commit": commit,
        "dirty": dirty,
        "subject": git("log", "-1", "--format=%s"),
    }


# -- the run --------------------------------------------------------------------------


@dataclass
class NightlyResult:
    """Outcome of :func:`run_nightly`."""

    run_dir: Path
    status: str
    reasons: list[str]
    steps: list[StepResult] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "ok" else 1


@contextlib.contextmanager
def run_lock(reports: Path) -> Iterator[None]:
    """One nightly at a time per reports directory (``reports/.nightly.lock``)."""
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / ".nightly.lock"
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NightlyError(f"another nightly is running (lock {path})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def new_run_dir(reports: Path) -> Path:
    """``reports/<YYYY-mm-dd-HHMMSS>`` (suffixed if that second is taken)."""
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    for n in range(100):
        path = reports / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise NightlyError(f"cannot make a run directory under {reports}")


class Nightly:
    """One nightly run: steps, verdict, report, history."""

    def __init__(self, options: NightlyOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.run_dir = new_run_dir(options.reports)
        self.steps: list[StepResult] = []
        self.reasons: list[str] = []
        self.info: dict[str, Any] = {}
        self.started = time.time()

    # -- step helpers -------------------------------------------------------------

    def _announce(self, step: StepResult) -> None:
        style = {"ok": "green", "skipped": "dim"}.get(step.status, "bold red")
        extra = f" ({step.note})" if step.note else ""
        log = f" log: {step.log}" if step.log else ""
        self.console.print(
            f"[{style}]{step.status:>7}[/{style}] {step.name} "
            f"{step.seconds:.1f} s{log}{extra}",
            highlight=False,
        )

    def skipped(self, name: str, note: str = "--skip") -> StepResult:
        step = StepResult(name, "skipped", note=note)
        self.steps.append(step)
        self._announce(step)
        return step

    def command(
        self, name: str, argv: Sequence[str], note: str = "", timeout: float = 0.0
    ) -> StepResult:
        """Run one subprocess step (or record it as skipped)."""
        if name in self.options.skip:
            return self.skipped(name)
        log = self.run_dir / "logs" / f"{name}.log"
        if self.console.is_terminal:
            columns = (
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                TimeElapsedColumn(),
                TextColumn("[dim]{task.fields[last]}"),
            )
            with Progress(*columns, console=self.console, transient=True) as bar:
                task = bar.add_task(name, total=None, last="")
                code, seconds = run_command(
                    argv,
                    log,
                    cwd=self.options.repo,
                    timeout=timeout or self.options.timeout,
                    tick=lambda line: bar.update(task, last=line[:70]),
                )
        else:
            self.console.print(f"  start {name}: {shlex.join(argv)}", highlight=False)
            code, seconds = run_command(
                argv,
                log,
                cwd=self.options.repo,
                timeout=timeout or self.options.timeout,
            )
        status = "ok" if code == 0 else ("timeout" if code is None else "failed")
        step = StepResult(
            name,
            status,
            round(seconds, 2),
            code,
            str(log.relative_to(self.run_dir)),
            shlex.join(argv),
            note,
        )
        self.steps.append(step)
        self._announce(step)
        if status != "ok":
            what = f"exit {code}" if code is not None else "timed out"
            self.reasons.append(f"step {name} {status} ({what}); log: {log}")
        return step

    def nox(self, name: str, session: str, *posargs: str, note: str = "") -> StepResult:
        argv = [self.options.python, "-m", "nox", "-s", session]
        if posargs:
            argv += ["--", *posargs]
        return self.command(name, argv, note)

    # -- the steps ----------------------------------------------------------------

    def compare(
        self, commit: str, benchmark_ok: bool, since: float | None = None
    ) -> history.BenchComparison | None:
        """HEAD's asv result vs the previous commit's; writes ``benchmarks.json``.

        When the benchmark step ran (*since* = its start, wall clock), the
        commit compared is the one asv recorded in the file that step wrote:
        the ``benchmark`` session reads HEAD itself, and HEAD can move while a
        nightly runs in a working tree others commit to.
        """
        name = "compare"
        if name in self.options.skip:
            self.skipped(name)
            return None
        if not benchmark_ok:
            self.skipped(name, "benchmark step failed")
            return None
        started = time.monotonic()
        runs = history.load_runs(self.options.asv_results, self.options.machine)
        fresh = [r for r in runs if since and r.path.stat().st_mtime >= since - 1]
        moved = ""
        if fresh:
            recorded = max(fresh, key=lambda r: r.path.stat().st_mtime).commit
            if recorded != commit:
                moved = (
                    f"HEAD moved during the run: started at {commit[:8]}, "
                    f"benchmarks recorded as {recorded[:8]}"
                )
                self.console.print(f"[yellow]compare: {moved}", highlight=False)
                commit = recorded
        comparison = history.compare_head(runs, commit, self.options.factor)
        if moved:
            comparison.note = "; ".join(filter(None, [moved, comparison.note]))
        heads = [r for r in runs if r.commit == commit]
        speedups: list[dict[str, Any]] = []
        if heads:
            names = asvreport.param_names_of(
                self.options.asv_results / "benchmarks.json"
            )
            timings = asvreport.load_timings(heads[-1].path, names)
            speedups = asvreport.speedups(timings)
        (self.run_dir / "benchmarks.json").write_text(
            json.dumps(
                {
                    "machine": self.options.machine,
                    "results_dir": str(self.options.asv_results),
                    "comparison": comparison.to_json(),
                    "speedups": speedups,
                    "history": history.series(runs),
                },
                indent=1,
            )
            + "\n"
        )
        regressions = comparison.reasons()
        ran_benchmarks = "benchmark" not in self.options.skip
        missing_head = not heads and ran_benchmarks
        failed = bool(regressions) or missing_head
        parts = [comparison.note]
        if comparison.prev_commit:
            parts.append(
                f"{len(comparison.changes)} compared with "
                f"{comparison.prev_commit[:8]}, "
                f"{len(comparison.regressions)} regression(s)"
            )
        note = "; ".join(filter(None, parts))
        status = "failed" if failed else ("ok" if heads else "skipped")
        step = StepResult(
            name,
            status,
            round(time.monotonic() - started, 2),
            note=note,
        )
        self.steps.append(step)
        self._announce(step)
        self.reasons.extend(regressions)
        if missing_head:
            self.reasons.append(
                f"benchmark step wrote no asv result for HEAD {commit[:8]} in "
                f"{self.options.asv_results / self.options.machine}"
            )
        return comparison

    def cluster(self) -> dict[str, Any] | None:
        """Run the cluster task; return its plan (with the result summary)."""
        name = "cluster"
        if name in self.options.skip:
            self.skipped(name)
            return None
        try:
            checkout = planlib.inspect_checkout(self.options.python, self.options.repo)
            plan = planlib.cluster_plan(checkout, self.options, self.run_dir)
        except (NightlyError, subprocess.SubprocessError, ValueError) as exc:
            step = StepResult(name, "failed", note=f"cannot plan: {exc}")
            self.steps.append(step)
            self._announce(step)
            self.reasons.append(f"step cluster failed: {exc}")
            return None
        short = f"provider {plan['provider']}, options as {plan['handover']}"
        if plan.get("fallback_reason"):
            short += " (fallback: no qemu.cluster task)"
        if plan.get("faults_note"):
            short += "; without faults"
        for key in ("fallback_reason", "faults_note", "schema_note"):
            if plan.get(key):
                self.console.print(f"[yellow]cluster: {plan[key]}", highlight=False)
        step = self.command(name, plan["argv"], note=short)
        info: dict[str, Any] = {
            k: v for k, v in plan.items() if k != "argv" and v is not None
        }
        info["command"] = step.command
        result_path = self.run_dir / "cluster.json"
        if result_path.exists():
            result = json.loads(result_path.read_text())
            summary = history.cluster_summary(
                result, provider=plan["provider"], faults=plan.get("faults")
            )
            summary["fallback"] = plan["fallback"]
            index = history.load_index(self.options.reports)
            previous = history.previous_cluster(index, summary)
            info["summary"] = summary
            if previous is not None:
                info["previous"] = {
                    "id": previous.get("id"),
                    "commit": previous.get("commit"),
                    "throughput_msgs_per_s": previous["cluster"].get(
                        "throughput_msgs_per_s"
                    ),
                }
            self.reasons.extend(
                history.cluster_regressions(summary, previous, self.options.factor)
            )
        elif step.status == "ok":
            self.reasons.append("cluster step wrote no cluster.json")
        return info

    # -- all of it -------------------------------------------------------------------

    def run(self) -> NightlyResult:
        o = self.options
        git = git_info(o.repo)
        commit = git["commit"]
        self.console.rule(
            f"nightly {self.run_dir.name}: {commit[:10]}"
            f"{' (dirty tree)' if git['dirty'] else ''}"
            f" {'quick' if o.quick else 'full'}"
        )
        self.nox("compile", "compile")
        if o.quick:
            self.nox(
                "tests", "tests", "-m", QUICK_MARKERS, note="quick: " + QUICK_MARKERS
            )
        else:
            self.nox("tests", "tests", "tests")  # with the nightly-marked runs
        bench_started = time.time()
        bench = self.nox("benchmark", "benchmark")
        comparison = self.compare(
            commit,
            bench.status in ("ok", "skipped"),
            since=bench_started if bench.status == "ok" else None,
        )
        for arch in ("x86_64", "aarch64"):
            self.nox(f"wheels-{arch}", "wheels", "--arch", arch)
        cluster_info = self.cluster()
        return self.finish(git, comparison, cluster_info)

    def finish(
        self,
        git: dict[str, Any],
        comparison: history.BenchComparison | None,
        cluster_info: dict[str, Any] | None,
    ) -> NightlyResult:
        """Write ``nightly.json``, the report and the history; print the verdict."""
        o = self.options
        status = "failed" if self.reasons else "ok"
        summary: dict[str, Any] = {
            "id": self.run_dir.name,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "duration_s": round(time.time() - self.started, 1),
            "commit": git["commit"],
            "dirty": git["dirty"],
            "subject": git.get("subject", ""),
            "quick": o.quick,
            "factor": o.factor,
            "skip": sorted(o.skip),
            "host": {
                "name": platform.node(),
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
            },
            "steps": [asdict(s) for s in self.steps],
            "benchmarks": comparison.to_json() if comparison else None,
            "cluster": cluster_info,
            "status": status,
            "reasons": list(self.reasons),
        }
        path = self.run_dir / "nightly.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        try:
            made = report.build(self.run_dir)
            self.console.print(
                f"report: {self.run_dir / 'index.html'} "
                f"(plots: {', '.join(made['plots']) or 'none'})",
                highlight=False,
            )
        except Exception as exc:  # a broken plot must not hide the verdict
            self.reasons.append(f"report generation failed: {exc!r}")
            summary["status"], summary["reasons"] = "failed", list(self.reasons)
            path.write_text(json.dumps(summary, indent=2) + "\n")
        entry = index_entry(summary, o.reports, self.run_dir)
        history.record_run(o.reports, entry)
        report.build_index(o.reports)
        self.print_summary()
        return NightlyResult(
            self.run_dir, summary["status"], list(self.reasons), self.steps
        )

    def print_summary(self) -> None:
        table = Table(title=f"nightly {self.run_dir.name}")
        for col in ("step", "status", "time", "log / note"):
            table.add_column(col)
        for s in self.steps:
            style = {"ok": "green", "skipped": "dim"}.get(s.status, "bold red")
            table.add_row(
                s.name,
                f"[{style}]{s.status}",
                f"{s.seconds:.1f} s",
                " ".join(filter(None, [s.log, s.note])),
            )
        self.console.print(table)
        self.console.print(f"history: {self.options.reports / 'index.html'}")


def index_entry(
    summary: dict[str, Any], reports: Path, run_dir: Path
) -> dict[str, Any]:
    """The row of ``reports/history.json`` for one run."""
    cluster = (summary.get("cluster") or {}).get("summary")
    bench = summary.get("benchmarks")
    return {
        "id": summary["id"],
        "date": summary["started"],
        "commit": summary["commit"],
        "dirty": summary["dirty"],
        "status": summary["status"],
        "quick": summary["quick"],
        "duration_s": summary["duration_s"],
        "steps": {s["name"]: s["status"] for s in summary["steps"]},
        "cluster": cluster,
        "benchmarks": {
            "prev_commit": bench.get("prev_commit"),
            "compared": bench.get("compared"),
            "regressions": bench.get("regressions"),
            "improvements": bench.get("improvements"),
        }
        if bench
        else None,
        "reasons": summary["reasons"],
        "report": str((run_dir / "index.html").relative_to(reports)),
    }


def run_nightly(
    options: NightlyOptions, console: Console | None = None
) -> NightlyResult:
    """Run the nightly under the reports lock; see the module docstring."""
    console = console or Console()
    with run_lock(options.reports):
        return Nightly(options, console).run()


def format_reasons(reasons: Sequence[str]) -> str:
    """The final message: one reason per line."""
    return "nightly FAILED:\n" + "\n".join(f"  - {r}" for r in reasons)
