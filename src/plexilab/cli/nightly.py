"""Invoke namespace ``nightly``: the nightly run and its cron schedule.

* ``invoke nightly [--quick] [--reports DIR] [--factor 1.1] [--skip STEP ...]``
  runs compile, tests, benchmark (+ compare with the previous commit), wheels
  for x86_64 and aarch64 and a cluster run, and writes
  ``reports/<YYYY-mm-dd-HHMMSS>/index.html`` plus ``reports/index.html``.
  Exits 1 on a broken step or a regression; the reasons are printed last.
* ``invoke nightly.schedule [--install] [--hour 3]`` prints the crontab line
  (``--install`` puts it in this user's crontab, replacing only its own line).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task
from rich.console import Console

from plexilab import nightly as nightly_mod

console = Console()


@task(
    default=True,
    iterable=["skip"],
    help={
        "quick": 'tests with -m "not qemu and not docker" and a 40 s cluster run',
        "reports": "reports directory (default reports/ in the repo)",
        "factor": "slowdown factor counted as a regression (default 1.1)",
        "skip": f"step to skip, repeatable or comma-separated: "
        f"{', '.join(nightly_mod.STEPS)}, wheels",
        "nodes": "cluster nodes (default 3)",
        "duration": "cluster load seconds (default 40 quick, 120 full)",
        "faults": "fault plan passed as --faults to a cluster task that has it "
        f"(default {nightly_mod.DEFAULT_FAULTS!r}; '' for none)",
        "fault_interval": "seconds between faults in the cluster run "
        "(default 9 quick, 15 full)",
        "asv_results": "asv results directory (default .asv/results)",
    },
)
def run(
    c: Context,
    quick: bool = False,
    reports: str = "",
    factor: float = 1.1,
    skip: list[str] | None = None,
    nodes: int = 3,
    duration: float = 0.0,
    faults: str = nightly_mod.DEFAULT_FAULTS,
    fault_interval: float = 0.0,
    asv_results: str = "",
) -> None:
    """Run the nightly: build, tests, benchmarks, wheels, cluster; write the report."""
    if factor < 1.0:
        raise Exit("--factor must be >= 1.0", code=2)
    try:
        options = nightly_mod.NightlyOptions(
            quick=quick,
            factor=float(factor),
            skip=nightly_mod.expand_skip(skip or []),
            nodes=nodes,
            duration=float(duration),
            faults=faults,
            fault_interval=float(fault_interval),
        )
        if reports:
            options.reports = Path(reports).resolve()
        if asv_results:
            options.asv_results = Path(asv_results).resolve()
        result = nightly_mod.run_nightly(options, console)
    except nightly_mod.NightlyError as exc:
        sys.stdout.flush()
        raise Exit(f"nightly: {exc}", code=2) from None
    sys.stdout.flush()
    if result.exit_code:
        raise Exit(nightly_mod.format_reasons(result.reasons), code=result.exit_code)
    console.print(f"[green]nightly OK[/green]: {result.run_dir / 'index.html'}")


@task(
    help={
        "install": "install the line into this user's crontab (idempotent)",
        "hour": "hour of the day, 0-23 (default 3)",
        "minute": "minute, 0-59 (default 0)",
    }
)
def schedule(c: Context, install: bool = False, hour: int = 3, minute: int = 0) -> None:
    """Print (or --install) the crontab line that runs the nightly from this repo."""
    try:
        line = nightly_mod.cron_line(nightly_mod.REPO, hour, minute)
    except nightly_mod.NightlyError as exc:
        raise Exit(str(exc), code=2) from None
    print(line)
    if not install:
        return
    crontab = shutil.which("crontab")
    if crontab is None:
        raise Exit(
            "crontab not found: install cron first (apt-get install -y cron) and "
            "make sure the cron service runs",
            code=1,
        )
    try:
        done = nightly_mod.install_cron(line, nightly_mod.REPO, crontab)
    except nightly_mod.NightlyError as exc:
        raise Exit(str(exc), code=1) from None
    print(f"crontab: {done}")


nightly = Collection("nightly", run, schedule)
