"""Invoke namespace ``nightly``: the nightly run and its schedule.

* ``invoke nightly [--quick] [--reports DIR] [--factor 1.1] [--skip STEP ...]``
  runs compile, tests, benchmark (+ compare with the previous commit), wheels
  for x86_64 and aarch64 and a cluster run, and writes
  ``reports/<YYYY-mm-dd-HHMMSS>/index.html`` plus ``reports/index.html``.
  Exits 1 on a broken step or a regression; the reasons are printed last.
* ``invoke nightly.schedule [--install | --uninstall] [--hour 3] [--cron]``
  prints the schedule: a systemd timer where systemd runs, the crontab line
  otherwise (or with ``--cron``); ``--install`` installs it (idempotent,
  replacing only this repo's own line or the lab's units), ``--uninstall``
  removes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task
from rich.console import Console

from plexilab.nightly import config as nightly_config
from plexilab.nightly import run as nightly_run
from plexilab.nightly import schedule as schedlib

console = Console()


@task(
    default=True,
    iterable=["skip"],
    help={
        "quick": 'tests with -m "not qemu and not docker" and a 40 s cluster run',
        "reports": "reports directory (default reports/ in the repo)",
        "factor": "slowdown factor counted as a regression (default 1.1)",
        "skip": f"step to skip, repeatable or comma-separated: "
        f"{', '.join(nightly_config.STEPS)}, wheels",
        "nodes": "cluster nodes (default 3)",
        "duration": "cluster load seconds (default 40 quick, 120 full)",
        "faults": "fault plan passed as --faults to a cluster task that has it "
        f"(default {nightly_config.DEFAULT_FAULTS!r}; '' for none)",
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
    faults: str = nightly_config.DEFAULT_FAULTS,
    fault_interval: float = 0.0,
    asv_results: str = "",
) -> None:
    """Run the nightly: build, tests, benchmarks, wheels, cluster; write the report."""
    if factor < 1.0:
        raise Exit("--factor must be >= 1.0", code=2)
    try:
        options = nightly_config.NightlyOptions(
            quick=quick,
            factor=float(factor),
            skip=nightly_config.expand_skip(skip or []),
            nodes=nodes,
            duration=float(duration),
            faults=faults,
            fault_interval=float(fault_interval),
        )
        if reports:
            options.reports = Path(reports).resolve()
        if asv_results:
            options.asv_results = Path(asv_results).resolve()
        result = nightly_run.run_nightly(options, console)
    except nightly_config.NightlyError as exc:
        sys.stdout.flush()
        raise Exit(f"nightly: {exc}", code=2) from None
    sys.stdout.flush()
    if result.exit_code:
        raise Exit(nightly_run.format_reasons(result.reasons), code=result.exit_code)
    console.print(f"[green]nightly OK[/green]: {result.run_dir / 'index.html'}")


@task(
    help={
        "install": "install it: the systemd timer (enabled and started), or the "
        "line in this user's crontab without systemd (idempotent)",
        "uninstall": "remove the lab's timer units and this repo's crontab line",
        "hour": "hour of the day, 0-23 (default 3)",
        "minute": "minute, 0-59 (default 0)",
        "cron": "use the crontab line even where systemd runs",
    }
)
def schedule(
    c: Context,
    install: bool = False,
    uninstall: bool = False,
    hour: int = 3,
    minute: int = 0,
    cron: bool = False,
) -> None:
    """Print (or --install / --uninstall) the nightly's schedule for this repo."""
    if install and uninstall:
        raise Exit("--install or --uninstall, not both", code=2)
    systemd = not cron and schedlib.systemd_running()
    try:
        chosen = schedlib.choose(
            nightly_config.REPO,
            hour,
            minute,
            scope=schedlib.default_scope() if systemd else None,
        )
    except nightly_config.NightlyError as exc:
        raise Exit(str(exc), code=2) from None
    if not uninstall:
        print(chosen.describe())
    if not (install or uninstall):
        return
    act = schedlib.uninstall if uninstall else schedlib.install
    try:
        done = act(chosen, schedlib.run_command, schedlib.crontab_program())
    except nightly_config.NightlyError as exc:
        raise Exit(str(exc), code=1) from None
    print("\n".join(done))


nightly = Collection("nightly", run, schedule)
