"""QEMU guests as :class:`~plexilab.host.Host` objects.

``QemuLab`` boots a set of guests (one per :class:`GuestSpec`), each running
the nodes whose cluster indexes it lists, and hands out one ``QemuHost`` per
guest.  Ports are planned before any guest starts:

* node *i* listens in its guest on ``0.0.0.0:<port_base + i>``
  (``listen_endpoint``);
* the lab reaches it on ``127.0.0.1:<free host port>`` through a ``hostfwd``
  rule (``lab_endpoint``);
* another guest reaches it on ``10.0.2.<100 + slot>:<port_base + i>``, a
  ``guestfwd`` address whose relay bridges to that same 127.0.0.1 host port
  (``peer_endpoint``).  A node on the same guest uses ``127.0.0.1``.

Faults (``plexilab.run.faults``): ``pause`` is QMP stop/cont of the guest,
``poweroff`` a QMP stop + system_reset (no guest shutdown: what the guest had
not written to its disk is lost) until ``power_on`` boots it again, and
partitions are made by the guestfwd relays (:class:`RelayNetwork`).

Usage::

    specs = [GuestSpec("g0", "x86_64", [0]), GuestSpec("g1", "aarch64", [1])]
    with QemuLab(specs) as lab:
        for host in lab.hosts:
            host.install(wheel[host.arch], wheelhouse[host.arch])
        ...
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from plexilab.host import Endpoint, Host, HostError, Process
from plexilab.infra import rundir
from plexilab.infra.depsdisk import DEPS_MOUNT, deps_disk
from plexilab.infra.machine import (
    GuestLink,
    Machine,
    MachineConfig,
    free_port,
    link_address,
)
from plexilab.infra.ssh import SSHHost
from plexilab.infra.sshclient import SSHClient, public_key
from plexilab.infra.wheels import REPO
from plexilab.providers.base import FAULT_KINDS, Capabilities, register

DEFAULT_PORT_BASE = 7100
GUEST_VENV_PYTHON = "/opt/plexichat/bin/python"
GUEST_WORKDIR = "/root/plexilab"


@dataclass
class GuestSpec:
    """One guest of a lab: its arch and the cluster indexes of its nodes."""

    name: str
    arch: str
    nodes: list[int] = field(default_factory=list)
    memory_mib: int | None = None
    smp: int | None = None
    accel: str = "auto"
    seed_files: dict[str, bytes] = field(default_factory=dict)
    extra_ports: list[int] = field(default_factory=list)  # more guest ports to forward
    wheelhouse: Path | None = None  # attach a deps disk made from this wheelhouse
    variant: str = ""  # guest image variant ("docker": Debian's docker.io)


class QemuHost(SSHHost):
    """A booted guest (a :class:`Machine`) reached over SSH."""

    def __init__(
        self,
        machine: Machine,
        *,
        slot: int,
        nodes: Sequence[int] = (),
        port_base: int = DEFAULT_PORT_BASE,
        python: str = GUEST_VENV_PYTHON,
        workdir: str = GUEST_WORKDIR,
    ) -> None:
        super().__init__(
            machine.name,
            machine.arch,
            machine.ssh,
            python=python,
            workdir=workdir,
            deps=DEPS_MOUNT if machine.config.deps_disk is not None else None,
        )
        self.machine = machine
        self.slot = slot
        self.nodes = list(nodes)
        self.port_base = port_base

    def guest_port(self, index: int) -> int:
        return self.port_base + index

    def _check(self, index: int) -> int:
        port = self.guest_port(index)
        if port not in self.machine.forwards:
            raise HostError(
                f"{self.name} has no port for node {index} (nodes {self.nodes})"
            )
        return port

    def listen_endpoint(self, index: int) -> Endpoint:
        return Endpoint("0.0.0.0", self._check(index))

    def lab_endpoint(self, index: int) -> Endpoint:
        return Endpoint("127.0.0.1", self.machine.forwards[self._check(index)])

    def peer_endpoint(self, index: int, from_host: Host) -> Endpoint:
        port = self._check(index)
        if from_host is self:
            return Endpoint("127.0.0.1", port)
        if isinstance(from_host, QemuHost):
            address = link_address(self.slot)
            if not any(
                link.address == address and link.port == port
                for link in from_host.machine.config.links
            ):
                raise HostError(
                    f"{from_host.name} has no guestfwd link to {address}:{port}"
                )
            return Endpoint(address, port)
        return self.lab_endpoint(index)  # a process on the lab machine itself

    def prepare(self) -> None:
        """Create the work directory."""
        self.ssh.run(["mkdir", "-p", self._workdir], timeout=30)

    # -- faults ------------------------------------------------------------

    def pause(self, process: Process) -> None:
        """Freeze the whole guest (QMP stop)."""
        self.machine.qmp("stop")

    def resume(self, process: Process) -> None:
        """QMP cont (harmless on a running guest)."""
        self.machine.qmp("cont")

    def power_off(self) -> None:
        """Pull the plug: the guest stops at once and is reset, without a shutdown.

        It stays off (stopped in reset) until :meth:`power_on`.  Guests run
        with ``-no-reboot`` (QEMU exits on a reset): the reset action is
        switched to a reset for this.
        """
        self.machine.qmp("set-action", {"reboot": "reset"})
        self.machine.qmp("stop")
        self.machine.qmp("system_reset")

    def power_on(self, timeout: float = 300.0) -> None:
        """Boot the guest again after :meth:`power_off`; return once SSH answers."""
        self.machine.qmp("cont")
        self.ssh.close()  # the old session died with the guest
        self.ssh.connect(timeout=timeout)
        self.ssh.run(["true"], timeout=timeout)
        self.machine.qmp("set-action", {"reboot": "shutdown"})  # -no-reboot again

    def network_for(self, nodes: Sequence[tuple[Host, int]]) -> RelayNetwork:
        """Partitions between the guests of *nodes* (``(host, node index)``)."""
        return RelayNetwork(nodes)

    def close(self) -> None:
        self.machine.shutdown()


class RelayNetwork:
    """Partitions between QEMU guests through their guestfwd relays.

    Every guest-to-guest connection goes through a relay on the lab machine
    (one process per connection, started by the connecting guest's QEMU);
    the relay refuses and cuts connections to the host ports listed in its
    machine's ``blocked`` file.  Nodes on one guest talk over the guest's
    loopback and cannot be separated.
    """

    def __init__(self, nodes: Sequence[tuple[Host, int]]) -> None:
        self.nodes: list[tuple[QemuHost, int]] = []
        for host, index in nodes:
            if not isinstance(host, QemuHost):
                raise HostError(f"{host.name} is not a QEMU guest: no relays")
            self.nodes.append((host, index))

    def _port(self, i: int) -> int:
        host, index = self.nodes[i]
        return host.machine.forwards[host.guest_port(index)]

    def _write(self, blocked: Mapping[QemuHost, set[int]]) -> None:
        for host, ports in blocked.items():
            path = host.machine.dir / "blocked"
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(f"{p}\n" for p in sorted(ports)))
            tmp.replace(path)

    def partition(self, *groups: Sequence[int]) -> int:
        """Nodes in different *groups* cannot reach each other (both ways)."""
        group_of = {i: g for g, members in enumerate(groups) for i in members}
        blocked: dict[QemuHost, set[int]] = {h: set() for h, _ in self.nodes}
        for a, (host_a, _) in enumerate(self.nodes):
            for b, (host_b, _) in enumerate(self.nodes):
                if group_of.get(a, -1) == group_of.get(b, -1):
                    continue
                if host_a is host_b:
                    raise HostError(
                        f"nodes {a} and {b} share {host_a.name}: cannot partition them"
                    )
                blocked[host_a].add(self._port(b))
        self._write(blocked)
        return sum(len(p) for p in blocked.values())

    def heal(self) -> None:
        self._write({h: set() for h, _ in self.nodes})


# guests: QMP stop/cont, a hard power cut, relays between guests
QEMU = Capabilities(
    power_control=True, fault_kinds=frozenset(FAULT_KINDS), remote_shell=True
)
register(QemuHost, "qemu", QEMU)


class AttachedGuest(SSHHost):
    """A guest held by another lab process (``invoke qemu.up``): commands and files.

    Its node ports belong to that process, so it has no endpoints.
    """

    def listen_endpoint(self, index: int) -> Endpoint:
        raise HostError(f"{self.name} is attached: its node ports are not known here")

    lab_endpoint = listen_endpoint

    def peer_endpoint(self, index: int, from_host: Host) -> Endpoint:
        return self.listen_endpoint(index)


def plan(
    specs: Sequence[GuestSpec], port_base: int = DEFAULT_PORT_BASE
) -> list[MachineConfig]:
    """Machine configs: forwards and guestfwd links for every node of every guest."""
    seen: set[int] = set()
    host_ports: list[dict[int, int]] = []
    for spec in specs:
        dup = seen.intersection(spec.nodes)
        if dup:
            raise ValueError(
                f"node indexes {sorted(dup)} appear on more than one guest"
            )
        seen.update(spec.nodes)
        ports = {port_base + i: free_port() for i in spec.nodes}
        ports.update({p: free_port() for p in spec.extra_ports})
        host_ports.append(ports)
    configs = []
    for slot, spec in enumerate(specs):
        links = [
            GuestLink(
                link_address(other), port_base + i, host_ports[other][port_base + i]
            )
            for other, other_spec in enumerate(specs)
            if other != slot
            for i in other_spec.nodes
        ]
        configs.append(
            MachineConfig(
                arch=spec.arch,
                name=spec.name,
                memory_mib=spec.memory_mib,
                smp=spec.smp,
                accel=spec.accel,
                forwards=dict(host_ports[slot]),
                links=links,
                seed_files=dict(spec.seed_files),
                deps_disk=deps_disk(spec.arch, spec.wheelhouse)
                if spec.wheelhouse
                else None,
                variant=spec.variant,
            )
        )
    return configs


class QemuLab:
    """Boot guests in parallel; ``hosts`` are ready (SSH answered) inside ``with``."""

    def __init__(
        self,
        specs: Sequence[GuestSpec],
        *,
        port_base: int = DEFAULT_PORT_BASE,
        boot_timeout: float = 180.0,
        log_dir: Path | None = None,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"guest names must be unique: {names}")
        self.specs = list(specs)
        self.port_base = port_base
        self.boot_timeout = boot_timeout
        self.configs = plan(self.specs, port_base)
        for config in self.configs:
            config.log_dir = log_dir
        self.machines: list[Machine] = []
        self.hosts: list[QemuHost] = []
        self.boot_seconds: dict[str, float] = {}

    def start(self) -> list[QemuHost]:
        try:
            self.machines = [Machine(c) for c in self.configs]
            for machine in self.machines:
                _ = machine.image  # build/load images before the clock starts
            for machine in self.machines:
                machine.launch()
            with concurrent.futures.ThreadPoolExecutor(len(self.machines)) as pool:
                seconds = list(
                    pool.map(lambda m: m.wait_ssh(self.boot_timeout), self.machines)
                )
            for machine, secs in zip(self.machines, seconds, strict=True):
                self.boot_seconds[machine.name] = secs
            self.hosts = [
                QemuHost(m, slot=slot, nodes=spec.nodes, port_base=self.port_base)
                for slot, (m, spec) in enumerate(
                    zip(self.machines, self.specs, strict=True)
                )
            ]
            for host in self.hosts:
                host.prepare()
        except BaseException:
            self.close()
            raise
        return self.hosts

    def close(self, *, graceful: bool = True) -> None:
        """Shut every guest down (in parallel); never leaves a QEMU behind."""
        if not self.machines:
            return
        with concurrent.futures.ThreadPoolExecutor(len(self.machines)) as pool:
            list(pool.map(lambda m: m.shutdown(graceful=graceful), self.machines))

    def by_name(self) -> Mapping[str, QemuHost]:
        return {h.name: h for h in self.hosts}

    def __enter__(self) -> QemuLab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- one guest for a task ----------------------------------------------------------


@contextlib.contextmanager
def guest(
    arch: str,
    *,
    deps_disk: Path | None,
    name: str | None = None,
    progress: Callable[[str], None] = print,
) -> Iterator[SSHHost]:
    """A running guest of *arch* (from ``qemu.up``) or a fresh one for this task.

    *deps_disk* is a wheelhouse: a fresh guest gets a deps disk made from it.
    """
    for state in rundir.running_guests(arch):
        ssh = SSHClient(
            "127.0.0.1",
            int(state["ssh_port"]),
            host_key=public_key(state["host_key"]),
            name=state["name"],
        )
        host = AttachedGuest(
            state["name"],
            arch,
            ssh,
            python=GUEST_VENV_PYTHON,
            workdir=GUEST_WORKDIR,
            deps=DEPS_MOUNT if state.get("deps_disk") else None,
        )
        ssh.connect(timeout=30)
        host.run(["mkdir", "-p", GUEST_WORKDIR], timeout=30)
        progress(f"using running guest {state['name']} (ssh port {state['ssh_port']})")
        try:
            yield host
        finally:
            ssh.close()
        return
    spec = GuestSpec(name or f"{arch}-task", arch, [], wheelhouse=deps_disk)
    lab = QemuLab([spec])
    with lab:
        progress(
            f"booted {spec.name} ({lab.machines[0].accel}) "
            f"in {lab.boot_seconds[spec.name]:.1f} s"
        )
        yield lab.hosts[0]


def push_to(host: SSHHost, wheel: Path, wheelhouse: Path) -> dict[str, Any]:
    """Install wheel (+ deps) on *host* and run the accel check; return timings."""
    start = time.monotonic()
    report = host.install(wheel, wheelhouse)
    check = host.run(
        [host.python(), "-m", "plexichat.accel", "--require-compiled"],
        timeout=300,
        check=False,
    )
    total = time.monotonic() - start
    print(check.stdout.rstrip(), flush=True)  # the guest's table, unwrapped
    if check.stderr.strip():
        print(check.stderr.rstrip(), file=sys.stderr)
    return {
        "bytes_sent": report.bytes_sent,
        "push_s": round(report.push_seconds, 2),
        "install_s": round(report.install_seconds, 2),
        "accel_s": round(check.seconds, 2),
        "total_s": round(total, 2),
        "installed": report.output,
        "require_compiled_rc": check.returncode,
    }


def tests_tar() -> bytes:
    """tests/conftest.py, tests/golden and tests/vectors plus a guest pytest.ini."""
    buf = io.BytesIO()
    tests = REPO / "tests"
    with tarfile.open(fileobj=buf, mode="w") as tar:
        files = [tests / "conftest.py", *sorted((tests / "golden").glob("*.py"))]
        files += sorted((tests / "vectors").glob("*.json"))
        for path in files:
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(tests)))
        ini = b"[pytest]\naddopts = -p no:cacheprovider -ra\n"
        info = tarfile.TarInfo("pytest.ini")
        info.size = len(ini)
        tar.addfile(info, io.BytesIO(ini))
    return buf.getvalue()


def run_golden(host: SSHHost, *, timeout: float = 900.0) -> tuple[int, str]:
    """Run the golden-vector tests on *host*; return (pytest exit code, output)."""
    remote = f"{host.workdir()}/tests"
    host.ssh.run(
        f"rm -rf {remote} && mkdir -p {remote} && tar -x -C {remote}",
        timeout=60,
        input=tests_tar(),
    )
    res = host.ssh.run(
        f"cd {remote} && {host.python()} -m pytest golden -q",
        timeout=timeout,
        check=False,
    )
    return res.returncode, res.stdout + res.stderr
