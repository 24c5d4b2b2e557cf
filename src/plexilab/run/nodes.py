"""N nodes on a list of hosts: deploy, start, converge, faults, the lab's tools.

Only the :class:`~plexilab.host.Host` ABC is used, so the same code drives
local processes, QEMU guests, containers or an SSH inventory.  Node *i* runs
on ``hosts[i % len(hosts)]`` with host-local index ``i // len(hosts)``; it
listens on ``listen_endpoint``, advertises the address other hosts reach it
at (``peer_endpoint``) and the lab talks to it through ``lab_endpoint``.
What the hosts can do (local Python, power control) is what their provider
declares (:class:`plexilab.providers.base.Capabilities`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from plexilab import options
from plexilab.host import Endpoint, Host, HostError, Process
from plexilab.infra.links import LinkLayer
from plexilab.infra.tlscerts import ClusterTls, make_cluster_tls
from plexilab.options import LoadOptions
from plexilab.proc import Deadline
from plexilab.providers.base import Capabilities, PowerControl, common_capabilities
from plexilab.providers.local import free_ports
from plexilab.run.config import ClusterConfig, ClusterError
from plexilab.run.credentials import RunSecret
from plexilab.run.install import SRC, Runtime
from plexilab.run.labtools import run_lab, stats_all

log = logging.getLogger("plexilab.run.nodes")

# the Locust users of --load=locust (run from this checkout by the lab's python)
LOCUSTFILE = SRC / "plexichat" / "load" / "locustfile.py"


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


class Cluster:
    """N nodes on a list of hosts; a context manager that always stops them.

    :meth:`route_through` puts a lab link layer between the nodes (before
    :meth:`start`), so that faults can partition them.
    """

    def __init__(
        self,
        hosts: Sequence[Host],
        config: ClusterConfig,
        runtime: Runtime,
        capabilities: Capabilities | None = None,
    ) -> None:
        if not hosts:
            raise ValueError("a cluster needs at least one host")
        self.hosts = list(hosts)
        self.config = config
        self.runtime = runtime
        # what the hosts can do, as their provider declares it
        self.capabilities = capabilities or common_capabilities(self.hosts)
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
        self.run_secret = RunSecret(enabled=config.security != "insecure")
        self.tls: ClusterTls | None = None
        self.tls_ports: list[int] = []
        if config.security == "tls":
            if not self.capabilities.local_python:
                raise ClusterError("TLS listeners are set up for local hosts only")
            self.tls = make_cluster_tls(self.run_secret.dir / "tls")
            self.tls_ports = free_ports(len(self.nodes))
        # --load=locust: every node serves its HTTP API (plexichat.api) on a
        # free port of this machine, for Locust on the lab host
        self.http_ports: list[int] = []
        if config.load == "locust":
            if not self.capabilities.local_python:
                raise ClusterError(
                    "--load=locust runs on local hosts only for now (the nodes' "
                    "HTTP API is served on this machine's 127.0.0.1)"
                )
            self.http_ports = free_ports(len(self.nodes))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.run_secret.close()

    @property
    def secret(self) -> bytes | None:
        """The run's cluster secret (None: an insecure run)."""
        return self.run_secret.secret

    @property
    def secret_file(self) -> Path:
        """The lab's private copy of the secret."""
        return self.run_secret.file

    def host_secret(self, host: Host) -> str:
        """Where the cluster secret lies on *host*."""
        return self.run_secret.on_host(host)

    def deliver_secret(self, host: Host) -> None:
        """Put the cluster secret on *host* (once per host), owner-only."""
        self.run_secret.deliver(host)

    def stats(self, timeout: float = 2.0) -> list[dict[str, Any] | None]:
        """STATS of every node (None where one does not answer)."""
        return stats_all(self.lab_endpoints, timeout, secret=self.secret)

    def tool_secret_args(self) -> list[str]:
        return self.run_secret.tool_args()

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

    def http_args(self, node: NodeHandle) -> list[str]:
        """``--http-listen`` of the node (--load=locust), else nothing."""
        if not self.http_ports:
            return []
        return ["--http-listen", f"{node.listen.host}:{self.http_ports[node.index]}"]

    @property
    def http_urls(self) -> list[str]:
        """Base URLs of the nodes' HTTP APIs (--load=locust)."""
        pairs = zip(self.nodes, self.http_ports, strict=True)
        return [f"http://{n.lab.host}:{port}" for n, port in pairs]

    def route_through(self, links: LinkLayer) -> None:
        """Peer traffic through *links* (started, relaying to the lab endpoints).

        Node *i* advertises relay *i* and binds its peer connections to the
        layer's source address *i*; only local hosts can do this.
        """
        if len(links.endpoints) != len(self.nodes):
            raise ClusterError("the link layer needs one started relay per node")
        if not self.capabilities.local_python:
            raise ClusterError("a lab link layer only fronts local nodes")
        for node in self.nodes:
            node.advertise = links.endpoints[node.index]
            node.source = links.sources[node.index]
        self.links = links

    @property
    def lab_endpoints(self) -> list[Endpoint]:
        return [n.lab for n in self.nodes]

    def node_env(self, node: NodeHandle) -> dict[str, str]:
        local = dict(self.runtime.local_env) if self.capabilities.local_python else {}
        return {**local, **self.config.backend_env()}

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
            *self.http_args(node),
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
        deadline = Deadline(timeout or self.config.converge_timeout)
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
            if deadline.expired():
                views = {str(i and i["node_id"]): i and i["ring"] for i in infos}
                raise ClusterError(f"membership did not converge in time: {views}")
            deadline.sleep(0.05)

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

    def _power(self, index: int) -> PowerControl:
        host = self.nodes[index].host
        if not self.capabilities.power_control:
            raise ClusterError(f"{host.name} cannot be powered off or on")
        return cast(PowerControl, host)  # declared by its provider

    def poweroff(self, index: int) -> None:
        """Hard power-off of node *index*'s machine (providers with machines)."""
        self._power(index).power_off()

    def poweron(self, index: int) -> None:
        """Boot node *index*'s machine again and restart the node on it."""
        self._power(index).power_on()
        self.start_node(self.nodes[index])

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

    def _load_tool(self, config: dict[str, Any], out: Path, timeout: float) -> Any:
        """plexichat-load with *config* handed over as its ``--config`` JSON
        (next to *out*), not rebuilt into argv; its JSON report."""
        doc = {**config, "json": str(out), "quiet": True}
        path = out.with_name(f"{out.stem}-config.json")
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        proc = self._tool("plexichat.load.cli", ["--config", str(path)], timeout)
        if proc.returncode != 0:
            raise ClusterError(
                f"{out.stem} failed ({proc.returncode}): {proc.stderr[-3000:]}"
            )
        return json.loads(out.read_text())

    def load_endpoints(self) -> dict[str, str]:
        """``nodes`` (and ``tls_ca``) of the load generator's configuration."""
        if self.tls is None:
            return {"nodes": self.nodes_arg()}
        pairs = zip(self.nodes, self.tls_ports, strict=True)
        eps = [f"{n.lab.host}:{port}" for n, port in pairs]
        return {"nodes": ",".join(eps), "tls_ca": str(self.tls.ca)}

    def run_load(self, journal: Path, out: Path) -> dict[str, Any]:
        c = self.config
        load = options.values_of(c, LoadOptions)
        del load["request_timeout"]  # the lab's name; the tool's is timeout
        for name in ("load", "users", "spawn_rate"):  # the engine's, Locust's
            del load[name]
        config = {
            **load,
            **self.load_endpoints(),
            "timeout": c.load_timeout,
            "journal": str(journal),
            "csv": str(out.with_suffix(".csv")),
        }
        result: dict[str, Any] = self._load_tool(
            config, out, c.duration + c.step_timeout
        )
        return result

    def run_locust(self, journal: Path, results: Path) -> dict[str, Any]:
        """Locust (headless, the lab's python) against the nodes' HTTP APIs for
        ``duration`` seconds with ``users`` users; every 201 is journaled to
        *journal*.  Its report (``locust-report.json``, the binary generator's
        keys), CSVs (``locust_*.csv``) and output (``locust.log``) go to
        *results*."""
        # lab side: plexichat from src, imported when used (as labtools does)
        from plexichat.load.httpload import CONFIG_VAR, HttpLoadConfig

        c = self.config
        if not self.http_ports:
            raise ClusterError("the nodes were not started with --load=locust")
        report = results / "locust-report.json"
        report.unlink(missing_ok=True)
        config = HttpLoadConfig(
            hosts=self.http_urls,
            secret_file=self.secret_file if self.secret is not None else None,
            journal=journal,
            report=report,
            channels=c.channels,
            payload=c.payload,
            timeout=c.load_timeout,
        )
        config_path = results / "locust-config.json"
        config_path.write_text(config.to_json())
        argv = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(c.users), "-r", f"{c.spawn_rate:g}", "-t", f"{c.duration:g}s",
            "--host", self.http_urls[0], "--csv", str(results / "locust"),
            "--only-summary", "--stop-timeout", "0",
        ]  # fmt: skip
        env = {
            "PYTHONPATH": os.pathsep.join(
                [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            CONFIG_VAR: str(config_path),
            **c.backend_env(),
        }
        proc = run_lab(argv, timeout=c.duration + c.step_timeout, env=env)
        (results / "locust.log").write_text(proc.stdout + proc.stderr)
        # exit 1: some requests failed (counted in the report), not a crash
        if proc.returncode not in (0, 1) or not report.exists():
            raise ClusterError(
                f"locust failed ({proc.returncode}): {proc.stderr[-3000:]}"
            )
        result: dict[str, Any] = json.loads(report.read_text())
        result["locust_csv"] = str(results / "locust_stats.csv")
        return result

    def run_p2p(self, out: Path) -> dict[str, Any]:
        c = self.config
        config = {
            "nodes": self.nodes_arg(),
            "scenario": "p2p",
            "count": c.p2p_count,
            "rate": c.p2p_rate,
            "fanout": c.p2p_fanout,
        }
        result: dict[str, Any] = self._load_tool(config, out, c.step_timeout)
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


def tail(node: NodeHandle, lines: int = 20) -> str:
    """Last lines of a node's log (fetched through its host)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "node.log"
        try:
            node.host.get(node.log_path, local)
        except HostError:
            return "(no log)"
        return "\n".join(local.read_text(errors="replace").splitlines()[-lines:])
