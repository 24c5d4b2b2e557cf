"""What a run does once its cluster has converged: scenario objects.

The pipeline (:mod:`plexilab.run.pipeline`) runs its scenarios in order on a
:class:`RunContext` and, after each, announces the scenario's ``step`` to the
phases and samplers.  A scenario fills its own fields of the
:class:`~plexilab.run.result.RunResult`:

* :class:`Load`: the chat load (``acked``, ``throughput_msgs_per_s``, ...)
  and the nodes' SEND histograms; :class:`LocustLoad` the same through the
  nodes' HTTP API with Locust (``--load=locust``);
* :class:`Faults`: a :class:`~plexilab.run.faults.Nemesis` breaking the
  cluster during a load, then healing and waiting for it to converge again
  (``faults``, ``availability``, ...);
* :class:`P2P`: the P2P relay scenario and the nodes' RELAY histograms;
* :class:`Check`: the checker over the load's journal (the checker counts).

``cluster_scenarios`` is the chat run (load, P2P, check); ``[P2P(full=True)]``
is ``qemu.p2p`` / ``inventory.p2p``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from plexilab.infra.links import LinkLayer
from plexilab.run import faults as faultlib
from plexilab.run.config import ClusterConfig
from plexilab.run.labtools import node_histograms
from plexilab.run.nodes import Cluster
from plexilab.run.result import RunResult

CHECK_COUNTS = (
    "lost", "duplicated", "reordered", "seq_mismatch", "shared_seq", "gaps",
    "replica_missing", "divergence",
)  # fmt: skip


@dataclass
class RunContext:
    """What a scenario works with (one converged cluster)."""

    cluster: Cluster
    config: ClusterConfig
    result: RunResult
    results_dir: Path
    progress: Callable[[str], None]
    network: faultlib.Network | None = None
    links: LinkLayer | None = None
    send_hists: list[dict[str, Any]] = field(default_factory=list)
    relay_hists: list[dict[str, Any]] = field(default_factory=list)

    @property
    def journal(self) -> Path:
        """The load's journal of acknowledged messages (the checker reads it)."""
        return self.results_dir / "journal.bin"


class Scenario(Protocol):
    """One thing a run does on its converged cluster."""

    @property
    def step(self) -> str:
        """The step announced once it is done ("loaded", "p2p", "checked")."""

    def run(self, ctx: RunContext) -> None:
        """Run it and fill its fields of ``ctx.result``."""


@dataclass
class Load:
    """The chat load; the nodes' SEND histograms afterwards."""

    step: str = "loaded"

    def drive(self, ctx: RunContext) -> dict[str, Any]:
        ctx.journal.unlink(missing_ok=True)
        return ctx.cluster.run_load(ctx.journal, ctx.results_dir / "load.json")

    def collect(self, ctx: RunContext, load: dict[str, Any]) -> None:
        r = ctx.result
        r.load = load
        r.acked = load["acked"]
        r.failures = load["failures"]
        r.throughput_msgs_per_s = load["throughput_msgs_per_s"]
        r.latency_ms = load["latency_ms"]
        r.timeline = load.get("timeline") or []
        ctx.send_hists = node_histograms(
            ctx.cluster.lab_endpoints, secret=ctx.cluster.secret
        )
        ctx.progress(f"acked {r.acked} at {r.throughput_msgs_per_s:.0f} msg/s")

    def run(self, ctx: RunContext) -> None:
        ctx.progress(f"loading for {ctx.config.duration:g}s")
        self.collect(ctx, self.drive(ctx))


@dataclass
class LocustLoad(Load):
    """The chat load as Locust users over the nodes' HTTP API
    (``--load=locust``): the same result fields as :class:`Load`, Locust's
    per-request statistics in ``load["locust"]``."""

    def drive(self, ctx: RunContext) -> dict[str, Any]:
        ctx.journal.unlink(missing_ok=True)
        return ctx.cluster.run_locust(ctx.journal, ctx.results_dir)

    def run(self, ctx: RunContext) -> None:
        c = ctx.config
        ctx.progress(
            f"locust: {c.users} users (+{c.spawn_rate:g}/s) for {c.duration:g}s"
        )
        self.collect(ctx, self.drive(ctx))


@dataclass
class Faults:
    """A nemesis breaking the cluster during *load*; healed, then converged."""

    kinds: Sequence[str]
    load: Load = field(default_factory=Load)

    @property
    def step(self) -> str:
        return self.load.step

    def run(self, ctx: RunContext) -> None:
        c = ctx.config
        nemesis = faultlib.Nemesis(
            ctx.cluster,
            self.kinds,
            interval=c.fault_interval,
            duration=c.fault_duration,
            horizon=c.duration,
            network=ctx.network,
            ready=ctx.journal.exists,
        ).start()
        ctx.progress(
            f"loading for {c.duration:g}s; faults: {','.join(self.kinds)} every "
            f"{c.fault_interval:g}s for {nemesis.duration:g}s"
        )
        try:
            load = self.load.drive(ctx)
        finally:
            nemesis.stop()
        ctx.progress(
            f"{len(nemesis.faults)} faults injected and healed; "
            "waiting for the cluster to converge"
        )
        healed = time.monotonic()
        # handoffs after long faults can stream whole channels again
        ctx.cluster.wait_converged(timeout=10 * c.converge_timeout)
        recovery = time.monotonic() - healed
        self.load.collect(ctx, load)
        # the fault windows, availability inside/outside them
        r = ctx.result
        t0 = float(load.get("started_unix") or 0.0)
        rows = nemesis.timeline(t0) if t0 else []
        interval = float(load.get("timeline_interval_s") or 1)
        r.faults = rows
        r.fault_errors = nemesis.errors
        r.fault_counts = {k: sum(f["kind"] == k for f in rows) for k in self.kinds}
        r.recovery_s = round(recovery, 3)
        r.availability = faultlib.availability(r.timeline, rows, interval)
        r.fault_service = faultlib.service(r.timeline, rows, interval)
        r.links = {}  # the lab link layer's counters, filled at the end


@dataclass
class P2P:
    """The P2P relay scenario; the nodes' RELAY histograms afterwards.

    *full*: ``p2p_latency_ms`` keeps every percentile (a P2P-only run), not
    only p50/p99.
    """

    full: bool = False
    step: str = "p2p"

    def run(self, ctx: RunContext) -> None:
        ctx.progress(f"p2p ({ctx.config.p2p_count} relays)")
        p2p = ctx.cluster.run_p2p(ctx.results_dir / "p2p.json")
        r = ctx.result
        r.p2p = p2p
        r.p2p_coverage = p2p["coverage"]
        latency = dict(p2p["p2p_latency_ms"])
        r.p2p_latency_ms = (
            latency if self.full else {k: latency[k] for k in ("p50", "p99")}
        )
        ctx.relay_hists = node_histograms(
            ctx.cluster.lab_endpoints, secret=ctx.cluster.secret
        )


@dataclass
class Check:
    """The checker over the load's journal (and every replica's history)."""

    step: str = "checked"

    def run(self, ctx: RunContext) -> None:
        ctx.progress("checking")
        check = ctx.cluster.run_check(ctx.journal, ctx.results_dir / "check.json")
        r = ctx.result
        r.check = check
        for name in CHECK_COUNTS:
            setattr(r, name, check[name])
        r.replicas_checked = check["replicas_checked"]
        r.checked_channels = check["channels"]
        r.violations = check["violations"]


def cluster_scenarios(
    kinds: Sequence[str] = (), engine: str = "binary"
) -> list[Scenario]:
    """The chat run: load (with faults when *kinds*), P2P, checker; the load
    is Locust's HTTP users when *engine* is ``locust``."""
    chat = LocustLoad() if engine == "locust" else Load()
    load: Scenario = Faults(kinds, chat) if kinds else chat
    return [load, P2P(), Check()]


def p2p_scenarios() -> list[Scenario]:
    """The P2P relay scenario alone."""
    return [P2P(full=True)]
