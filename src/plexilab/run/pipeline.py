"""The one run of every provider: provision, install, start, converge, scenarios.

:func:`run` drives a :class:`~plexilab.providers.base.Provider` through

1. ``setup``: :meth:`~Provider.preflight` (may raise ``ProviderUnavailable``);
2. ``artifacts``: :meth:`~Provider.artifacts` and the lab's own plexichat
   (this checkout, or the wheel in a cached venv);
3. :meth:`~Provider.provision` (the provider times ``boot``, ``docker``...);
4. :meth:`~Provider.install` (``install``, ``clock_sync``);
5. ``host_check``: the cluster's hosts report their backend, the secret and
   (for faults) a network layer are set up;
6. ``node_start``, ``convergence``;
7. the scenarios (:mod:`plexilab.run.scenarios`), each announcing its step
   (``load``, ``p2p``, ``check``);
8. ``node_stop``, ``logs``: every node's log is copied to ``results_dir/nodes``;
9. ``teardown``: :meth:`~Provider.teardown`, always (success, failure, Ctrl-C),
   then :meth:`~Provider.report` fills the provider's part of the result.

Every step is timed (``phases_s``) and announced to the provider's samplers.
The result is a typed :class:`~plexilab.run.result.RunResult`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import posixpath
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from plexilab.host import Host, HostError
from plexilab.infra.links import LinkLayer
from plexilab.providers.base import (
    Capabilities,
    Phases,
    Provider,
    ProviderReport,
    Sampler,
    StaticProvider,
)
from plexilab.run import faults as faultlib
from plexilab.run.config import ClusterConfig, ClusterError
from plexilab.run.histograms import by_arch, hist_summary
from plexilab.run.install import Runtime, check_hosts, lab_runtime, use_runtime
from plexilab.run.labtools import terminate_as_interrupt
from plexilab.run.nodes import Cluster, NodeHandle
from plexilab.run.result import NodeResult, RunResult, ScenarioName
from plexilab.run.scenarios import RunContext, Scenario, cluster_scenarios

log = logging.getLogger("plexilab.run.pipeline")

Progress = Callable[[str], None]

# step announced -> the phase it ends
STEP_PHASES = {
    "prepared": "host_check",
    "started": "node_start",
    "converged": "convergence",
    "loaded": "load",
    "p2p": "p2p",
    "checked": "check",
    "stopped": "node_stop",
}


def _quiet(_msg: str) -> None:
    pass


def fault_plan(
    capabilities: Capabilities, config: ClusterConfig, name: str
) -> list[str]:
    """The fault kinds of *config*, checked against what the provider can do."""
    return faultlib.parse_kinds(config.faults, capabilities.supported_faults(), name)


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def make_node_dirs(cluster: Cluster) -> None:
    """Create every node's data and log directory on its host, in parallel
    (remote shells: their spawn redirects into the log without making it)."""
    by_host: dict[int, tuple[Host, set[str]]] = {}
    for node in cluster.nodes:
        dirs = by_host.setdefault(id(node.host), (node.host, set()))[1]
        dirs.update({posixpath.dirname(node.log_path), node.data_dir})
    _parallel(
        lambda item: item[0].run(["mkdir", "-p", *sorted(item[1])], timeout=60),
        list(by_host.values()),
    )


def fetch_logs(nodes: Sequence[NodeHandle], out: Path) -> None:
    """Copy every node's log to *out* (best effort)."""

    def one(node: NodeHandle) -> None:
        try:
            node.host.get(node.log_path, out / f"{node.node_id}.log")
        except (HostError, OSError) as exc:
            log.warning("no log of %s: %r", node.node_id, exc)

    _parallel(one, list(nodes))


def _backend_of(infos: Sequence[dict[str, Any] | None]) -> str:
    names = {i["backend"] for i in infos if i is not None}
    return names.pop() if len(names) == 1 else "mixed"


class _Run:
    """One pipeline run (state shared by its steps)."""

    def __init__(
        self,
        provider: Provider,
        config: ClusterConfig,
        scenarios: Sequence[Scenario],
        scenario: ScenarioName,
        phases: Phases,
        progress: Progress,
    ) -> None:
        self.provider = provider
        self.config = config
        self.scenarios = list(scenarios)
        self.phases = phases
        self.progress = progress
        self.samplers: list[Sampler] = []
        self.results_dir = Path(
            config.results_dir or tempfile.mkdtemp(prefix="plexilab-run-")
        )
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.result = RunResult(
            provider=provider.name,
            scenario=scenario,
            nodes=config.nodes,
            replicas=config.replicas,
            requested_backend=config.requested_backend,
            security=config.security,
            config={
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in asdict(config).items()
            },
            results_dir=str(self.results_dir),
        )
        self.cluster: Cluster | None = None
        self.logs_fetched = False

    def step(self, name: str, ctx: RunContext | None = None) -> None:
        if name in STEP_PHASES:
            self.phases.lap(STEP_PHASES[name])
        for sampler in self.samplers:
            sampler.on_step(name)

    def fetch_logs(self) -> None:
        if self.logs_fetched or self.cluster is None:
            return
        self.logs_fetched = True
        fetch_logs(self.cluster.nodes, self.results_dir / "nodes")

    def execute(self) -> RunResult:
        started = time.monotonic()
        provider, phases, progress = self.provider, self.phases, self.progress
        kinds = fault_plan(provider.capabilities, self.config, provider.name)
        try:
            progress(f"{provider.name}: set-up")
            with phases("setup"):
                provider.preflight(phases, progress)
            with phases("artifacts"):
                provider.artifacts(phases, progress)
                # --load=locust: the nodes serve their HTTP API (the api group)
                extras = ("api",) if self.config.load == "locust" else ()
                runtime = lab_runtime(self.config.install, extras)
            hosts = provider.provision(self.config.nodes, phases, progress)
            install_s = provider.install(hosts, phases, progress)
            self.samplers = provider.samplers()
            try:
                self.on_hosts(hosts, runtime, kinds, install_s)
            finally:
                with contextlib.suppress(Exception):
                    self.fetch_logs()
            phases.lap("logs")
            self.step("end")
        finally:
            for sampler in self.samplers:
                with contextlib.suppress(Exception):
                    sampler.stop()
            progress(f"{provider.name}: teardown")
            start = time.monotonic()
            provider.teardown()
            phases.add("teardown", time.monotonic() - start)
        self.apply(provider.report())
        self.result.wall_s = round(time.monotonic() - started, 3)
        self.result.phases_s = dict(phases.seconds)
        self.result.total_s = phases.total()
        return self.result

    def on_hosts(
        self,
        hosts: Sequence[Host],
        runtime: Runtime,
        kinds: list[str],
        install_s: dict[str, float],
    ) -> None:
        config, progress, r = self.config, self.progress, self.result
        caps = self.provider.capabilities
        progress(f"preparing hosts ({config.install})")
        use_runtime(hosts, runtime, caps)
        r.host_backends = check_hosts(hosts, runtime, config.backend_env())
        with contextlib.ExitStack() as stack:
            cluster = Cluster(hosts, config, runtime, caps)
            self.cluster = cluster
            with cluster:
                network, links = self.network(cluster, kinds, stack)
                ctx = RunContext(
                    cluster, config, r, self.results_dir, progress, network, links
                )
                if caps.remote_shell:
                    make_node_dirs(cluster)
                self.step("prepared")
                if "poweroff" in kinds:
                    # what the lab installed must survive a power cut; the
                    # nodes' own writes are what the fault puts to the test
                    for host in hosts:
                        host.run(["sync"], timeout=300)
                progress(f"starting {config.nodes} nodes")
                cluster.start()
                self.step("started")
                convergence = cluster.wait_converged()
                r.convergence_s = round(convergence, 3)
                self.step("converged")
                progress(f"converged in {convergence:.2f}s")
                for scenario in self.scenarios:
                    scenario.run(ctx)
                    self.step(scenario.step)
                infos = cluster.stats(timeout=5.0)
                r.backend = _backend_of(infos)
                r.per_node = [
                    self.node_row(node, info, install_s)
                    for node, info in zip(cluster.nodes, infos, strict=True)
                ]
                self.histograms(ctx, [n.host.arch for n in cluster.nodes])
                if links is not None and r.links is not None:
                    ids = {n.index: n.node_id for n in cluster.nodes}
                    r.links = {
                        f"{ids.get(src, 'lab')}->{ids.get(dst, '?')}": asdict(c)
                        for (src, dst), c in sorted(links.counters().items())
                    }
        self.step("stopped")
        self.fetch_logs()

    def network(
        self, cluster: Cluster, kinds: list[str], stack: contextlib.ExitStack
    ) -> tuple[faultlib.Network | None, LinkLayer | None]:
        """A partition layer when the faults need one (else None)."""
        if not faultlib.NETWORK_KINDS.intersection(kinds):
            return None, None
        if self.provider.capabilities.local_python:
            links = LinkLayer([n.lab for n in cluster.nodes]).start()
            stack.callback(links.close)  # after the nodes have stopped
            cluster.route_through(links)
            return links, links
        network = self.provider.network([(n.host, n.index) for n in cluster.nodes])
        if network is None:
            raise faultlib.FaultError(
                f"{self.provider.name} has no way to partition its nodes"
            )
        stack.callback(network.heal)
        return network, None

    def node_row(
        self,
        node: NodeHandle,
        info: dict[str, Any] | None,
        install_s: dict[str, float],
    ) -> NodeResult:
        row = NodeResult(**node.describe())
        if info is not None:
            row.backend = info["backend"]
            row.counters = info["counters"]
            row.storage = info["storage"]
            row.ring = info["ring"]
        row.install_s = install_s.get(node.host.name)
        return row

    def histograms(self, ctx: RunContext, arches: list[str]) -> None:
        r = self.result
        if ctx.send_hists:
            r.latency_by_arch = by_arch(arches, ctx.send_hists, "send")
        if ctx.relay_hists:
            r.p2p_latency_by_arch = by_arch(arches, ctx.relay_hists, "relay")
        for i, row in enumerate(r.per_node):
            if ctx.send_hists:
                row.send_latency_ms = hist_summary(ctx.send_hists[i].get("send"))
            if ctx.relay_hists:
                row.relay_latency_ms = hist_summary(ctx.relay_hists[i].get("relay"))

    def apply(self, report: ProviderReport) -> None:
        r = self.result
        r.runtime = report.runtime
        r.guests = report.guests
        r.leftover_qemu_pids = report.leftover_pids
        r.docker = report.docker
        r.containers = report.containers
        for row in r.per_node:
            host = report.hosts.get(row.host)
            if host is None:
                continue
            row.guest, row.accel, row.boot_s = host.guest, host.accel, host.boot_s
            row.vm = host.vm
            row.clock = host.clock


def run(
    provider: Provider,
    config: ClusterConfig,
    scenarios: Sequence[Scenario] | None = None,
    *,
    scenario: ScenarioName = "cluster",
    progress: Progress = _quiet,
    phases: Phases | None = None,
) -> RunResult:
    """The whole run on *provider*'s hosts (see the module docstring).

    *scenarios* default to the chat run with the faults of *config*
    (:func:`~plexilab.run.scenarios.cluster_scenarios`).  Fault kinds the
    provider cannot inject raise :class:`~plexilab.run.faults.FaultError`
    before anything starts.
    """
    if config.load == "locust" and not provider.capabilities.local_python:
        raise ClusterError(
            f"--load=locust runs on local hosts only for now, not on {provider.name}"
        )
    if scenarios is None:
        kinds = fault_plan(provider.capabilities, config, provider.name)
        scenarios = cluster_scenarios(kinds, config.load)
    job = _Run(provider, config, scenarios, scenario, phases or Phases(), progress)
    with terminate_as_interrupt():
        return job.execute()


def run_on(
    hosts: Sequence[Host],
    config: ClusterConfig,
    scenarios: Sequence[Scenario] | None = None,
    *,
    provider: str | None = None,
    progress: Progress = _quiet,
) -> RunResult:
    """:func:`run` on hosts the caller made (and closes): capabilities are the
    ones their providers declare."""
    return run(
        StaticProvider(hosts, name=provider), config, scenarios, progress=progress
    )
