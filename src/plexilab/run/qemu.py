"""PlexiChat clusters in QEMU guests: ``invoke qemu.cluster`` and ``invoke qemu.p2p``.

One guest per node; ``--arch=mixed`` cycles x86_64, aarch64, aarch64, ...
The run is the one pipeline (:mod:`plexilab.run.pipeline`) over the QEMU
provider (:class:`plexilab.providers.guests.QemuProvider`): host set-up
(``setup_host.ensure``), artifacts (per-arch wheel + wheelhouse, cached
images), boot (all guests in parallel), install (in parallel), guest clock
sync, start, convergence, the scenarios (chat load, P2P, checker; or P2P
alone) and teardown.  Every phase is timed (``phases_s`` in the result JSON).

Where a local run leaves them empty, the JSON holds, per node, the
guest's arch, accelerator, boot time, QMP-sampled VM figures (vCPU and QEMU
process CPU seconds, CPU use during the load, RSS) and the residual clock
offset after the sync; ``latency_by_arch`` merges the nodes' own SEND->ACK
histograms (owner receives -> acknowledged after replication) per arch and
``p2p_latency_by_arch`` their RELAY propagation histograms.

The guests' clocks come from the RTC (1 s granularity) and P2P latency is
measured against the sender's wall clock, so each guest's clock is set from
the host's before the nodes start (an NTP-style exchange with a tiny server
in the guest on a forwarded port; the residual offset is reported).

When QEMU cannot run here (host set-up impossible, no ``qemu-system-*``
binary, no image, guests failing to boot under TCG) the run falls back to
local processes with a loud banner (``--fallback=local``, the default) and
records ``"provider": "local"`` and ``"fallback_reason"``; with
``--fallback=none`` it fails with the reason instead.

``runtime="docker"`` (``--runtime=docker``) boots the ``docker`` image variant
instead, starts each guest's engine, loads the PlexiChat image built on the
lab host (``docker save`` | gzip | ``docker load`` over SSH) and runs the
nodes as containers on the guests' host networks
(:mod:`plexilab.providers.docker_in_guests`):
same ports, load, P2P and checker; every container and volume is removed
before the guests shut down.  x86_64 guests only (the image is built for the
lab host's arch).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.panel import Panel

from plexilab import options
from plexilab.infra.wheels import host_arch
from plexilab.options import QemuOptions
from plexilab.providers.base import Phases, Progress, Provider, ProviderUnavailable
from plexilab.providers.docker_in_guests import DockerInGuestsProvider
from plexilab.providers.guests import (
    Artifacts,
    GuestPlan,
    QemuProvider,
    clock_port,
    node_arches,
    qemu_unavailable,
)
from plexilab.providers.local import LocalProvider
from plexilab.providers.qemu import GuestSpec, QemuLab
from plexilab.run import pipeline
from plexilab.run.config import ClusterConfig
from plexilab.run.result import RunResult, ScenarioName
from plexilab.run.scenarios import Scenario, cluster_scenarios, p2p_scenarios

__all__ = [
    "Artifacts", "QemuClusterOptions", "QemuUnavailable", "clock_port", "failed",
    "guest_specs", "node_arches", "qemu_unavailable", "run", "run_local", "run_qemu",
]  # fmt: skip

ArchMode = Literal["mixed", "x86_64", "aarch64"]
Fallback = Literal["local", "none"]
Runtime = Literal["process", "docker"]

# QEMU cannot run here (the message says why): the provider's preflight,
# artifacts and boot raise it before any node ran
QemuUnavailable = ProviderUnavailable


@dataclass
@options.preset("qemu")
class QemuClusterOptions(ClusterConfig, QemuOptions):
    """One ``invoke qemu.cluster`` / ``qemu.p2p`` run.

    Every option is declared once in :mod:`plexilab.options`; the ``qemu``
    preset sizes the load for TCG guests (~13x slower than the host): fewer
    clients and a smaller window than ``local.cluster``, and membership
    timeouts that a busy emulated CPU does not trip.  ``install`` is how the
    lab's own tools (and local fallback nodes) run; the guests always run the
    pushed wheel.
    """

    results: Path | None = None
    name_prefix: str = "qc"
    converge_timeout: float = 120.0

    def validate(self) -> None:
        if self.nodes < 1:
            raise ValueError("--nodes must be at least 1")
        if self.runtime == "docker":
            foreign = sorted(set(node_arches(self.nodes, self.arch)) - {host_arch()})
            if foreign:
                raise ValueError(
                    f"--runtime=docker runs the PlexiChat image built for this "
                    f"host ({host_arch()}); no {', '.join(foreign)} image: use "
                    f"--arch={host_arch()}"
                )

    def cluster_config(self, results_dir: Path) -> ClusterConfig:
        """The cluster part of these options (same names), results in *results_dir*."""
        shared = {f.name: getattr(self, f.name) for f in fields(ClusterConfig)}
        return ClusterConfig(**{**shared, "results_dir": results_dir})

    def plan(self, results_dir: Path | None = None) -> GuestPlan:
        """The guests of this run."""
        return GuestPlan(
            nodes=self.nodes,
            arch=self.arch,
            port_base=self.port_base,
            boot_timeout=self.boot_timeout,
            memory_mib=self.memory_mib or None,
            name_prefix=self.name_prefix,
            clock_sync=self.clock_sync,
            variant="docker" if self.runtime == "docker" else "",
            log_dir=results_dir / "guests" if results_dir is not None else None,
        )


def guest_specs(
    options: QemuClusterOptions, artifacts: Artifacts | None
) -> list[GuestSpec]:
    """One guest per node, with the clock port forwarded and the deps disk attached.

    With the docker runtime (*artifacts* None) the guests boot the docker
    image variant and get no deps disk.
    """
    return options.plan().specs(artifacts)


def _results_dir(options: QemuClusterOptions) -> Path:
    path = options.results or Path(tempfile.mkdtemp(prefix="plexilab-qemu-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _scenarios(scenario: ScenarioName, kinds: list[str]) -> list[Scenario]:
    return p2p_scenarios() if scenario == "p2p" else cluster_scenarios(kinds)


def qemu_provider(options: QemuClusterOptions, results_dir: Path) -> QemuProvider:
    """The provider of *options*' guests (process or docker runtime)."""
    plan = options.plan(results_dir)
    if options.runtime == "docker":
        return DockerInGuestsProvider(plan, lab_factory=QemuLab)
    return QemuProvider(plan, lab_factory=QemuLab)


def _run(
    provider: Provider,
    options: QemuClusterOptions,
    results_dir: Path,
    scenario: ScenarioName,
    progress: Progress,
) -> RunResult:
    config = options.cluster_config(results_dir)
    kinds = pipeline.fault_plan(provider.capabilities, config, provider.name)
    result = pipeline.run(
        provider,
        config,
        _scenarios(scenario, kinds),
        scenario=scenario,
        progress=progress,
        phases=Phases(),
    )
    result.arch_mode = options.arch
    return result


def run_qemu(
    options: QemuClusterOptions,
    *,
    scenario: ScenarioName = "cluster",
    progress: Progress = lambda _msg: None,
) -> RunResult:
    """The whole QEMU run; raises :class:`QemuUnavailable` before any guest ran."""
    results_dir = _results_dir(options)
    provider = qemu_provider(options, results_dir)
    return _run(provider, options, results_dir, scenario, progress)


def run_local(
    options: QemuClusterOptions,
    reason: str,
    *,
    scenario: ScenarioName = "cluster",
    progress: Progress = lambda _msg: None,
) -> RunResult:
    """The same run on local processes (the fallback), with *reason* recorded."""
    results_dir = _results_dir(options)
    provider = LocalProvider(workdir=results_dir / "hosts")
    result = _run(provider, options, results_dir, scenario, progress)
    result.fallback_reason = reason
    return result


def fallback_banner(reason: str) -> Panel:
    return Panel(
        f"[bold]QEMU cannot run here:[/bold] {reason}\n\n"
        "Falling back to LOCAL PROCESSES (host arch only, no emulation). "
        'The result JSON records "provider": "local" and the reason. '
        "Use --fallback=none to fail instead.",
        title="FALLBACK: local processes instead of QEMU guests",
        style="bold yellow",
    )


def run(
    options: QemuClusterOptions,
    *,
    scenario: ScenarioName = "cluster",
    console: Console | None = None,
) -> RunResult:
    """QEMU run, or (when QEMU cannot run and ``fallback == "local"``) local."""
    console = console or Console()

    def progress(msg: str) -> None:
        console.log(f"[cyan]{msg}")

    try:
        return run_qemu(options, scenario=scenario, progress=progress)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted: the nodes and guests were shut down")
        raise
    except QemuUnavailable as exc:
        reason = str(exc)
        if options.fallback != "local":
            raise
        console.print(fallback_banner(reason))
        return run_local(options, reason, scenario=scenario, progress=progress)


def failed(result: RunResult) -> list[str]:
    """Why the run counts as failed (empty when it passed)."""
    return result.verdict()
