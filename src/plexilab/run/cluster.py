"""Cluster runs: the names callers use, and :func:`run_cluster` on given hosts.

The work lives in the run layer's modules: :mod:`plexilab.run.config`
(``ClusterConfig``), :mod:`plexilab.run.install` (wheel, venv, ``prepare``),
:mod:`plexilab.run.nodes` (``Cluster``), :mod:`plexilab.run.scenarios` and
:mod:`plexilab.run.pipeline` (the one run of every provider), and
:mod:`plexilab.run.result` (the typed ``RunResult``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from plexilab.host import Host
from plexilab.run.config import (
    BACKEND_VAR,
    ClusterConfig,
    ClusterError,
    InstallMode,
    lab_backend_env,
)
from plexilab.run.credentials import SECRET_NAME, admin_token, write_secret_file
from plexilab.run.install import (
    CACHE,
    ROOT,
    SRC,
    Runtime,
    build_wheel,
    check_hosts,
    is_local,
    local_venv,
    prepare,
    prune,
    source_key,
)
from plexilab.run.labtools import run_lab, stats_all
from plexilab.run.nodes import Cluster, NodeHandle, tail
from plexilab.run.pipeline import run_on
from plexilab.run.result import RunResult

__all__ = [
    "BACKEND_VAR", "CACHE", "ROOT", "SECRET_NAME", "SRC", "Cluster", "ClusterConfig",
    "ClusterError", "InstallMode", "NodeHandle", "RunResult", "Runtime",
    "admin_token", "build_wheel", "check_hosts", "is_local", "lab_backend_env",
    "local_venv", "prepare", "prune", "run_cluster", "run_lab", "source_key",
    "stats_all", "tail", "verdict", "write_secret_file",
]  # fmt: skip


def run_cluster(
    hosts: Sequence[Host],
    config: ClusterConfig,
    *,
    progress: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """The chat run (load, P2P, checker; faults of *config*) on *hosts*, which
    the caller made and closes; the result's JSON document.

    The pipeline with a :class:`~plexilab.providers.base.StaticProvider`:
    the hosts' capabilities are the ones their providers declare.
    """
    return run_on(hosts, config, progress=progress).to_dict()


def verdict(result: RunResult | Mapping[str, Any]) -> list[str]:
    """Why a run failed (empty when it passed): see :meth:`RunResult.verdict`."""
    if not isinstance(result, RunResult):
        result = RunResult.from_dict(dict(result))
    return result.verdict()
