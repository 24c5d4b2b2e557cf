"""Invoke namespace ``local``: a PlexiChat cluster of local processes.

``invoke local.cluster --nodes=3 --duration=30 --json=PATH`` starts the nodes,
waits for membership to converge, runs the chat load, the P2P scenario and
the checker, stops everything and prints a results table; it exits non-zero
when the checker found a lost, duplicated or reordered message.
``--faults=partition,kill,pause`` (or ``default``, ``none``) injects faults
during the load every ``--fault-interval`` seconds (see ``plexilab.run.faults``);
the results then carry the fault timeline and availability numbers.
``invoke local.bench`` runs it twice (compiled, then PLEXICHAT_BACKEND=python)
and prints the throughput ratio.
"""

from __future__ import annotations

import json as jsonlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from rich.console import Console

from plexilab import options
from plexilab.options import ClusterOptions, LoadOptions, OutputOptions
from plexilab.providers.local import LOCAL, LocalProvider
from plexilab.results.tables import results_table, security_table
from plexilab.run import bench as benchlib
from plexilab.run import faults as faultlib
from plexilab.run import pipeline
from plexilab.run.config import RUN_GROUPS, ClusterConfig
from plexilab.run.result import RunResult

console = Console()


def _run(config: ClusterConfig) -> RunResult:
    logging.basicConfig(level=logging.WARNING)
    provider = LocalProvider(
        workdir=config.results_dir / "hosts" if config.results_dir else None
    )
    return pipeline.run(
        provider, config, progress=lambda msg: console.log(f"[cyan]{msg}")
    )


def _write(path: str, doc: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(jsonlib.dumps(doc, indent=2) + "\n")
        console.log(f"wrote {path}")


@options.task(
    *RUN_GROUPS,
    OutputOptions,
    preset="local",
    check=options.nodes_to_start,
    name="cluster",
)
def cluster(c: Context, chosen: options.Chosen) -> None:
    """Run a local PlexiChat cluster under load and check that nothing was lost."""
    config = ClusterConfig.from_chosen(chosen)
    try:  # before anything starts
        faultlib.parse_kinds(config.kinds, LOCAL.supported_faults(), "local")
    except faultlib.FaultError as exc:
        raise Exit(f"--faults: {exc}", code=2) from None
    res = _run(config)
    console.print(results_table(res))
    _write(chosen[OutputOptions].json, res.to_dict())
    reasons = res.verdict()
    if reasons:
        raise Exit("the run failed: " + "; ".join(reasons), code=1)


BENCH_GROUPS = (ClusterOptions, LoadOptions, OutputOptions)
ROUNDS_HELP = (
    "alternate compiled and python runs this many times; the ratio is taken "
    "between the median throughputs"
)


@options.task(
    *BENCH_GROUPS,
    preset="local",
    check=options.nodes_to_start,
    name="bench",
    extra={"rounds": (1, ROUNDS_HELP)},
    defaults={"duration": 20.0},
)
def bench(c: Context, chosen: options.Chosen) -> None:
    """Run the cluster with compiled backends, then with PLEXICHAT_BACKEND=python."""
    runs = _alternate(
        chosen,
        "backend",
        ("auto", "python"),
        lambda round_, _backend, res: console.print(
            results_table(res, f"round {round_ + 1}: {res.backend}")
        ),
    )
    fast = benchlib.median_throughput(runs["auto"])
    slow = benchlib.median_throughput(runs["python"])
    ratio = fast / slow if slow else float("inf")
    name = runs["auto"][0].backend
    console.print(
        f"median throughput: {name} {fast:,.0f} msg/s, python {slow:,.0f} msg/s, "
        f"ratio [bold]{ratio:.2f}x[/bold]"
    )
    doc = {
        "ratio": ratio,
        "compiled": fast,
        "python": slow,
        "runs": benchlib.docs(runs),
    }
    _write(chosen[OutputOptions].json, doc)
    _fail_on_any(runs)


def _alternate(
    chosen: options.Chosen, key: str, variants: Sequence[str], show: benchlib.Shown
) -> benchlib.Runs:
    """``--rounds`` rounds of one cluster run per variant (the option *key*
    set to it), variants alternating; *show* each result."""
    results = chosen[OutputOptions].results

    def one(variant: str, sub: str) -> RunResult:
        lab: dict[str, Any] = {key: variant}
        lab["results_dir"] = Path(sub) if sub else None
        return _run(ClusterConfig.from_chosen(chosen, **lab))

    return benchlib.alternate(chosen.extra["rounds"], variants, one, show, results)


def _fail_on_any(runs: benchlib.Runs) -> None:
    """Exit 1 with every reason any of *runs* failed for."""
    reasons = benchlib.reasons(runs)
    if reasons:
        raise Exit("a run failed: " + "; ".join(reasons), code=1)


SECURITY_MODES = ("insecure", "auth", "tls")


@options.task(
    *BENCH_GROUPS,
    preset="local",
    check=options.nodes_to_start,
    name="bench-security",
    extra={
        "rounds": (
            3,
            "run every mode this many times, modes alternating; medians are compared",
        )
    },
    defaults={"duration": 20.0},
)
def bench_security(c: Context, chosen: options.Chosen) -> None:
    """Throughput with authentication and TLS on versus off, in one run.

    The baseline runs the nodes --insecure: the only place the lab does, to
    price authentication (goal: under 10%) and TLS (under 25%).
    """
    runs = _alternate(
        chosen,
        "security",
        SECURITY_MODES,
        lambda round_, mode, res: console.print(
            f"round {round_ + 1} {mode}: "
            f"{benchlib.throughput(res):,.0f} msg/s, "
            f"p99 {benchlib.p99(res):.2f} ms"
        ),
    )
    summary = benchlib.security_summary(runs, SECURITY_MODES)
    console.print(security_table(summary, chosen.extra["rounds"]))
    _write(
        chosen[OutputOptions].json, {"medians": summary, "runs": benchlib.docs(runs)}
    )
    _fail_on_any(runs)


local = Collection("local", cluster, bench, bench_security)
