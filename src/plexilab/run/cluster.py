"""Provider-independent orchestration: deploy, start, converge, load, check, stop.

Only the :class:`~plexilab.host.Host` ABC is used, so the same code
drives local processes, QEMU guests or an SSH inventory.  Node *i* runs on
``hosts[i % len(hosts)]`` with host-local index ``i // len(hosts)``; it
listens on ``listen_endpoint``, advertises the address other hosts reach it
at (``peer_endpoint``) and the lab talks to it through ``lab_endpoint``.

The load generator, the P2P scenario and the checker run on the lab machine
(as subprocesses of the lab's own Python, so their CPU use and backend choice
are separate from this process) against the lab endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from plexilab import deps
from plexilab.host import Endpoint, Host, HostError, Process
from plexilab.infra import wheels
from plexilab.infra.links import LinkLayer
from plexilab.infra.tlscerts import ClusterTls, make_cluster_tls
from plexilab.providers.local import free_ports
from plexilab.run import faults as faultlib

log = logging.getLogger("plexilab.run.cluster")

ROOT = Path(__file__).resolve().parents[3]
SRC = ROOT / "src"
CACHE = ROOT / ".cache" / "local"

InstallMode = Literal["dev", "wheel"]
BACKEND_VAR = "PLEXICHAT_BACKEND"  # and PLEXICHAT_BACKEND_<FAMILY> (plexichat.accel)


def lab_backend_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``PLEXICHAT_BACKEND*`` variables of the lab's environment."""
    env = os.environ if environ is None else environ
    return {
        k: v
        for k, v in env.items()
        if k == BACKEND_VAR or k.startswith(f"{BACKEND_VAR}_")
    }


class ClusterError(RuntimeError):
    """The cluster could not be brought up or a step failed."""


@dataclass
class ClusterConfig:
    """One cluster run (defaults: a short local run)."""

    nodes: int = 3
    replicas: int = 2
    duration: float = 30.0
    count: int = 50_000_000
    clients: int = 8
    inflight: int = 64
    mode: Literal["closed", "open"] = "closed"
    rate: float = 20_000.0
    payload: int = 64
    channels: int = 256
    connections: int = 1  # load connections per node shared by clients (0: own)
    distribution: Literal["uniform", "zipf"] = "uniform"
    route: Literal["owner", "any"] = "owner"
    # None: what the lab's environment asks for (PLEXICHAT_BACKEND and the
    # PLEXICHAT_BACKEND_<FAMILY> overrides); auto or python replaces all of it
    backend: Literal["auto", "python"] | None = None
    gossip_interval: float = 0.2
    ping_timeout: float = 0.3
    suspect_timeout: float = 1.0
    p2p_count: int = 200
    p2p_rate: float = 200.0
    p2p_fanout: int = 2
    check_replicas: bool = True  # the checker compares every replica's history
    converge_timeout: float = 60.0
    step_timeout: float = 600.0
    install: InstallMode = "dev"
    results_dir: Path | None = None
    node_args: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # kinds (plexilab.run.faults)
    fault_interval: float = 10.0  # seconds between fault starts
    fault_duration: float = 0.0  # seconds a fault lasts (0: interval / 2)
    # seconds before the load gives a request up (and sends its channel
    # through another node); 0: 10 s, or with faults twice the suspicion
    # timeout within 2..10 s (a client does not wait out a paused node)
    request_timeout: float = 0.0
    # auth: a per-run cluster secret, peers handshake, clients present tokens
    # (the default, and all a lab run uses); tls: also the load speaks TLS to
    # the nodes' TLS listeners (local hosts); insecure: nodes run open, only
    # as the baseline of the security benchmark (local.bench-security)
    security: Literal["auth", "tls", "insecure"] = "auth"

    def backend_env(self) -> dict[str, str]:
        """``PLEXICHAT_BACKEND*`` for the nodes and lab tools of this run."""
        inherited = lab_backend_env()
        if self.backend is None:
            return {BACKEND_VAR: "auto", **inherited}
        # blank the per-family overrides (empty means unset to plexichat.accel)
        return {**dict.fromkeys(inherited, ""), BACKEND_VAR: self.backend}

    @property
    def requested_backend(self) -> str:
        """The backend the run asks for: ``python``, ``auto``, or with overrides."""
        env = self.backend_env()
        wanted = env.pop(BACKEND_VAR).strip().lower() or "auto"
        families = [
            f"{k.removeprefix(BACKEND_VAR + '_').lower()}={v.strip().lower()}"
            for k, v in sorted(env.items())
            if v.strip()
        ]
        return f"{wanted} ({', '.join(families)})" if families else wanted

    @property
    def load_timeout(self) -> float:
        if self.request_timeout > 0:
            return self.request_timeout
        if self.faults:
            return min(10.0, max(2.0, 2 * self.suspect_timeout))
        return 10.0


@dataclass
class NodeHandle:
    """One node of a running cluster."""

    index: int
    node_id: str
    host: Host
    local_index: int
    listen: Endpoint
    advertise: Endpoint
    lab: Endpoint
    data_dir: str
    log_path: str
    process: Process | None = None
    source: str | None = None  # --source-address (behind a lab link layer)

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "node_id": self.node_id,
            "host": self.host.name,
            "arch": self.host.arch,
            "listen": str(self.listen),
            "advertise": str(self.advertise),
            "lab": str(self.lab),
            "data_dir": self.data_dir,
            "log": self.log_path,
            "pid": self.process.pid if self.process is not None else None,
        }


# -- installation ------------------------------------------------------------------


def source_key() -> str:
    """Hash of everything that goes into the wheel (cache key)."""
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in SRC.joinpath("plexichat").rglob("*")
        if p.is_file() and p.suffix in {".py", ".pyx", ".pyi", ".h", ".typed"}
    )
    for path in [ROOT / "setup.py", ROOT / "pyproject.toml", *files]:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_wheel(timeout: float = 1200.0) -> Path:
    """``python -m build --wheel`` once per source state (cached under .cache/)."""
    out = CACHE / "wheels" / source_key()
    wheels = sorted(out.glob("plexichat-*.whl"))
    if wheels:
        return wheels[-1]
    out.mkdir(parents=True, exist_ok=True)
    log.info("building the plexichat wheel into %s", out)
    env = {**os.environ, "PLEXICHAT_REQUIRE_EXTENSIONS": "1"}
    env.pop("PLEXICHAT_ONLY", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--skip-dependency-check",
            "--outdir",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    wheels = sorted(out.glob("plexichat-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ClusterError(
            f"wheel build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return wheels[-1]


def prune(directory: Path, keep: int = 3) -> None:
    """Remove all but the *keep* most recent entries of a cache directory."""
    if not directory.is_dir():
        return
    entries = sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def local_venv(wheel: Path, timeout: float = 600.0, cache: Path = CACHE) -> str:
    """A venv under .cache/ with *wheel* and its locked runtime dependencies.

    Hermetic: the venv does not see the system site-packages, and the
    dependencies are installed offline from a wheelhouse of the host's arch
    downloaded at the versions of ``constraints.txt`` (made once per wheel and
    lock).  The lab's load generator and checker run from it, and local nodes in
    ``wheel`` mode.
    """
    arch = wheels.host_arch()
    house = cache / "wheelhouse" / arch
    wheels.download_wheelhouse(arch, house, deps.requirements("runtime"))
    venv = cache / "venvs" / wheel.parent.name
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    want = f"{wheel.name} {hashlib.sha256(deps.LOCK.read_bytes()).hexdigest()}"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return str(python)
    subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    proc = subprocess.run(
        [
            str(python), "-I", "-m", "pip", "install", "-q",
            "--disable-pip-version-check", "--no-index", "--find-links", str(house),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise ClusterError(f"pip install of {wheel.name} failed: {proc.stderr[-2000:]}")
    stamp.write_text(want)
    prune(cache / "venvs")
    prune(cache / "wheels")
    return str(python)


@dataclass
class Runtime:
    """How to run plexichat on the lab machine and on the hosts.

    ``local_env`` goes to processes on local hosts only (in dev mode it points
    ``PYTHONPATH`` at this checkout); remote hosts run their own install.
    """

    lab_python: str
    lab_env: dict[str, str]
    local_env: dict[str, str]

    def env_for(self, host: Host) -> dict[str, str]:
        return dict(self.local_env) if is_local(host) else {}


Installer = Callable[[Host], None]
StepHook = Callable[[str, "Cluster"], None]


def is_local(host: Host) -> bool:
    """A host whose processes run on this machine (it can take a local venv)."""
    return callable(getattr(host, "set_python", None))


def prepare(
    hosts: Sequence[Host], mode: InstallMode, install: Installer | None = None
) -> Runtime:
    """Make plexichat runnable on the lab side and on every host.

    Local hosts use this checkout (``dev``) or a cached venv with the wheel
    (``wheel``).  Other hosts are installed by *install* (for example a QEMU
    provider pushing its per-arch wheel); without one they must have
    plexichat already (``check_hosts`` verifies it).
    """
    for host in hosts:
        if not is_local(host) and install is not None:
            install(host)
    if mode == "dev":
        paths = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {"PYTHONPATH": os.pathsep.join(paths)}
        return Runtime(sys.executable, env, env)
    wheel = build_wheel()
    python = local_venv(wheel)
    for host in hosts:
        if is_local(host):
            host.set_python(python)  # type: ignore[attr-defined]
    return Runtime(python, {}, {})


def check_hosts(
    hosts: Sequence[Host], runtime: Runtime, backend_env: Mapping[str, str]
) -> dict[str, str]:
    """``plexichat.accel.summary()`` on every host (fails if plexichat is missing)."""
    out = {}
    for host in hosts:
        env = {**runtime.env_for(host), **backend_env}
        result = host.run(
            [
                host.python(),
                "-c",
                "from plexichat import accel; print(accel.summary())",
            ],
            timeout=120,
            env=env,
        )
        out[host.name] = result.stdout.strip()
    return out


# -- lab-side helpers ----------------------------------------------------------------


def run_lab(
    argv: Sequence[str], *, timeout: float, env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run a lab tool in its own process group; kill the group on timeout/Ctrl-C."""
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


def admin_token(secret: bytes | None) -> str | None:
    """An admin token of the cluster whose secret is *secret* (None: none)."""
    from plexichat.node.auth import Credentials  # lab side: plexichat from src

    return None if secret is None else Credentials(secret).token(1, admin=True)


async def _stats_all(
    endpoints: Sequence[Endpoint], timeout: float, secret: bytes | None
) -> list[dict[str, Any] | None]:
    from plexichat.load.client import NodeClient  # lab side: plexichat from src

    token = admin_token(secret)

    async def one(ep: Endpoint) -> dict[str, Any] | None:
        client = NodeClient(ep.host, ep.port, timeout=timeout, token=token)
        try:
            await client.connect()
            info, _ = await client.stats()
            return info
        except (OSError, TimeoutError, ValueError):
            return None
        finally:
            await client.close()

    return list(await asyncio.gather(*(one(ep) for ep in endpoints)))


def stats_all(
    endpoints: Sequence[Endpoint], timeout: float = 2.0, *, secret: bytes | None
) -> list[dict[str, Any] | None]:
    """STATS of every endpoint (None where the node does not answer), asked
    with an admin token of the cluster whose secret is *secret*."""
    return asyncio.run(_stats_all(endpoints, timeout, secret))


SECRET_NAME = "cluster.secret"


def write_secret_file(path: Path, secret: bytes) -> None:
    """*secret* in a file only its owner may read, as the nodes read it."""
    from plexichat.node.auth import write_secret  # lab side: plexichat from src

    write_secret(path, secret)


# -- the cluster ----------------------------------------------------------------------


class Cluster:
    """N nodes on a list of hosts; a context manager that always stops them.

    :meth:`route_through` puts a lab link layer between the nodes (before
    :meth:`start`), so that faults can partition them.
    """

    def __init__(
        self, hosts: Sequence[Host], config: ClusterConfig, runtime: Runtime
    ) -> None:
        if not hosts:
            raise ValueError("a cluster needs at least one host")
        self.hosts = list(hosts)
        self.config = config
        self.runtime = runtime
        self.nodes: list[NodeHandle] = []
        for i in range(config.nodes):
            host = self.hosts[i % len(self.hosts)]
            local = i // len(self.hosts)
            other = next((h for h in self.hosts if h is not host), host)
            base = f"{host.workdir()}/node-{i}"
            self.nodes.append(
                NodeHandle(
                    index=i,
                    node_id=f"n{i}",
                    host=host,
                    local_index=local,
                    # endpoints take the cluster index (Host ABC): a QEMU guest
                    # or inventory host serves node i on port_base + i
                    listen=host.listen_endpoint(i),
                    advertise=host.peer_endpoint(i, other),
                    lab=host.lab_endpoint(i),
                    data_dir=f"{base}/data",
                    log_path=f"{base}/node.log",
                )
            )
        self.links: LinkLayer | None = None
        self.started_at = 0.0
        # A fresh cluster secret per run (never in an image): the nodes get it
        # as a file next to their data, the lab's tools from a private copy.
        self.secret: bytes | None = None
        self._secret_dir = Path(tempfile.mkdtemp(prefix="plexilab-secret-"))
        self.secret_file = self._secret_dir / SECRET_NAME
        if config.security != "insecure":
            self.secret = secrets.token_bytes(32)
            write_secret_file(self.secret_file, self.secret)
        self._secret_on: set[int] = set()  # ids of hosts that have it
        self.tls: ClusterTls | None = None
        self.tls_ports: list[int] = []
        if config.security == "tls":
            if not all(is_local(n.host) for n in self.nodes):
                raise ClusterError("TLS listeners are set up for local hosts only")
            self.tls = make_cluster_tls(self._secret_dir / "tls")
            self.tls_ports = free_ports(len(self.nodes))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self._secret_dir, ignore_errors=True)

    def host_secret(self, host: Host) -> str:
        """Where the cluster secret lies on *host*."""
        return f"{host.workdir()}/{SECRET_NAME}"

    def deliver_secret(self, host: Host) -> None:
        """Put the cluster secret on *host* (once per host), readable by its
        owner only."""
        if id(host) in self._secret_on or self.secret is None:
            return
        remote = self.host_secret(host)
        host.put(self.secret_file, remote)
        host.run(["chmod", "600", remote], timeout=30)
        self._secret_on.add(id(host))

    def stats(self, timeout: float = 2.0) -> list[dict[str, Any] | None]:
        """STATS of every node (None where one does not answer)."""
        return stats_all(self.lab_endpoints, timeout, secret=self.secret)

    def tool_secret_args(self) -> list[str]:
        if self.secret is None:
            return []
        return ["--secret-file", str(self.secret_file)]

    def security_args(self, node: NodeHandle) -> list[str]:
        """The node's authentication (and TLS) arguments."""
        if self.secret is None:
            return ["--insecure"]
        args = ["--secret-file", self.host_secret(node.host)]
        if self.tls is not None:  # local hosts: the lab's own files
            port = self.tls_ports[node.index]
            args += ["--tls-listen", f"{node.listen.host}:{port}"]
            args += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
        return args

    def load_nodes_arg(self) -> list[str]:
        """``--nodes`` (and ``--tls-ca``) of the load generator."""
        if self.tls is None:
            return ["--nodes", self.nodes_arg()]
        pairs = zip(self.nodes, self.tls_ports, strict=True)
        eps = [f"{n.lab.host}:{port}" for n, port in pairs]
        return ["--nodes", ",".join(eps), "--tls-ca", str(self.tls.ca)]

    def route_through(self, links: LinkLayer) -> None:
        """Peer traffic through *links* (started, relaying to the lab endpoints).

        Node *i* advertises relay *i* and binds its peer connections to the
        layer's source address *i*; only local hosts can do this.
        """
        if len(links.endpoints) != len(self.nodes):
            raise ClusterError("the link layer needs one started relay per node")
        if not all(is_local(n.host) for n in self.nodes):
            raise ClusterError("a lab link layer only fronts local nodes")
        for node in self.nodes:
            node.advertise = links.endpoints[node.index]
            node.source = links.sources[node.index]
        self.links = links

    @property
    def lab_endpoints(self) -> list[Endpoint]:
        return [n.lab for n in self.nodes]

    def node_env(self, node: NodeHandle) -> dict[str, str]:
        return {**self.runtime.env_for(node.host), **self.config.backend_env()}

    def node_argv(self, node: NodeHandle) -> list[str]:
        config = self.config
        seeds = [
            str(
                other.advertise
                if self.links is not None
                else other.host.peer_endpoint(other.index, node.host)
            )
            for other in self.nodes
            if other is not node
        ]
        source = ["--source-address", node.source] if node.source else []
        # a power cut loses the commits SQLite has not fsynced yet
        # (synchronous=normal): runs that cut power make every commit durable
        durability = (
            ["--sync", "full"]
            if "poweroff" in config.faults and "--sync" not in config.node_args
            else []
        )
        return [
            node.host.python(),
            "-m",
            "plexichat.node.cli",
            "--node-id",
            node.node_id,
            "--listen",
            str(node.listen),
            "--advertise",
            str(node.advertise),
            "--seeds",
            ",".join(seeds),
            "--data-dir",
            node.data_dir,
            "--replicas",
            str(config.replicas),
            "--gossip-interval",
            str(config.gossip_interval),
            "--ping-timeout",
            str(config.ping_timeout),
            "--suspect-timeout",
            str(config.suspect_timeout),
            *self.security_args(node),
            *source,
            *durability,
            *config.node_args,
        ]

    def start_node(self, node: NodeHandle) -> None:
        self.deliver_secret(node.host)
        node.process = node.host.spawn(
            self.node_argv(node), log_path=node.log_path, env=self.node_env(node)
        )
        log.info(
            "started %s on %s (pid %d)", node.node_id, node.host.name, node.process.pid
        )

    def start(self) -> None:
        self.started_at = time.monotonic()
        for node in self.nodes:
            self.start_node(node)

    def _dead(self) -> list[NodeHandle]:
        return [
            n for n in self.nodes if n.process is not None and not n.process.alive()
        ]

    def wait_converged(
        self, timeout: float | None = None, nodes: Sequence[NodeHandle] | None = None
    ) -> float:
        """Poll STATS until all nodes see *nodes* alive; return seconds since start."""
        expect = {n.node_id for n in (nodes or self.nodes)}
        deadline = time.monotonic() + (timeout or self.config.converge_timeout)
        while True:
            dead = [n for n in self._dead() if n.node_id in expect]
            if dead:
                raise ClusterError(
                    f"{dead[0].node_id} exited with {dead[0].process.wait(0)}"  # type: ignore[union-attr]
                    f"; log: {tail(dead[0])}"
                )
            infos = stats_all(
                [n.lab for n in self.nodes if n.node_id in expect], secret=self.secret
            )
            if all(
                info is not None
                and set(info["ring"]) == expect
                and info.get("settled", True)
                for info in infos
            ):
                return time.monotonic() - self.started_at
            if time.monotonic() > deadline:
                views = {str(i and i["node_id"]): i and i["ring"] for i in infos}
                raise ClusterError(f"membership did not converge in time: {views}")
            time.sleep(0.05)

    def kill(self, index: int) -> None:
        """SIGKILL node *index* (its data dir stays)."""
        node = self.nodes[index]
        if node.process is not None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(10.0)

    def restart(self, index: int) -> None:
        """Start node *index* again on its data dir (after :meth:`kill`)."""
        node = self.nodes[index]
        if node.process is not None and node.process.alive():
            raise ClusterError(f"{node.node_id} is still running")
        self.start_node(node)

    def pause(self, index: int) -> None:
        """Freeze node *index* (SIGSTOP; a provider may pause its machine)."""
        node = self.nodes[index]
        if node.process is None:
            raise ClusterError(f"{node.node_id} was never started")
        node.host.pause(node.process)

    def resume(self, index: int) -> None:
        """Undo :meth:`pause`."""
        node = self.nodes[index]
        if node.process is not None:
            node.host.resume(node.process)

    def poweroff(self, index: int) -> None:
        """Hard power-off of node *index*'s machine (providers with machines)."""
        node = self.nodes[index]
        power_off = getattr(node.host, "power_off", None)
        if power_off is None:
            raise ClusterError(f"{node.host.name} cannot be powered off")
        power_off()

    def poweron(self, index: int) -> None:
        """Boot node *index*'s machine again and restart the node on it."""
        node = self.nodes[index]
        power_on = getattr(node.host, "power_on", None)
        if power_on is None:
            raise ClusterError(f"{node.host.name} cannot be powered on")
        power_on()
        self.start_node(node)

    def stop(self) -> None:
        """SIGTERM every node (then SIGKILL what does not exit)."""
        for node in self.nodes:
            if node.process is not None and node.process.alive():
                node.host.resume(node.process)  # a paused node cannot exit
        for node in self.nodes:
            if node.process is not None and node.process.alive():
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.process is not None:
                node.process.stop(timeout=10.0)

    # -- lab-side steps -----------------------------------------------------------

    def _tool(
        self, module: str, args: list[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        env = {**self.runtime.lab_env, **self.config.backend_env()}
        argv = [self.runtime.lab_python, "-m", module, *args, *self.tool_secret_args()]
        return run_lab(argv, timeout=timeout, env=env)

    def nodes_arg(self) -> str:
        return ",".join(str(ep) for ep in self.lab_endpoints)

    def run_load(self, journal: Path, out: Path) -> dict[str, Any]:
        c = self.config
        args = [
            *self.load_nodes_arg(),
            "--clients",
            str(c.clients),
            "--mode",
            c.mode,
            "--inflight",
            str(c.inflight),
            "--rate",
            str(c.rate),
            "--count",
            str(c.count),
            "--duration",
            str(c.duration),
            "--payload",
            str(c.payload),
            "--channels",
            str(c.channels),
            "--connections",
            str(c.connections),
            "--distribution",
            c.distribution,
            "--route",
            c.route,
            "--timeout",
            f"{c.load_timeout:g}",
            "--journal",
            str(journal),
            "--json",
            str(out),
            "--csv",
            str(out.with_suffix(".csv")),
            "--quiet",
        ]
        proc = self._tool("plexichat.load.cli", args, c.duration + c.step_timeout)
        if proc.returncode != 0:
            raise ClusterError(
                f"load failed ({proc.returncode}): {proc.stderr[-3000:]}"
            )
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def run_p2p(self, out: Path) -> dict[str, Any]:
        c = self.config
        args = [
            "--nodes",
            self.nodes_arg(),
            "--scenario",
            "p2p",
            "--count",
            str(c.p2p_count),
            "--rate",
            str(c.p2p_rate),
            "--fanout",
            str(c.p2p_fanout),
            "--json",
            str(out),
            "--quiet",
        ]
        proc = self._tool("plexichat.load.cli", args, c.step_timeout)
        if proc.returncode != 0:
            raise ClusterError(f"p2p failed ({proc.returncode}): {proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def run_check(self, journal: Path, out: Path) -> dict[str, Any]:
        args = [
            "--nodes",
            self.nodes_arg(),
            "--journal",
            str(journal),
            "--json",
            str(out),
        ]
        if self.config.check_replicas:
            args.append("--replicas")
        proc = self._tool("plexichat.load.checker", args, self.config.step_timeout)
        if proc.returncode not in (0, 1):
            raise ClusterError(
                f"checker failed ({proc.returncode}): {proc.stderr[-3000:]}"
            )
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def verdict(result: Mapping[str, Any]) -> list[str]:
    """Why a run failed (empty when it passed): every checker violation (a lost,
    duplicated, reordered or misplaced message, a gap, two messages at one
    seq, a replica that disagrees) and every fault that could not be applied
    or healed.  Every provider's task exits 1 on any of them."""
    reasons = [
        f"{count:,} {name.replace('_', ' ')}"
        for name, count in (result.get("violations") or {}).items()
    ]
    reasons += [f"fault {e}" for e in result.get("fault_errors") or []]
    return reasons


def tail(node: NodeHandle, lines: int = 20) -> str:
    """Last lines of a node's log (fetched through its host)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "node.log"
        try:
            node.host.get(node.log_path, local)
        except HostError:
            return "(no log)"
        return "\n".join(local.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks run."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _backend_of(infos: Sequence[dict[str, Any] | None]) -> str:
    names = {i["backend"] for i in infos if i is not None}
    return names.pop() if len(names) == 1 else "mixed"


def _faults_plan(
    hosts: Sequence[Host], config: ClusterConfig, network: faultlib.Network | None
) -> list[str]:
    """The fault kinds of *config*, checked against what the hosts can do."""
    kinds = faultlib.parse_kinds(
        config.faults,
        faultlib.supported(hosts),
        "/".join(sorted({h.name for h in hosts})),
    )
    return kinds


def _link_counters(links: LinkLayer | None, cluster: Cluster) -> dict[str, Any]:
    if links is None:
        return {}
    ids = {n.index: n.node_id for n in cluster.nodes}
    return {
        f"{ids.get(src, 'lab')}->{ids.get(dst, '?')}": asdict(counters)
        for (src, dst), counters in sorted(links.counters().items())
    }


def run_cluster(
    hosts: Sequence[Host],
    config: ClusterConfig,
    *,
    install: Installer | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
    on_step: StepHook | None = None,
    network: faultlib.Network | None = None,
) -> dict[str, Any]:
    """Deploy, start, converge, run load + P2P + checker, stop; return the results.

    *on_step* is called with the name of each step just finished ("prepared",
    "started", "converged", "loaded", "p2p", "checked", "stopped") and the
    cluster (a provider samples its VMs or times phases there).

    With ``config.faults`` a :class:`~plexilab.run.faults.Nemesis` breaks the
    cluster during the load (partitions through *network*, or a lab link
    layer for local hosts); everything is healed and the cluster must
    converge again before the P2P scenario and the checker run.
    """
    step = on_step or (lambda _name, _cluster: None)
    kinds = _faults_plan(hosts, config, network)
    results_dir = Path(config.results_dir or tempfile.mkdtemp(prefix="plexilab-run-"))
    results_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    links: LinkLayer | None = None
    nemesis: faultlib.Nemesis | None = None
    recovery: float | None = None
    with _terminate_as_interrupt(), contextlib.ExitStack() as stack:
        progress(f"preparing hosts ({config.install})")
        runtime = prepare(hosts, config.install, install)
        host_backends = check_hosts(hosts, runtime, config.backend_env())
        with Cluster(hosts, config, runtime) as cluster:
            if faultlib.NETWORK_KINDS.intersection(kinds) and network is None:
                if all(is_local(h) for h in hosts):
                    links = LinkLayer([n.lab for n in cluster.nodes]).start()
                    stack.callback(links.close)  # after the nodes have stopped
                    cluster.route_through(links)
                    network = links
                else:
                    network = hosts[0].network_for(
                        [(n.host, n.index) for n in cluster.nodes]
                    )
                    if network is None:
                        raise faultlib.FaultError(
                            f"{hosts[0].name} has no way to partition its nodes"
                        )
                    stack.callback(network.heal)
            step("prepared", cluster)
            if "poweroff" in kinds:
                # what the lab installed must survive a power cut; the nodes'
                # own writes are what the fault puts to the test
                for host in hosts:
                    host.run(["sync"], timeout=300)
            progress(f"starting {config.nodes} nodes")
            cluster.start()
            step("started", cluster)
            convergence = cluster.wait_converged()
            step("converged", cluster)
            progress(
                f"converged in {convergence:.2f}s; loading for {config.duration:g}s"
            )
            journal = results_dir / "journal.bin"
            journal.unlink(missing_ok=True)
            if kinds:
                nemesis = faultlib.Nemesis(
                    cluster,
                    kinds,
                    interval=config.fault_interval,
                    duration=config.fault_duration,
                    horizon=config.duration,
                    network=network,
                    ready=journal.exists,
                ).start()
                progress(
                    f"faults: {','.join(kinds)} every {config.fault_interval:g}s "
                    f"for {nemesis.duration:g}s"
                )
            try:
                load = cluster.run_load(journal, results_dir / "load.json")
            finally:
                if nemesis is not None:
                    nemesis.stop()
            if nemesis is not None:
                progress(
                    f"{len(nemesis.faults)} faults injected and healed; "
                    "waiting for the cluster to converge"
                )
                healed = time.monotonic()
                # handoffs after long faults can stream whole channels again
                cluster.wait_converged(timeout=10 * config.converge_timeout)
                recovery = time.monotonic() - healed
            step("loaded", cluster)
            progress(
                f"acked {load['acked']} at "
                f"{load['throughput_msgs_per_s']:.0f} msg/s; p2p"
            )
            p2p = cluster.run_p2p(results_dir / "p2p.json")
            step("p2p", cluster)
            progress("checking")
            check = cluster.run_check(journal, results_dir / "check.json")
            step("checked", cluster)
            infos = cluster.stats(timeout=5.0)
            per_node = []
            for node, info in zip(cluster.nodes, infos, strict=True):
                row = node.describe()
                if info is not None:
                    row.update(
                        backend=info["backend"],
                        counters=info["counters"],
                        storage=info["storage"],
                        ring=info["ring"],
                    )
                per_node.append(row)
            link_counters = _link_counters(links, cluster)
        step("stopped", cluster)
    # with faults: the fault windows, the load's per-second counts (also in
    # load["timeline"] for any run) and availability inside/outside them
    t0 = float(load.get("started_unix") or 0.0)
    fault_rows = nemesis.timeline(t0) if nemesis is not None and t0 else []
    timeline = load.get("timeline") or []
    return {
        "nodes": config.nodes,
        "replicas": config.replicas,
        "backend": _backend_of(infos),
        "requested_backend": config.requested_backend,
        "security": config.security,
        "host_backends": host_backends,
        "acked": load["acked"],
        "failures": load["failures"],
        "lost": check["lost"],
        "duplicated": check["duplicated"],
        "reordered": check["reordered"],
        "seq_mismatch": check["seq_mismatch"],
        "shared_seq": check["shared_seq"],
        "gaps": check["gaps"],
        "replica_missing": check["replica_missing"],
        "divergence": check["divergence"],
        "replicas_checked": check["replicas_checked"],
        "violations": check["violations"],
        "throughput_msgs_per_s": load["throughput_msgs_per_s"],
        "latency_ms": load["latency_ms"],
        "convergence_s": round(convergence, 3),
        "p2p_latency_ms": {k: p2p["p2p_latency_ms"][k] for k in ("p50", "p99")},
        "p2p_coverage": p2p["coverage"],
        "per_node": per_node,
        "timeline": timeline,
        **(
            {
                "faults": fault_rows,
                "fault_errors": nemesis.errors,
                "fault_counts": {
                    k: sum(f["kind"] == k for f in fault_rows) for k in kinds
                },
                "recovery_s": None if recovery is None else round(recovery, 3),
                "availability": faultlib.availability(
                    timeline, fault_rows, float(load.get("timeline_interval_s") or 1)
                ),
                "fault_service": faultlib.service(
                    timeline, fault_rows, float(load.get("timeline_interval_s") or 1)
                ),
                "links": link_counters,
            }
            if nemesis is not None
            else {}
        ),
        "load": load,
        "p2p": p2p,
        "check": check,
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()
        },
        "results_dir": str(results_dir),
        "wall_s": round(time.monotonic() - started, 3),
    }
