"""Real hosts listed in a TOML inventory, reached with the same SSH code as guests.

Example ``hosts.toml``::

    [[host]]
    name = "pi1"
    address = "127.0.0.1"        # what the lab connects to
    port = 22
    user = "root"
    key = "~/.cache/plexilab/ssh/lab_ed25519"   # default: the lab key
    arch = "aarch64"
    host_key = "ssh-ed25519 AAAA..."            # or: known_hosts = "~/.ssh/known_hosts"
    python = "/opt/plexichat/bin/python"
    workdir = "/root/plexilab"
    port_base = 7100             # node i listens on port_base + i
    peer_address = "127.0.0.1"   # how other hosts reach it (default: address)
    nodes = [0, 1]
    [host.lab_ports]             # optional NAT: node port -> port the lab connects to
    7100 = 40123

A host must be pinned: ``host_key`` or ``known_hosts`` is required.

No stray nodes: a real machine outlives the lab, so its nodes are held by a
lease (:class:`plexilab.infra.ssh.RemoteLease`).  The lab keeps one SSH session
per host open to a small watchdog shell; when that session ends -- the lab
exits, is SIGKILLed, or loses its connection -- the watchdog SIGKILLs the
process group of every node it has recorded (pidfiles under
``<workdir>/leases/<lab>/nodes/``).  This is the parent-death signal over
SSH: it needs nothing on the host but ``sh``, ``/proc`` and coreutils, and
acts at once, on EOF, never on a timer that a busy lab could miss.  When
the watchdog could not act (it was killed, or the lab host vanished without
closing the connection, so the lab's heartbeat to the lease stopped), the
next lab to connect reaps the leftovers recorded by pidfile:
``inventory_hosts()`` does it for every host, and so does the first spawn on
a host (``InventoryHost.reap_leftovers()`` on demand).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from plexilab.host import Endpoint, Host
from plexilab.infra.artifacts import ensure_artifacts
from plexilab.infra.ssh import SSHHost
from plexilab.infra.sshclient import SSHClient, lab_key, public_key
from plexilab.providers.base import (
    Capabilities,
    Phases,
    Progress,
    Provider,
    ProviderUnavailable,
    register,
)
from plexilab.providers.guests import Artifacts, install_all


@dataclass
class InventoryEntry:
    """One ``[[host]]`` table."""

    name: str
    address: str
    arch: str
    port: int = 22
    user: str = "root"
    key: str | None = None
    host_key: str | None = None
    known_hosts: str | None = None
    python: str = "/opt/plexichat/bin/python"
    workdir: str = "/root/plexilab"
    port_base: int = 7100
    peer_address: str | None = None
    deps: str | None = None
    nodes: list[int] = field(default_factory=list)
    lab_ports: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InventoryEntry:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown inventory keys: {', '.join(sorted(unknown))}")
        values = dict(data)
        values["lab_ports"] = {
            int(k): int(v) for k, v in data.get("lab_ports", {}).items()
        }
        entry = cls(**values)
        if entry.host_key is None and entry.known_hosts is None:
            raise ValueError(
                f"{entry.name}: set host_key or known_hosts (hosts are pinned)"
            )
        return entry


def load_inventory(path: Path) -> list[InventoryEntry]:
    """Parse an inventory file."""
    data = tomllib.loads(path.read_text())
    entries = [InventoryEntry.from_dict(d) for d in data.get("host", [])]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate host names in {path}: {names}")
    return entries


class InventoryHost(SSHHost):
    """A real machine from the inventory (its nodes die with the lab)."""

    lease_nodes = True

    def __init__(self, entry: InventoryEntry) -> None:
        key: paramiko.PKey
        if entry.key:
            key = paramiko.Ed25519Key.from_private_key_file(
                str(Path(entry.key).expanduser())
            )
        else:
            key = lab_key()[1]
        ssh = SSHClient(
            entry.address,
            entry.port,
            user=entry.user,
            key=key,
            host_key=public_key(entry.host_key) if entry.host_key else None,
            known_hosts=Path(entry.known_hosts).expanduser()
            if entry.known_hosts
            else None,
            name=entry.name,
        )
        super().__init__(
            entry.name,
            entry.arch,
            ssh,
            python=entry.python,
            workdir=entry.workdir,
            deps=entry.deps,
        )
        self.entry = entry

    def _port(self, index: int) -> int:
        return self.entry.port_base + index

    def listen_endpoint(self, index: int) -> Endpoint:
        return Endpoint("0.0.0.0", self._port(index))

    def lab_endpoint(self, index: int) -> Endpoint:
        port = self._port(index)
        return Endpoint(self.entry.address, self.entry.lab_ports.get(port, port))

    def peer_endpoint(self, index: int, from_host: Host) -> Endpoint:
        if from_host is self:
            return Endpoint("127.0.0.1", self._port(index))
        return Endpoint(
            self.entry.peer_address or self.entry.address, self._port(index)
        )


def inventory_hosts(
    path: Path, *, connect_timeout: float = 30.0
) -> list[InventoryHost]:
    """Connected hosts of an inventory file, with dead labs' leftover nodes reaped."""
    hosts = [InventoryHost(e) for e in load_inventory(path)]
    try:
        for host in hosts:
            host.ssh.connect(timeout=connect_timeout)
            host.run(["mkdir", "-p", host.workdir()], timeout=60)
            # nodes a dead lab left behind (their watchdog could not kill them)
            host.reap_leftovers()
    except BaseException:
        for host in hosts:
            host.close()
        raise
    return hosts


# real machines over SSH: signals only, no partitions, no power switch
INVENTORY = Capabilities(remote_shell=True)
register(InventoryHost, "inventory", INVENTORY)


class InventoryProvider(Provider):
    """The hosts of an inventory file (``invoke inventory.cluster --hosts``).

    ``artifacts`` builds (or finds) the wheel and wheelhouse of every arch in
    the inventory; ``install`` pushes and installs them on every host in
    parallel (``push=False``: the hosts already have plexichat at their
    ``python``).  Leftover nodes of dead labs are reaped when the hosts
    connect; teardown closes the connections (their leases kill the nodes).
    """

    name = "inventory"
    capabilities = INVENTORY

    def __init__(
        self,
        path: Path | None = None,
        *,
        hosts: Sequence[InventoryHost] | None = None,
        push: bool = True,
        artifacts: Artifacts | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        if (path is None) == (hosts is None):
            raise ValueError("an inventory provider needs a path or hosts")
        self.path = path
        self.given = list(hosts) if hosts is not None else None
        self.push = push
        self.wheels = artifacts
        self.connect_timeout = connect_timeout
        self.hosts: list[InventoryHost] = []
        self.entries = load_inventory(path) if path is not None else []

    @property
    def arches(self) -> list[str]:
        if self.given is not None:
            return sorted({h.arch for h in self.given})
        return sorted({e.arch for e in self.entries})

    def preflight(self, phases: Phases, progress: Progress) -> None:
        if self.given is None and not self.entries:
            raise ProviderUnavailable(f"{self.path} lists no [[host]]")

    def artifacts(self, phases: Phases, progress: Progress) -> None:
        if self.push and self.wheels is None:
            progress(f"artifacts for {', '.join(self.arches)} (wheels)")
            self.wheels = {
                a: ensure_artifacts(a, progress=progress) for a in self.arches
            }

    def provision(self, nodes: int, phases: Phases, progress: Progress) -> list[Host]:
        with phases("connect"):
            if self.given is not None:
                self.hosts = list(self.given)
            else:
                assert self.path is not None
                progress(f"connecting to {len(self.entries)} hosts of {self.path}")
                self.hosts = inventory_hosts(
                    self.path, connect_timeout=self.connect_timeout
                )
        return list(self.hosts)

    def install(
        self, hosts: Sequence[Host], phases: Phases, progress: Progress
    ) -> dict[str, float]:
        if not self.push or self.wheels is None:
            return {}
        progress("installing the wheels (in parallel)")
        with phases("install"):
            return install_all(hosts, self.wheels)

    def teardown(self) -> None:
        if self.given is not None:
            return  # the caller's hosts: the caller closes them
        for host in self.hosts:
            host.close()
        self.hosts = []


def entries_toml(entries: Sequence[InventoryEntry]) -> str:
    """Render entries back to TOML (used to describe booted guests as an inventory)."""
    lines: list[str] = []
    for e in entries:
        lines.append("[[host]]")
        for key in (
            "name", "address", "arch", "port", "user", "key", "host_key", "known_hosts",
            "python", "workdir", "port_base", "peer_address", "deps", "nodes",
        ):  # fmt: skip
            value = getattr(e, key)
            if value is None:
                continue
            if isinstance(value, str):
                lines.append(f"{key} = {_quote(value)}")
            elif isinstance(value, list):
                lines.append(f"{key} = [{', '.join(str(v) for v in value)}]")
            else:
                lines.append(f"{key} = {value}")
        if e.lab_ports:
            lines.append("[host.lab_ports]")
            lines += [f"{k} = {v}" for k, v in sorted(e.lab_ports.items())]
        lines.append("")
    return "\n".join(lines)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
