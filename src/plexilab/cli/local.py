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
from invoke.tasks import task
from rich.console import Console

from plexilab.providers.local import LOCAL, LocalProvider
from plexilab.results.tables import results_table, security_table
from plexilab.run import bench as benchlib
from plexilab.run import faults as faultlib
from plexilab.run import pipeline
from plexilab.run.config import ClusterConfig
from plexilab.run.result import RunResult

console = Console()

COMMON_HELP = {
    "nodes": "number of nodes (default 3)",
    "duration": "seconds of chat load (default 30)",
    "json": "write the results as JSON to this path",
    "replicas": "copies of each message before it is acknowledged (default 2)",
    "clients": "concurrent load clients (default 8)",
    "inflight": "requests in flight per client, closed loop (default 64)",
    "payload": "message payload bytes (default 64)",
    "channels": "number of channels (default 256)",
    "install": "dev: run from src/ (in-place builds); wheel: build the wheel "
    "once into a cached venv under .cache/ (default wheel)",
    "results": "directory for journal, load/p2p/check JSON and node logs",
    "connections": "connections per node shared by the load clients; 0 gives "
    "every client its own (default 1)",
}
FAULT_HELP = {
    "faults": "comma list of faults to inject during the load: "
    f"{', '.join(LOCAL.supported_faults())}; "
    "default (all of them) or none (default none)",
    "fault_interval": "seconds between fault starts (default 10)",
    "fault_duration": "seconds each fault lasts (default: half the interval)",
}


def _config(**kw: Any) -> ClusterConfig:
    return ClusterConfig(
        nodes=kw["nodes"],
        replicas=kw["replicas"],
        duration=kw["duration"],
        clients=kw["clients"],
        inflight=kw["inflight"],
        payload=kw["payload"],
        channels=kw["channels"],
        connections=kw["connections"],
        backend=kw["backend"] or None,  # "": follow the lab's environment
        install=kw["install"],
        results_dir=Path(kw["results"]) if kw["results"] else None,
        faults=kw.get("fault_kinds", []),
        fault_interval=kw.get("fault_interval", 10.0),
        fault_duration=kw.get("fault_duration", 0.0),
        ping_timeout=kw.get("ping_timeout", 0.3),
        suspect_timeout=kw.get("suspect_timeout", 1.0),
        security=kw.get("security", "auth"),
    )


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


@task(
    help={
        **COMMON_HELP,
        **FAULT_HELP,
        "backend": "auto (compiled when available) or python (reference backends); "
        "default: what PLEXICHAT_BACKEND and PLEXICHAT_BACKEND_<FAMILY> ask for",
        "ping_timeout": "failure detector: seconds a node waits for a PONG "
        "(default 0.3)",
        "suspect_timeout": "failure detector: seconds a suspected node has to "
        "refute before the others route around it (default 1)",
        "security": "auth: a per-run cluster secret, peer handshakes and client "
        "tokens; tls: that, and the load speaks TLS to the nodes (default auth)",
    }
)
def cluster(
    c: Context,
    nodes: int = 3,
    duration: float = 30.0,
    json: str = "",
    replicas: int = 2,
    backend: str = "",
    clients: int = 8,
    inflight: int = 64,
    payload: int = 64,
    channels: int = 256,
    connections: int = 1,
    install: str = "wheel",
    results: str = "",
    faults: str = "none",
    fault_interval: float = 10.0,
    fault_duration: float = 0.0,
    ping_timeout: float = 0.3,
    suspect_timeout: float = 1.0,
    security: str = "auth",
) -> None:
    """Run a local PlexiChat cluster under load and check that nothing was lost."""
    if backend not in ("", "auto", "python"):
        raise Exit("--backend must be auto or python", code=2)
    if security not in ("auth", "tls"):
        raise Exit("--security must be auth or tls", code=2)
    if install not in ("dev", "wheel"):
        raise Exit("--install must be dev or wheel", code=2)
    try:
        fault_kinds = faultlib.parse_kinds(faults, LOCAL.supported_faults(), "local")
    except faultlib.FaultError as exc:
        raise Exit(f"--faults: {exc}", code=2) from exc
    if fault_kinds and not 0 <= fault_duration < fault_interval:
        raise Exit("--fault-duration must be shorter than --fault-interval", code=2)
    config = _config(**locals())
    res = _run(config)
    console.print(results_table(res))
    _write(json, res.to_dict())
    reasons = res.verdict()
    if reasons:
        raise Exit("the run failed: " + "; ".join(reasons), code=1)


@task(
    help={
        **COMMON_HELP,
        "rounds": "alternate compiled and python runs this many times; the ratio "
        "is taken between the median throughputs (default 1)",
    }
)
def bench(
    c: Context,
    nodes: int = 3,
    duration: float = 20.0,
    json: str = "",
    replicas: int = 2,
    clients: int = 8,
    inflight: int = 64,
    payload: int = 64,
    channels: int = 256,
    connections: int = 1,
    install: str = "wheel",
    results: str = "",
    rounds: int = 1,
) -> None:
    """Run the cluster with compiled backends, then with PLEXICHAT_BACKEND=python."""
    runs = _alternate(
        dict(locals()),
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
    _write(json, doc)
    _fail_on_any(runs)


def _alternate(
    options: dict[str, Any], key: str, variants: Sequence[str], show: benchlib.Shown
) -> benchlib.Runs:
    """``options["rounds"]`` rounds of one cluster run per variant (the
    option *key* set to it), variants alternating; *show* each result."""

    def one(variant: str, results: str) -> RunResult:
        return _run(_config(**{**options, key: variant, "results": results}))

    return benchlib.alternate(
        options["rounds"], variants, one, show, options["results"]
    )


def _fail_on_any(runs: benchlib.Runs) -> None:
    """Exit 1 with every reason any of *runs* failed for."""
    reasons = benchlib.reasons(runs)
    if reasons:
        raise Exit("a run failed: " + "; ".join(reasons), code=1)


SECURITY_MODES = ("insecure", "auth", "tls")


@task(
    name="bench-security",
    help={
        **COMMON_HELP,
        "rounds": "run every mode this many times, modes alternating; "
        "medians are compared (default 3)",
    },
)
def bench_security(
    c: Context,
    nodes: int = 3,
    duration: float = 20.0,
    json: str = "",
    replicas: int = 2,
    clients: int = 8,
    inflight: int = 64,
    payload: int = 64,
    channels: int = 256,
    connections: int = 1,
    install: str = "wheel",
    results: str = "",
    rounds: int = 3,
) -> None:
    """Throughput with authentication and TLS on versus off, in one run.

    The baseline runs the nodes --insecure: the only place the lab does, to
    price authentication (goal: under 10%) and TLS (under 25%).
    """
    runs = _alternate(
        {**locals(), "backend": ""},
        "security",
        SECURITY_MODES,
        lambda round_, mode, res: console.print(
            f"round {round_ + 1} {mode}: "
            f"{benchlib.throughput(res):,.0f} msg/s, "
            f"p99 {benchlib.p99(res):.2f} ms"
        ),
    )
    summary = benchlib.security_summary(runs, SECURITY_MODES)
    console.print(security_table(summary, rounds))
    _write(json, {"medians": summary, "runs": benchlib.docs(runs)})
    _fail_on_any(runs)


local = Collection("local", cluster, bench, bench_security)
