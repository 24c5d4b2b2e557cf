"""The hosts abstraction: where nodes run, whatever provides the machine.

A provider (local processes, QEMU guests, an SSH inventory, containers)
hands out :class:`Host` objects.  Everything above this layer -- deploying
wheels, starting nodes, running load and faults -- talks only to ``Host``.
"""

from __future__ import annotations

import abc
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class HostError(RuntimeError):
    """A command or transfer on a host failed."""


@dataclass(frozen=True)
class CommandResult:
    """Outcome of one bounded command."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> CommandResult:
        """Raise :class:`HostError` (with the output) unless the exit code is 0."""
        if self.returncode != 0:
            raise HostError(
                f"{' '.join(self.argv)} exited {self.returncode}\n"
                f"stdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}"
            )
        return self


@dataclass(frozen=True)
class Endpoint:
    """A TCP address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Process(abc.ABC):
    """A long-running process started on a host (a node, a load generator)."""

    @property
    @abc.abstractmethod
    def pid(self) -> int:
        """Process id on its host."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """True while the process runs."""

    @abc.abstractmethod
    def send_signal(self, signum: int) -> None:
        """Deliver *signum* to the process (group)."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> int | None:
        """Wait up to *timeout* seconds; return the exit code or None."""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: never leaves the process behind."""
        if not self.alive():
            return self.wait(0)
        self.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        if code is None:
            self.send_signal(signal.SIGKILL)
            code = self.wait(timeout)
        return code


class Host(abc.ABC):
    """One machine that can run nodes."""

    name: str
    arch: str  # platform.machine() of the host: "x86_64" or "aarch64"
    # (what a host's provider can do -- fault kinds, power control -- is declared
    # as Capabilities in plexilab.providers.base, registered per host class)

    @abc.abstractmethod
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run a command to completion (bounded by *timeout*)."""

    @abc.abstractmethod
    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: str,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start a long-running process; its output goes to *log_path* on the host."""

    @abc.abstractmethod
    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to *remote* on the host."""

    @abc.abstractmethod
    def get(self, remote: str, local: Path) -> None:
        """Copy *remote* from the host to a local file."""

    @abc.abstractmethod
    def python(self) -> str:
        """Interpreter on the host that has (or will have) plexichat installed."""

    @abc.abstractmethod
    def workdir(self) -> str:
        """A writable directory on the host for data, logs and wheels."""

    @abc.abstractmethod
    def listen_endpoint(self, index: int) -> Endpoint:
        """Where the node with cluster *index* listens, as seen from the host itself."""

    @abc.abstractmethod
    def lab_endpoint(self, index: int) -> Endpoint:
        """Where the lab (this machine) reaches that node: always on 127.0.0.0/8."""

    @abc.abstractmethod
    def peer_endpoint(self, index: int, from_host: Host) -> Endpoint:
        """Where node *index* on this host is reached from a node on *from_host*."""

    def pause(self, process: Process) -> None:
        """Freeze a node (fault injection): SIGSTOP to its process group."""
        process.send_signal(signal.SIGSTOP)

    def resume(self, process: Process) -> None:
        """Undo :meth:`pause` (harmless on a process that runs)."""
        process.send_signal(signal.SIGCONT)

    def network_for(self, nodes: Sequence[tuple[Host, int]]) -> Any:
        """A partition layer for *nodes* (``(host, node index)``), or None.

        Providers that can cut links between their nodes return an object with
        ``partition(*groups)`` and ``heal()`` (see ``plexilab.run.faults.Network``).
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (and, for VMs, the machine)."""
