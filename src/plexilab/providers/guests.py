"""The QEMU provider: one guest per node, booted for a run and powered off after.

:class:`QemuProvider` implements :class:`~plexilab.providers.base.Provider`:

* ``preflight``: a usable ``/dev``, the host set-up (``setup_host.ensure``),
  the ``qemu-system-*`` binaries;
* ``artifacts``: the per-arch wheel and wheelhouse, the cached guest images;
* ``provision``: boot every guest in parallel (``boot``), start a VM sampler
  and the guest clock servers (``clock_sync``);
* ``install``: the per-arch wheel on every guest in parallel (``install``),
  then the guests' clocks are set from the host's (``clock_sync``);
* ``network``: partitions through the guestfwd relays
  (:class:`~plexilab.providers.qemu.RelayNetwork`);
* ``teardown``: every guest powered off; QEMU processes still alive 10 s
  later are reported (``leftover_qemu_pids``) and fail the run;
* ``report``: per guest its arch, accelerator, boot time, QMP-sampled VM
  figures and clock offsets.

Any failure before a guest ran raises
:class:`~plexilab.providers.base.ProviderUnavailable` (the run may fall back
to local processes).  ``runtime="docker"`` is
:class:`plexilab.providers.docker_in_guests.DockerInGuestsProvider`.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plexilab.host import Endpoint, Host, HostError
from plexilab.infra import images, machine, setup_host
from plexilab.infra.artifacts import ensure_artifacts
from plexilab.infra.ssh import SSHHost
from plexilab.proc import proc_starttime, wait_until
from plexilab.providers.base import (
    HostReport,
    Phases,
    Progress,
    Provider,
    ProviderReport,
    ProviderUnavailable,
    Sampler,
)
from plexilab.providers.clock import GuestClocks, start_clock_server
from plexilab.providers.qemu import QEMU, GuestSpec, QemuLab, RelayNetwork
from plexilab.providers.vmsampler import VmSampler

MIXED_CYCLE = ("x86_64", "aarch64", "aarch64")
Artifacts = Mapping[str, tuple[Path, Path]]


def node_arches(nodes: int, arch: str) -> list[str]:
    """Arch of each node: *arch*, or for ``mixed`` x86_64, aarch64, aarch64, ..."""
    if arch == "mixed":
        return [MIXED_CYCLE[i % len(MIXED_CYCLE)] for i in range(nodes)]
    return [arch] * nodes


def clock_port(port_base: int) -> int:
    """The guest port of the clock server (just below the node ports)."""
    return port_base - 1


@dataclass
class GuestPlan:
    """The guests of a QEMU run (one per node)."""

    nodes: int = 3
    arch: str = "mixed"
    port_base: int = 7100
    boot_timeout: float = 180.0
    memory_mib: int | None = None
    name_prefix: str = "qc"
    clock_sync: bool = True
    variant: str = ""  # guest image variant ("docker")
    log_dir: Path | None = None

    @property
    def arches(self) -> list[str]:
        return node_arches(self.nodes, self.arch)

    def specs(self, artifacts: Artifacts | None) -> list[GuestSpec]:
        """One guest per node, with the clock port forwarded and (*artifacts*)
        the deps disk of its arch attached."""
        extra = [clock_port(self.port_base)] if self.clock_sync else []
        return [
            GuestSpec(
                f"{self.name_prefix}{i}-{'x86' if arch == 'x86_64' else 'arm'}",
                arch,
                nodes=[i],
                memory_mib=self.memory_mib,
                extra_ports=list(extra),
                wheelhouse=artifacts[arch][1] if artifacts is not None else None,
                variant=self.variant,
            )
            for i, arch in enumerate(self.arches)
        ]


def qemu_unavailable(arches: Sequence[str]) -> str | None:
    """Why QEMU guests of *arches* cannot run here (None when they can).

    Runs the host set-up (installs what is missing as root).
    """
    for dev in ("/dev/null", "/dev/urandom"):
        try:
            if not stat.S_ISCHR(os.stat(dev).st_mode):
                return f"{dev} is not a character device (no usable /dev)"
        except OSError as exc:
            return f"no usable /dev ({dev}: {exc.strerror})"
    try:
        setup_host.ensure()
    except setup_host.HostSetupError as exc:
        return f"host set-up failed: {exc}"
    for arch in sorted(set(arches)):
        binary = images.load_profile(arch).qemu
        if shutil.which(binary) is None:
            return f"{binary} is not installed and `invoke setup` could not install it"
    if shutil.which("qemu-img") is None:
        return "qemu-img is not installed"
    return None


def leftover_pids(pids: Sequence[int], timeout: float = 10.0) -> list[int]:
    """Those of *pids* (QEMU processes of this run) still alive after *timeout*."""

    def left() -> list[int]:
        return [p for p in pids if proc_starttime(p) is not None]

    wait_until(lambda: not left(), timeout, interval=0.1)
    return left()


def parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def install_all(hosts: Sequence[Host], artifacts: Artifacts) -> dict[str, float]:
    """Install the per-arch wheel on every SSH host in parallel; seconds per host."""

    def one(host: SSHHost) -> float:
        wheel, house = artifacts[host.arch]
        return host.install(wheel, house).seconds

    ssh_hosts = [h for h in hosts if isinstance(h, SSHHost)]
    seconds = parallel(one, ssh_hosts)
    return {h.name: round(s, 2) for h, s in zip(ssh_hosts, seconds, strict=True)}


class QemuProvider(Provider):
    """One QEMU guest per node (see the module docstring)."""

    name = "qemu"
    capabilities = QEMU

    def __init__(self, plan: GuestPlan, lab_factory: type[QemuLab] = QemuLab) -> None:
        self.plan = plan
        self.lab_factory = lab_factory
        self.wheels: Artifacts | None = None
        self.specs: list[GuestSpec] = []
        self.lab: QemuLab | None = None
        self.sampler: VmSampler | None = None
        self.clocks: GuestClocks | None = None
        self.pids: list[int] = []
        self.left: list[int] = []

    @property
    def needed(self) -> list[str]:
        return sorted(set(self.plan.arches))

    def preflight(self, phases: Phases, progress: Progress) -> None:
        reason = qemu_unavailable(self.needed)
        if reason:
            raise ProviderUnavailable(reason)

    def artifacts(self, phases: Phases, progress: Progress) -> None:
        progress(f"artifacts for {', '.join(self.needed)} (images, wheels)")
        self.wheels = {a: ensure_artifacts(a, progress=progress) for a in self.needed}
        self.check_images()

    def check_images(self) -> None:
        try:
            if self.plan.variant:
                images.images_for(self.needed, self.plan.variant)
            else:
                images.images_for(self.needed)
        except Exception as exc:
            raise ProviderUnavailable(f"no guest image: {exc}") from exc

    def provision(self, nodes: int, phases: Phases, progress: Progress) -> list[Host]:
        self.specs = self.plan.specs(self.wheels)
        lab = self.lab = self.lab_factory(
            self.specs,
            port_base=self.plan.port_base,
            boot_timeout=self.plan.boot_timeout,
            log_dir=self.plan.log_dir,
        )
        progress(f"booting {len(self.specs)} guests in parallel")
        with phases("boot"):
            try:
                lab.start()
            except (machine.MachineError, HostError, OSError, TimeoutError) as exc:
                raise ProviderUnavailable(
                    f"guests did not boot ({type(exc).__name__}): {exc}"
                ) from exc
        self.pids = [m.pid for m in lab.machines if m.pid]
        accels = sorted({m.accel for m in lab.machines})
        progress(
            "booted in "
            + ", ".join(f"{n} {s:.1f}s" for n, s in lab.boot_seconds.items())
            + f" ({'/'.join(accels)})"
        )
        self.sampler = VmSampler(lab.machines).start()
        if self.plan.clock_sync:
            port = clock_port(self.plan.port_base)
            with phases("clock_sync"):
                parallel(lambda h: start_clock_server(h, port), lab.hosts)
                self.clocks = GuestClocks(
                    {
                        h.name: Endpoint("127.0.0.1", h.machine.forwards[port])
                        for h in lab.hosts
                    }
                )
        return list(lab.hosts)

    def install(
        self, hosts: Sequence[Host], phases: Phases, progress: Progress
    ) -> dict[str, float]:
        seconds: dict[str, float] = {}
        if self.wheels is not None:
            progress("installing the wheels (in parallel)")
            with phases("install"):
                seconds = install_all(hosts, self.wheels)
        if self.clocks is not None:
            with phases("clock_sync"):
                self.clocks.sync()
        return seconds

    def samplers(self) -> list[Sampler]:
        out: list[Sampler] = []
        if self.sampler is not None:
            out.append(self.sampler)
        if self.clocks is not None:
            out.append(self.clocks)
        return out

    def network(self, nodes: Sequence[tuple[Host, int]]) -> RelayNetwork:
        return RelayNetwork(nodes)

    def teardown(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.lab is not None:
            self.lab.close()
        self.left = leftover_pids(self.pids) if self.pids else []

    def report(self) -> ProviderReport:
        report = ProviderReport(runtime="process", leftover_pids=list(self.left))
        if self.lab is None:
            return report
        for host, spec in zip(self.lab.hosts, self.specs, strict=True):
            m = host.machine
            vm = self.sampler.summary(host.name) if self.sampler else {}
            boot_s = round(self.lab.boot_seconds[host.name], 2)
            report.guests.append(
                {
                    "name": host.name,
                    "arch": host.arch,
                    "accel": m.accel,
                    "boot_s": boot_s,
                    "memory_mib": m.config.memory_mib or m.profile.memory_mib,
                    "smp": m.config.smp or m.profile.smp,
                    "nodes": spec.nodes,
                    "vm": vm,
                }
            )
            clock = self.clocks.report(host.name) if self.clocks else None
            report.hosts[host.name] = HostReport(
                guest=host.name, accel=m.accel, boot_s=boot_s, vm=vm, clock=clock
            )
        return report
