"""Invoke namespace ``inventory``: PlexiChat clusters on real hosts.

* ``invoke inventory.cluster --hosts hosts.toml`` pushes the wheel of every
  arch in the inventory, starts one node per host (``--nodes`` for more),
  runs the chat load, the P2P scenario and the checker, and prints the same
  tables (and ``--json``) as ``qemu.cluster``; exits 1 on any violation.
* ``invoke inventory.p2p --hosts hosts.toml`` runs the P2P relay scenario alone.

The inventory format is in :mod:`plexilab.providers.inventory` and the README
("Real hosts").  Only signals reach real hosts: ``--faults`` takes ``kill``
and ``pause``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task
from rich.console import Console

from plexilab.cli.qemu import finish_run
from plexilab.providers.base import ProviderUnavailable
from plexilab.providers.inventory import INVENTORY
from plexilab.run import faults as faultlib
from plexilab.run.config import ClusterConfig
from plexilab.run.inventory import run_inventory
from plexilab.run.result import RunResult, ScenarioName

console = Console()

HELP = {
    "hosts": "the inventory: a TOML file of [[host]] tables (see the README)",
    "nodes": "number of nodes (default 0: one per host)",
    "json": "write the results as JSON to this path",
    "results": "directory for journal, load/p2p/check JSON and node logs",
    "push": "build and install the wheel on every host (default); --no-push: "
    "the hosts already have plexichat at their python",
    "backend": "auto (compiled when available) or python (reference backends); "
    "default: the lab's PLEXICHAT_BACKEND* environment",
    "install": "how the lab side (load generator, checker) runs plexichat: dev "
    "(src/) or wheel (default wheel)",
}


def _run(
    hosts: str, config: ClusterConfig, scenario: ScenarioName, push: bool
) -> RunResult:
    if not hosts:
        raise Exit("--hosts is required (an inventory TOML file)", code=2)
    if not Path(hosts).is_file():
        raise Exit(f"--hosts: no such file: {hosts}", code=2)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run_inventory(
            Path(hosts),
            config,
            scenario=scenario,
            push=push,
            progress=lambda msg: console.log(f"[cyan]{msg}"),
        )
    except (ValueError, ProviderUnavailable) as exc:
        raise Exit(f"inventory {hosts}: {exc}", code=2) from None


def _check(backend: str, install: str) -> None:
    if backend not in ("", "auto", "python"):
        raise Exit("--backend must be auto or python", code=2)
    if install not in ("dev", "wheel"):
        raise Exit("--install must be dev or wheel", code=2)


@task(
    help={
        **HELP,
        "duration": "seconds of chat load (default 30)",
        "replicas": "copies of each message before it is acknowledged (default 2)",
        "clients": "concurrent load clients on the lab machine (default 8)",
        "inflight": "requests in flight per client, closed loop (default 64)",
        "channels": "number of channels (default 256)",
        "faults": "comma list of faults to inject during the load: kill, pause; "
        "default (both) or none (default none)",
        "fault_interval": "seconds between fault starts (default 20)",
    }
)
def cluster(
    c: Context,
    hosts: str = "",
    nodes: int = 0,
    duration: float = 30.0,
    json: str = "",
    replicas: int = 2,
    clients: int = 8,
    inflight: int = 64,
    channels: int = 256,
    backend: str = "",
    install: str = "wheel",
    results: str = "",
    push: bool = True,
    faults: str = "none",
    fault_interval: float = 20.0,
) -> None:
    """Run a PlexiChat cluster on the hosts of an inventory: load, P2P, checker."""
    _check(backend, install)
    try:
        kinds = faultlib.parse_kinds(faults, INVENTORY.supported_faults(), "inventory")
    except faultlib.FaultError as exc:
        raise Exit(f"--faults: {exc}", code=2) from None
    config = ClusterConfig(
        nodes=nodes,
        replicas=replicas,
        duration=duration,
        clients=clients,
        inflight=inflight,
        channels=channels,
        backend=backend or None,  # type: ignore[arg-type]
        install=install,  # type: ignore[arg-type]
        results_dir=Path(results) if results else None,
        faults=kinds,
        fault_interval=fault_interval,
        ping_timeout=1.0,  # real networks: no false suspicion on a slow hop
        suspect_timeout=5.0,
        converge_timeout=120.0,
    )
    finish_run(_run(hosts, config, "cluster", push), json, "inventory")


@task(
    help={
        **HELP,
        "count": "relays to inject (default 500)",
        "rate": "relays per second (default 100)",
        "fanout": "next hops per node in the relay tree (default 2)",
    }
)
def p2p(
    c: Context,
    hosts: str = "",
    nodes: int = 0,
    count: int = 500,
    rate: float = 100.0,
    fanout: int = 2,
    json: str = "",
    backend: str = "",
    install: str = "wheel",
    results: str = "",
    push: bool = True,
) -> None:
    """The P2P relay scenario alone across the hosts of an inventory."""
    _check(backend, install)
    config = ClusterConfig(
        nodes=nodes,
        p2p_count=count,
        p2p_rate=rate,
        p2p_fanout=fanout,
        backend=backend or None,  # type: ignore[arg-type]
        install=install,  # type: ignore[arg-type]
        results_dir=Path(results) if results else None,
        ping_timeout=1.0,
        suspect_timeout=5.0,
        converge_timeout=120.0,
    )
    finish_run(_run(hosts, config, "p2p", push), json, "inventory")


inventory = Collection("inventory", cluster, p2p)
