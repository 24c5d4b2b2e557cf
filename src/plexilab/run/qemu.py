"""PlexiChat clusters in QEMU guests: ``invoke qemu.cluster`` and ``invoke qemu.p2p``.

One guest per node; ``--arch=mixed`` cycles x86_64, aarch64, aarch64, ...
The run is: host set-up (``setup_host.ensure``), artifacts (per-arch wheel +
wheelhouse, cached images), boot (all guests in parallel), install (in
parallel), guest clock sync, then :func:`plexilab.run.cluster.run_cluster`
(start, convergence, chat load, P2P, checker) and teardown.  Every phase is
timed (``phases_s`` in the result JSON).

On top of the result of ``local.cluster`` the JSON holds, per node, the
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

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import posixpath
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from docker.errors import DockerException
from rich.console import Console
from rich.panel import Panel

from plexilab.host import Endpoint, Host, HostError
from plexilab.infra import engine as containers
from plexilab.infra import images, machine, setup_host
from plexilab.infra.artifacts import ensure_artifacts
from plexilab.infra.ssh import SSHHost
from plexilab.infra.wheels import host_arch
from plexilab.providers.docker_in_guests import DockerGuests, SavedImage, saved_image
from plexilab.providers.local import LocalHost
from plexilab.providers.qemu import GuestSpec, QemuHost, QemuLab
from plexilab.run.cluster import (
    Cluster,
    ClusterConfig,
    InstallMode,
    NodeHandle,
    admin_token,
    build_wheel,
    check_hosts,
    local_venv,
    prepare,
    run_cluster,
    verdict,
)

log = logging.getLogger("plexilab.run.qemu")

MIXED_CYCLE = ("x86_64", "aarch64", "aarch64")
ArchMode = Literal["mixed", "x86_64", "aarch64"]
Fallback = Literal["local", "none"]
Runtime = Literal["process", "docker"]
Artifacts = Mapping[str, tuple[Path, Path]]
Progress = Callable[[str], None]


class QemuUnavailable(RuntimeError):
    """QEMU cannot run on this host (the message says why)."""


# -- options and planning -------------------------------------------------------------


@dataclass
class QemuClusterOptions:
    """One ``invoke qemu.cluster`` / ``qemu.p2p`` run.

    The load defaults are sized for TCG guests (~13x slower than the host):
    fewer clients and a smaller window than ``local.cluster``, and membership
    timeouts that a busy emulated CPU does not trip.
    """

    nodes: int = 3
    arch: ArchMode = "mixed"
    duration: float = 30.0
    replicas: int = 2
    clients: int = 4
    inflight: int = 32
    connections: int = 1
    payload: int = 64
    channels: int = 256
    # None: follow the lab's PLEXICHAT_BACKEND* environment (ClusterConfig)
    backend: Literal["auto", "python"] | None = None
    p2p_count: int = 200
    p2p_rate: float = 100.0
    p2p_fanout: int = 2
    gossip_interval: float = 0.2
    ping_timeout: float = 2.0
    suspect_timeout: float = 10.0
    results: Path | None = None
    fallback: Fallback = "local"
    port_base: int = 7100
    boot_timeout: float = 180.0
    memory_mib: int | None = None
    name_prefix: str = "qc"
    clock_sync: bool = True
    lab_install: InstallMode = "wheel"  # lab-side tools (and local fallback nodes)
    # plexilab.run.faults kinds ("default": what the provider can do); a fault
    # every fault_interval s, lasting fault_duration s (0: half the interval)
    faults: list[str] = field(default_factory=list)
    fault_interval: float = 20.0
    fault_duration: float = 0.0
    # process: nodes are processes of the pushed wheel; docker: containers of
    # the lab host's PlexiChat image in the guests' engines (docker variant)
    runtime: Runtime = "process"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError("--nodes must be at least 1")
        if self.arch not in ("mixed", *images.ARCHES):
            raise ValueError(
                f"--arch must be mixed, x86_64 or aarch64, not {self.arch}"
            )
        if self.fallback not in ("local", "none"):
            raise ValueError(f"--fallback must be local or none, not {self.fallback}")
        if self.backend not in (None, "auto", "python"):
            raise ValueError("--backend must be auto or python")
        if self.runtime not in ("process", "docker"):
            raise ValueError(f"--runtime must be process or docker, not {self.runtime}")
        if self.runtime == "docker":
            foreign = sorted(set(node_arches(self.nodes, self.arch)) - {host_arch()})
            if foreign:
                raise ValueError(
                    f"--runtime=docker runs the PlexiChat image built for this "
                    f"host ({host_arch()}); no {', '.join(foreign)} image: use "
                    f"--arch={host_arch()}"
                )

    def cluster_config(self, results_dir: Path) -> ClusterConfig:
        return ClusterConfig(
            nodes=self.nodes,
            replicas=self.replicas,
            duration=self.duration,
            clients=self.clients,
            inflight=self.inflight,
            connections=self.connections,
            payload=self.payload,
            channels=self.channels,
            backend=self.backend,
            p2p_count=self.p2p_count,
            p2p_rate=self.p2p_rate,
            p2p_fanout=self.p2p_fanout,
            gossip_interval=self.gossip_interval,
            ping_timeout=self.ping_timeout,
            suspect_timeout=self.suspect_timeout,
            converge_timeout=120.0,
            install=self.lab_install,
            results_dir=results_dir,
            faults=list(self.faults),
            fault_interval=self.fault_interval,
            fault_duration=self.fault_duration,
        )


def node_arches(nodes: int, arch: str) -> list[str]:
    """Arch of each node: *arch*, or for ``mixed`` x86_64, aarch64, aarch64, ..."""
    if arch == "mixed":
        return [MIXED_CYCLE[i % len(MIXED_CYCLE)] for i in range(nodes)]
    return [arch] * nodes


def clock_port(port_base: int) -> int:
    """The guest port of the clock server (just below the node ports)."""
    return port_base - 1


def guest_specs(
    options: QemuClusterOptions, artifacts: Artifacts | None
) -> list[GuestSpec]:
    """One guest per node, with the clock port forwarded and the deps disk attached.

    With the docker runtime (*artifacts* None) the guests boot the docker
    image variant and get no deps disk.
    """
    arches = node_arches(options.nodes, options.arch)
    extra = [clock_port(options.port_base)] if options.clock_sync else []
    docker = options.runtime == "docker"
    return [
        GuestSpec(
            f"{options.name_prefix}{i}-{'x86' if arch == 'x86_64' else 'arm'}",
            arch,
            nodes=[i],
            memory_mib=options.memory_mib,
            extra_ports=list(extra),
            wheelhouse=artifacts[arch][1] if artifacts is not None else None,
            variant="docker" if docker else "",
        )
        for i, arch in enumerate(arches)
    ]


# -- phases ---------------------------------------------------------------------------


class Phases:
    """Wall-clock seconds per named phase (in order)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.monotonic()
        self._mark = self.started

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - start)
            self._mark = time.monotonic()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 3)

    def lap(self, name: str) -> None:
        """Charge the time since the last phase ended to *name*."""
        now = time.monotonic()
        self.add(name, now - self._mark)
        self._mark = now

    def total(self) -> float:
        return round(time.monotonic() - self.started, 3)


# -- pre-flight -----------------------------------------------------------------------


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


# -- guest clocks ---------------------------------------------------------------------

CLOCK_SERVER = r"""
import socket, struct, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(4)


def exact(conn, n):
    buf = b""
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return buf


while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            req = exact(conn, 9)
            if req is None:
                break
            if req[:1] == b"s":
                (delta,) = struct.unpack(">q", req[1:])
                now = time.clock_gettime_ns(time.CLOCK_REALTIME)
                time.clock_settime_ns(time.CLOCK_REALTIME, now + delta)
            conn.sendall(struct.pack(">q", time.time_ns()))
"""
_I64 = struct.Struct(">q")


@dataclass(frozen=True)
class ClockReading:
    """Guest clock minus host clock (at the fastest of several round trips)."""

    offset_ns: int
    rtt_ns: int


def _exchange(sock: socket.socket, request: bytes) -> int:
    sock.sendall(request)
    buf = b""
    while len(buf) < 8:
        part = sock.recv(8 - len(buf))
        if not part:
            raise ConnectionError("clock server closed the connection")
        buf += part
    return int(_I64.unpack(buf)[0])


def read_clock(sock: socket.socket, rounds: int = 12) -> ClockReading:
    """NTP-style: offset at the round trip with the smallest RTT."""
    best: ClockReading | None = None
    for _ in range(rounds):
        t0 = time.time_ns()
        guest = _exchange(sock, b"t" + bytes(8))
        t1 = time.time_ns()
        reading = ClockReading(guest - (t0 + t1) // 2, t1 - t0)
        if best is None or reading.rtt_ns < best.rtt_ns:
            best = reading
    assert best is not None
    return best


def connect_clock(endpoint: Endpoint, timeout: float = 60.0) -> socket.socket:
    """Connect to a guest clock server (slirp accepts before it listens: retry)."""
    deadline = time.monotonic() + timeout
    while True:
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _exchange(sock, b"t" + bytes(8))
            return sock
        except OSError:
            if sock is not None:
                sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def sync_clock(endpoint: Endpoint) -> dict[str, float]:
    """Set the guest clock behind *endpoint* to the host's; report before/after."""
    with connect_clock(endpoint) as sock:
        before = read_clock(sock)
        after = before
        for _ in range(3):
            _exchange(sock, b"s" + _I64.pack(-after.offset_ns))
            after = read_clock(sock)
            if abs(after.offset_ns) <= max(after.rtt_ns, 200_000):
                break
    return {
        "offset_before_ms": round(before.offset_ns / 1e6, 3),
        "offset_ms": round(after.offset_ns / 1e6, 3),
        "rtt_ms": round(after.rtt_ns / 1e6, 3),
    }


def measure_clock(endpoint: Endpoint) -> dict[str, float]:
    """Current guest-host clock offset (drift check after the run)."""
    with connect_clock(endpoint, timeout=20) as sock:
        reading = read_clock(sock, rounds=8)
    return {
        "offset_ms": round(reading.offset_ns / 1e6, 3),
        "rtt_ms": round(reading.rtt_ns / 1e6, 3),
    }


def start_clock_server(host: QemuHost, port: int) -> None:
    """Start the clock server in *host* (system python3, runs until poweroff)."""
    host.spawn(
        ["python3", "-c", CLOCK_SERVER, str(port)],
        log_path=f"{host.workdir()}/clock.log",
    )


def clock_endpoint(host: QemuHost, port: int) -> Endpoint:
    return Endpoint("127.0.0.1", host.machine.forwards[port])


# -- VM resources ---------------------------------------------------------------------


@dataclass(frozen=True)
class VmSample:
    tag: str
    time: float
    vcpu_s: float
    cpu_s: float
    rss_bytes: int


class VmSampler:
    """QMP resource samples of every guest: at named steps and every *interval* s."""

    def __init__(
        self, machines: Sequence[machine.Machine], interval: float = 2.0
    ) -> None:
        self.machines = list(machines)
        self.interval = interval
        self.samples: dict[str, list[VmSample]] = {m.name: [] for m in machines}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, tag: str) -> None:
        for m in self.machines:
            try:
                res = m.resources()
            except Exception as exc:  # a guest going away must not stop the run
                log.debug("resource sample of %s failed: %r", m.name, exc)
                continue
            with self._lock:
                self.samples[m.name].append(
                    VmSample(
                        tag,
                        res.time,
                        sum(res.vcpu_seconds),
                        res.process_cpu_seconds,
                        res.rss_bytes,
                    )
                )

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample("tick")

    def start(self) -> VmSampler:
        self.sample("start")
        self._thread = threading.Thread(target=self._loop, name="vm-sampler")
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def summary(self, name: str) -> dict[str, Any]:
        """Figures of one guest (MiB, CPU seconds).

        ``load_*`` cover the workload: from convergence to the end of the chat
        load, or (P2P scenario alone) to the end of the relays.
        """
        with self._lock:
            samples = list(self.samples.get(name, []))
        if not samples:
            return {}
        tagged = {s.tag: s for s in samples}
        last = samples[-1]
        out: dict[str, Any] = {
            "samples": len(samples),
            "vcpu_s": round(last.vcpu_s, 2),
            "qemu_cpu_s": round(last.cpu_s, 2),
            "rss_mib_max": round(max(s.rss_bytes for s in samples) / 2**20, 1),
        }
        a, b = tagged.get("converged"), tagged.get("loaded", tagged.get("p2p"))
        if a is not None and b is not None and b.time > a.time:
            wall = b.time - a.time
            out.update(
                rss_mib_before_load=round(a.rss_bytes / 2**20, 1),
                rss_mib_after_load=round(b.rss_bytes / 2**20, 1),
                load_vcpu_s=round(b.vcpu_s - a.vcpu_s, 2),
                load_qemu_cpu_s=round(b.cpu_s - a.cpu_s, 2),
                load_vcpu_util=round((b.vcpu_s - a.vcpu_s) / wall, 3),
            )
        return out


# -- node histograms ------------------------------------------------------------------


def node_histograms(
    endpoints: Sequence[Endpoint], timeout: float = 10.0, *, secret: bytes | None
) -> list[dict[str, Any]]:
    """``{name: Histogram}`` of every node (an empty dict where one does not
    answer), asked with an admin token of the cluster whose secret is *secret*."""
    from plexichat.load.client import NodeClient

    token = admin_token(secret)

    async def one(ep: Endpoint) -> dict[str, Any]:
        client = NodeClient(ep.host, ep.port, timeout=timeout, token=token)
        try:
            await client.connect()
            _, hists = await client.stats()
            return dict(hists)
        except (OSError, TimeoutError, ValueError):
            return {}
        finally:
            await client.close()

    async def everyone() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(ep) for ep in endpoints)))

    return asyncio.run(everyone())


def hist_summary(hist: Any) -> dict[str, Any]:
    """count and p50/p99/p99.9/max in ms of a microsecond histogram."""
    from plexichat.load.report import percentiles_ms

    if hist is None or hist.count == 0:
        return {"count": 0}
    pct = percentiles_ms(hist)
    return {
        "count": int(hist.count),
        "p50": pct["50%"],
        "p99": pct["99%"],
        "p99.9": pct["99.9%"],
        "max": pct["100%"],
    }


def by_arch(
    arches: Sequence[str], hists: Sequence[Mapping[str, Any]], name: str
) -> dict[str, Any]:
    """Histogram *name* of the nodes merged per arch, summarised."""
    from plexichat.stats import Histogram

    merged: dict[str, Any] = {}
    nodes: dict[str, int] = {}
    for arch, node_hists in zip(arches, hists, strict=True):
        nodes[arch] = nodes.get(arch, 0) + 1
        hist = merged.setdefault(arch, Histogram())
        if name in node_hists:
            hist.merge(node_hists[name])
    return {
        arch: {"nodes": nodes[arch], **hist_summary(merged[arch])}
        for arch in sorted(merged)
    }


# -- the run on a set of hosts --------------------------------------------------------


@dataclass
class RunState:
    """What the step hook collects during a run."""

    phases: Phases
    arches: list[str]
    results_dir: Path
    sampler: VmSampler | None = None
    clocks: Mapping[str, Endpoint] = field(default_factory=dict)
    cluster: Cluster | None = None
    send_hists: list[dict[str, Any]] = field(default_factory=list)
    relay_hists: list[dict[str, Any]] = field(default_factory=list)
    clock_after: dict[str, dict[str, float]] = field(default_factory=dict)
    logs_fetched: bool = False
    progress: Progress = field(default=lambda _msg: None)

    def on_step(self, step: str, cluster: Cluster) -> None:
        names = {
            "prepared": "host_check",
            "started": "node_start",
            "converged": "convergence",
            "loaded": "load",
            "p2p": "p2p",
            "checked": "check",
            "stopped": "node_stop",
        }
        if step in names:
            self.phases.lap(names[step])
        self.cluster = cluster
        if step == "prepared":
            make_node_dirs(cluster)
        if self.sampler is not None and step in ("converged", "loaded", "p2p"):
            self.sampler.sample(step)
        if step == "loaded":
            self.send_hists = node_histograms(
                cluster.lab_endpoints, secret=cluster.secret
            )
        elif step == "p2p":
            self.relay_hists = node_histograms(
                cluster.lab_endpoints, secret=cluster.secret
            )
            self._clock_drift()
        elif step == "stopped":
            self.fetch_logs()

    def _clock_drift(self) -> None:
        for name, ep in self.clocks.items():
            try:
                self.clock_after[name] = measure_clock(ep)
            except OSError as exc:
                log.warning("clock check of %s failed: %r", name, exc)

    def fetch_logs(self) -> None:
        """Copy every node's log to ``results_dir/nodes`` (best effort, once)."""
        if self.logs_fetched or self.cluster is None:
            return
        self.logs_fetched = True
        out = self.results_dir / "nodes"

        def one(node: NodeHandle) -> None:
            try:
                node.host.get(node.log_path, out / f"{node.node_id}.log")
            except (HostError, OSError) as exc:
                log.warning("no log of %s: %r", node.node_id, exc)

        _parallel(one, self.cluster.nodes)


def make_node_dirs(cluster: Cluster) -> None:
    """Create every node's data and log directory on its (SSH) host, in parallel.

    ``SSHHost.spawn`` redirects into the log path without creating its folder.
    """
    by_host: dict[str, tuple[Host, set[str]]] = {}
    for node in cluster.nodes:
        if isinstance(node.host, SSHHost):
            dirs = by_host.setdefault(node.host.name, (node.host, set()))[1]
            dirs.update({posixpath.dirname(node.log_path), node.data_dir})
    _parallel(
        lambda item: item[0].run(["mkdir", "-p", *sorted(item[1])], timeout=60),
        list(by_host.values()),
    )


def install_all(hosts: Sequence[Host], artifacts: Artifacts) -> dict[str, float]:
    """Install the per-arch wheel on every SSH host in parallel; seconds per host."""

    def one(host: Host) -> float:
        assert isinstance(host, SSHHost)
        wheel, house = artifacts[host.arch]
        return host.install(wheel, house).seconds

    ssh_hosts = [h for h in hosts if isinstance(h, SSHHost)]
    if not ssh_hosts:
        return {}
    with concurrent.futures.ThreadPoolExecutor(len(ssh_hosts)) as pool:
        seconds = list(pool.map(one, ssh_hosts))
    return {h.name: round(s, 2) for h, s in zip(ssh_hosts, seconds, strict=True)}


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def run_on_hosts(
    hosts: Sequence[Host],
    options: QemuClusterOptions,
    *,
    artifacts: Artifacts | None,
    phases: Phases,
    results_dir: Path,
    sampler: VmSampler | None = None,
    clocks: Mapping[str, Endpoint] | None = None,
    progress: Progress = lambda _msg: None,
    scenario: Literal["cluster", "p2p"] = "cluster",
) -> dict[str, Any]:
    """Install (in parallel), sync guest clocks, then the cluster or P2P run.

    Works on any provider: QEMU guests, an SSH inventory or local processes
    (*artifacts* None: nothing to push).  Node *i* runs on ``hosts[i % n]``.
    """
    config = options.cluster_config(results_dir)
    arches = [hosts[i % len(hosts)].arch for i in range(options.nodes)]
    install_s: dict[str, float] = {}
    if artifacts is not None:
        progress("installing the wheels (in parallel)")
        with phases("install"):
            install_s = install_all(hosts, artifacts)
    clock_report: dict[str, dict[str, float]] = {}
    if clocks:
        with phases("clock_sync"):
            names = list(clocks)
            reports = _parallel(lambda n: sync_clock(clocks[n]), names)
            clock_report = dict(zip(names, reports, strict=True))
    state = RunState(
        phases=phases,
        arches=arches,
        results_dir=results_dir,
        sampler=sampler,
        clocks=clocks or {},
        progress=progress,
    )
    try:
        if scenario == "cluster":
            result = run_cluster(
                hosts, config, install=None, progress=progress, on_step=state.on_step
            )
        else:
            result = run_p2p_only(
                hosts, config, progress=progress, on_step=state.on_step
            )
    finally:
        with contextlib.suppress(Exception):
            state.fetch_logs()
    phases.lap("logs")
    result["latency_by_arch"] = (
        by_arch(arches, state.send_hists, "send") if state.send_hists else {}
    )
    result["p2p_latency_by_arch"] = (
        by_arch(arches, state.relay_hists, "relay") if state.relay_hists else {}
    )
    for i, row in enumerate(result["per_node"]):
        name = row["host"]
        row["arch"] = arches[i]
        if state.send_hists:
            row["send_latency_ms"] = hist_summary(state.send_hists[i].get("send"))
        if state.relay_hists:
            row["relay_latency_ms"] = hist_summary(state.relay_hists[i].get("relay"))
        if name in install_s:
            row["install_s"] = install_s[name]
        if name in clock_report:
            row["clock"] = {**clock_report[name]}
            if name in state.clock_after:
                row["clock"]["offset_after_ms"] = state.clock_after[name]["offset_ms"]
    return result


def run_p2p_only(
    hosts: Sequence[Host],
    config: ClusterConfig,
    *,
    progress: Progress = lambda _msg: None,
    on_step: Callable[[str, Cluster], None] | None = None,
) -> dict[str, Any]:
    """Start the nodes, converge, run the P2P relay scenario, stop."""
    step = on_step or (lambda _name, _cluster: None)
    results_dir = Path(config.results_dir or tempfile.mkdtemp(prefix="plexilab-p2p-"))
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runtime = prepare(hosts, config.install, None)
    host_backends = check_hosts(hosts, runtime, config.backend_env())
    with Cluster(hosts, config, runtime) as cluster:
        step("prepared", cluster)
        progress(f"starting {config.nodes} nodes")
        cluster.start()
        step("started", cluster)
        convergence = cluster.wait_converged()
        step("converged", cluster)
        progress(f"converged in {convergence:.2f}s; p2p ({config.p2p_count} relays)")
        p2p = cluster.run_p2p(results_dir / "p2p.json")
        step("p2p", cluster)
        infos = cluster.stats(timeout=5.0)
        per_node = []
        for node, info in zip(cluster.nodes, infos, strict=True):
            row = node.describe()
            if info is not None:
                row.update(backend=info["backend"], counters=info["counters"])
            per_node.append(row)
    step("stopped", cluster)
    backends = {i["backend"] for i in infos if i is not None}
    return {
        "scenario": "p2p",
        "nodes": config.nodes,
        "backend": backends.pop() if len(backends) == 1 else "mixed",
        "host_backends": host_backends,
        "convergence_s": round(convergence, 3),
        "p2p_latency_ms": dict(p2p["p2p_latency_ms"]),
        "p2p_coverage": p2p["coverage"],
        "per_node": per_node,
        "p2p": p2p,
        "results_dir": str(results_dir),
        "wall_s": round(time.monotonic() - started, 3),
    }


# -- providers ------------------------------------------------------------------------


def _results_dir(options: QemuClusterOptions) -> Path:
    path = options.results or Path(tempfile.mkdtemp(prefix="plexilab-qemu-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def leftover_pids(pids: Sequence[int], timeout: float = 10.0) -> list[int]:
    """Those of *pids* (QEMU processes of this run) still alive after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if machine.proc_starttime(p) is not None]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def docker_artifacts(progress: Progress) -> tuple[SavedImage, dict[str, Any]]:
    """The PlexiChat image on the lab host's engine (built from HEAD, layer
    cache), saved and gzip-compressed for the guests (cached per image id)."""
    try:
        client = containers.ensure_engine()
    except (containers.ContainerError, DockerException, PermissionError) as exc:
        raise QemuUnavailable(f"no Docker engine on the lab host: {exc}") from exc
    try:
        progress(f"docker build {containers.IMAGE} (HEAD, layer cache)")
        built = containers.build_image(client, source="head")
        saved = saved_image(client, containers.IMAGE)
    finally:
        client.close()
    return saved, {
        "seconds": built.seconds,
        "size": built.size,
        "steps": built.steps,
        "cached_steps": built.cached_steps,
        "save_s": saved.seconds,
    }


def run_qemu(
    options: QemuClusterOptions,
    *,
    scenario: Literal["cluster", "p2p"] = "cluster",
    progress: Progress = lambda _msg: None,
) -> dict[str, Any]:
    """The whole QEMU run; raises :class:`QemuUnavailable` before any guest ran."""
    phases = Phases()
    results_dir = _results_dir(options)
    arches = node_arches(options.nodes, options.arch)
    needed = sorted(set(arches))
    progress("host set-up")
    with phases("setup"):
        reason = qemu_unavailable(needed)
    if reason:
        raise QemuUnavailable(reason)
    progress(f"artifacts for {', '.join(needed)} (images, wheels)")
    artifacts: Artifacts | None = None
    saved: SavedImage | None = None
    docker_build: dict[str, Any] = {}
    with phases("artifacts"):
        if options.runtime == "docker":
            saved, docker_build = docker_artifacts(progress)
        else:
            artifacts = {a: ensure_artifacts(a, progress=progress) for a in needed}
        if options.lab_install == "wheel":
            local_venv(build_wheel())  # the lab's load tools (cached per source)
        try:
            if options.runtime == "docker":
                images.images_for(needed, "docker")
            else:
                images.images_for(needed)
        except Exception as exc:
            raise QemuUnavailable(f"no guest image: {exc}") from exc
    specs = guest_specs(options, artifacts)
    lab = QemuLab(
        specs,
        port_base=options.port_base,
        boot_timeout=options.boot_timeout,
        log_dir=results_dir / "guests",
    )
    pids: list[int] = []
    left: list[int] = []
    sampler: VmSampler | None = None
    engines: DockerGuests | None = None
    try:
        progress(f"booting {len(specs)} guests in parallel")
        with phases("boot"):
            try:
                lab.start()
            except (machine.MachineError, HostError, OSError, TimeoutError) as exc:
                raise QemuUnavailable(
                    f"guests did not boot ({type(exc).__name__}): {exc}"
                ) from exc
        pids = [m.pid for m in lab.machines if m.pid]
        accels = sorted({m.accel for m in lab.machines})
        progress(
            "booted in "
            + ", ".join(f"{n} {s:.1f}s" for n, s in lab.boot_seconds.items())
            + f" ({'/'.join(accels)})"
        )
        sampler = VmSampler(lab.machines).start()
        clocks: dict[str, Endpoint] = {}
        if options.clock_sync:
            port = clock_port(options.port_base)
            with phases("clock_sync"):
                _parallel(lambda h: start_clock_server(h, port), lab.hosts)
                clocks = {h.name: clock_endpoint(h, port) for h in lab.hosts}
        hosts: Sequence[Host] = lab.hosts
        if saved is not None:
            engines = DockerGuests(lab.hosts, saved)
            with phases("docker"):
                hosts = engines.start(progress)
            progress(
                "engines ready: "
                + ", ".join(
                    f"{n} dockerd {g['dockerd_s']:.1f}s, "
                    f"load {g['load']['seconds']:.1f}s "
                    f"({g['load']['mb_per_s']:.2f} MB/s)"
                    for n, g in engines.report()["guests"].items()
                )
            )
        result = run_on_hosts(
            hosts,
            options,
            artifacts=artifacts,
            phases=phases,
            results_dir=results_dir,
            sampler=sampler,
            clocks=clocks,
            progress=progress,
            scenario=scenario,
        )
        sampler.sample("end")
    finally:
        if sampler is not None:
            sampler.stop()
        progress("tearing down the guests")
        start = time.monotonic()
        if engines is not None:
            engines.close()  # containers and volumes first, then the guests
        lab.close()
        left = leftover_pids(pids) if pids else []
        phases.add("teardown", time.monotonic() - start)
    guests = []
    for host, spec in zip(lab.hosts, specs, strict=True):
        m = host.machine
        guests.append(
            {
                "name": host.name,
                "arch": host.arch,
                "accel": m.accel,
                "boot_s": round(lab.boot_seconds[host.name], 2),
                "memory_mib": m.config.memory_mib or m.profile.memory_mib,
                "smp": m.config.smp or m.profile.smp,
                "nodes": spec.nodes,
                "vm": sampler.summary(host.name) if sampler else {},
            }
        )
    by_name = {g["name"]: g for g in guests}
    for row in result["per_node"]:
        guest = by_name.get(row["host"], {})
        row.update(
            guest=row["host"],
            accel=guest.get("accel"),
            boot_s=guest.get("boot_s"),
            vm=guest.get("vm", {}),
        )
    if engines is not None:
        result["docker"] = {**engines.report(), "build": docker_build}
    result.update(
        provider="qemu",
        runtime=options.runtime,
        fallback_reason=None,
        arch_mode=options.arch,
        guests=guests,
        leftover_qemu_pids=left,
        phases_s=phases.seconds,
        total_s=phases.total(),
    )
    return result


def run_local(
    options: QemuClusterOptions,
    reason: str,
    *,
    scenario: Literal["cluster", "p2p"] = "cluster",
    progress: Progress = lambda _msg: None,
) -> dict[str, Any]:
    """The same run on local processes (the fallback), with *reason* recorded."""
    phases = Phases()
    results_dir = _results_dir(options)
    host = LocalHost(workdir=results_dir / "hosts")
    try:
        result = run_on_hosts(
            [host],
            options,
            artifacts=None,
            phases=phases,
            results_dir=results_dir,
            progress=progress,
            scenario=scenario,
        )
    finally:
        start = time.monotonic()
        host.close()
        phases.add("teardown", time.monotonic() - start)
    result.update(
        provider="local",
        fallback_reason=reason,
        arch_mode=options.arch,
        guests=[],
        leftover_qemu_pids=[],
        phases_s=phases.seconds,
        total_s=phases.total(),
    )
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
    scenario: Literal["cluster", "p2p"] = "cluster",
    console: Console | None = None,
) -> dict[str, Any]:
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


def failed(result: Mapping[str, Any]) -> list[str]:
    """Why the run counts as failed (empty when it passed)."""
    reasons = verdict(result)
    if result.get("leftover_qemu_pids"):
        reasons.append(f"QEMU processes left: {result['leftover_qemu_pids']}")
    return reasons
