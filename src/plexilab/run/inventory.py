"""Cluster and P2P runs on real hosts listed in an inventory (``hosts.toml``).

``invoke inventory.cluster --hosts hosts.toml`` and ``inventory.p2p``: the
same pipeline, scenarios and result JSON as every other provider, on the
machines of :mod:`plexilab.providers.inventory` (pinned SSH host keys; nodes
held by a lease so they die with the lab).  Node *i* runs on host
``i % len(hosts)`` and listens on that host's ``port_base + i``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from plexilab.providers.inventory import InventoryProvider
from plexilab.run import pipeline
from plexilab.run.config import ClusterConfig
from plexilab.run.result import RunResult, ScenarioName
from plexilab.run.scenarios import Scenario, cluster_scenarios, p2p_scenarios


def run_inventory(
    hosts: Path,
    config: ClusterConfig,
    *,
    scenario: ScenarioName = "cluster",
    push: bool = True,
    progress: Callable[[str], None] = lambda _msg: None,
) -> RunResult:
    """The chat run (or the P2P scenario alone) on the hosts of *hosts*.

    *push*: build the wheel and wheelhouse of every arch in the inventory and
    install them on the hosts (otherwise they must have plexichat at their
    ``python``).  A config with 0 nodes runs one node per host.
    """
    provider = InventoryProvider(hosts, push=push)
    if config.nodes <= 0:
        config = dataclasses.replace(config, nodes=len(provider.entries))
    kinds = pipeline.fault_plan(provider.capabilities, config, provider.name)
    scenarios: list[Scenario] = (
        p2p_scenarios() if scenario == "p2p" else cluster_scenarios(kinds)
    )
    return pipeline.run(
        provider, config, scenarios, scenario=scenario, progress=progress
    )
