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
from rich.console import Console

from plexilab import options
from plexilab.cli.qemu import finish_run
from plexilab.options import (
    ClusterOptions,
    FaultOptions,
    LoadOptions,
    OutputOptions,
    P2POptions,
)
from plexilab.providers.base import ProviderUnavailable
from plexilab.providers.inventory import INVENTORY
from plexilab.run import faults as faultlib
from plexilab.run.config import ClusterConfig
from plexilab.run.inventory import run_inventory
from plexilab.run.result import RunResult, ScenarioName

console = Console()

HOSTS = ("", "the inventory: a TOML file of [[host]] tables (see the README)")
PUSH = (
    True,
    "build and install the wheel on every host; --no-push: the hosts already "
    "have plexichat at their python",
)
LAB = {"converge_timeout": 120.0}


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


@options.task(
    ClusterOptions,
    LoadOptions,
    FaultOptions,
    P2POptions,
    OutputOptions,
    preset="inventory",
    name="cluster",
    extra={"hosts": HOSTS, "push": PUSH},
)
def cluster(c: Context, chosen: options.Chosen) -> None:
    """Run a PlexiChat cluster on the hosts of an inventory: load, P2P, checker."""
    faults = chosen[FaultOptions]
    try:
        faults.faults = faultlib.parse_kinds(
            faults.kinds, INVENTORY.supported_faults(), "inventory"
        )
    except faultlib.FaultError as exc:
        raise Exit(f"--faults: {exc}", code=2) from None
    config = ClusterConfig.from_chosen(chosen, **LAB)
    result = _run(chosen.extra["hosts"], config, "cluster", chosen.extra["push"])
    finish_run(result, chosen[OutputOptions].json, "inventory")


@options.task(
    ClusterOptions,
    P2POptions,
    OutputOptions,
    preset="inventory",
    name="p2p",
    extra={"hosts": HOSTS, "push": PUSH},
    defaults={"p2p_count": 500, "p2p_rate": 100.0},
)
def p2p(c: Context, chosen: options.Chosen) -> None:
    """The P2P relay scenario alone across the hosts of an inventory."""
    config = ClusterConfig.from_chosen(chosen, **LAB)
    result = _run(chosen.extra["hosts"], config, "p2p", chosen.extra["push"])
    finish_run(result, chosen[OutputOptions].json, "inventory")


inventory = Collection("inventory", cluster, p2p)
