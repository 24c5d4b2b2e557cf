"""The provider interface: where a run's hosts come from and what they can do.

A :class:`Provider` makes the hosts of one run and takes them down again; the
run pipeline (:mod:`plexilab.run.pipeline`) drives every provider the same way:

1. :meth:`Provider.preflight` -- can the provider run here at all (raises
   :class:`ProviderUnavailable` with the reason; nothing is started yet);
2. :meth:`Provider.artifacts` -- build or find what the hosts need (wheels,
   images);
3. :meth:`Provider.provision` -- the hosts (boot guests, start containers,
   connect to an inventory);
4. :meth:`Provider.install` -- put plexichat on them (seconds per host);
5. :meth:`Provider.samplers` -- observers called at each step of the run;
6. :meth:`Provider.report` -- the provider's own part of the result
   (:class:`ProviderReport`);
7. :meth:`Provider.teardown` -- always, on success, failure and Ctrl-C.

What a provider's hosts can do is *declared* in :class:`Capabilities`, never
sniffed from the host objects: power control (a hard power cut and a boot),
local Python (its processes run on this machine: they take the lab's venv or
``PYTHONPATH`` and a lab link layer can sit between them) and the fault kinds
it can inject.  :func:`register` ties a host class to its provider's
capabilities, so that code handed bare hosts (``run_cluster(hosts, config)``)
finds them with :func:`capabilities_of`.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from plexilab.host import Host

Progress = Callable[[str], None]

# every fault kind the lab knows (plexilab.run.faults), in the order it cycles them
FAULT_KINDS = ("partition", "kill", "pause", "poweroff", "split")
PROCESS_FAULTS = frozenset({"kill", "pause"})  # anything that takes signals


class ProviderUnavailable(RuntimeError):
    """The provider cannot run here (the message says why); nothing was started."""


@dataclass(frozen=True)
class Capabilities:
    """What the hosts of a provider can do (declared by the provider)."""

    # a node's machine can be powered off hard and booted again (poweroff faults)
    power_control: bool = False
    # processes run on this machine: the lab's venv or PYTHONPATH reaches them,
    # a lab link layer can relay their peer traffic, TLS files are shared
    local_python: bool = False
    # the fault kinds (plexilab.run.faults) the provider can inject
    fault_kinds: frozenset[str] = PROCESS_FAULTS
    # hosts are remote shells whose spawn does not create the node directories
    remote_shell: bool = False

    def supported_faults(self) -> list[str]:
        """The fault kinds, in the lab's order."""
        return [k for k in FAULT_KINDS if k in self.fault_kinds]

    def __and__(self, other: Capabilities) -> Capabilities:
        """What hosts of both providers can do."""
        return Capabilities(
            power_control=self.power_control and other.power_control,
            local_python=self.local_python and other.local_python,
            fault_kinds=self.fault_kinds & other.fault_kinds,
            remote_shell=self.remote_shell or other.remote_shell,
        )


DEFAULT_CAPABILITIES = Capabilities()
_REGISTRY: dict[type[Host], tuple[str, Capabilities]] = {}


def register(host_class: type[Host], provider: str, capabilities: Capabilities) -> None:
    """Declare that *host_class*'s hosts come from *provider*, which can do
    *capabilities* (each provider module registers its host classes)."""
    _REGISTRY[host_class] = (provider, capabilities)


def _declared(host: Host | type[Host]) -> tuple[str, Capabilities]:
    cls = host if isinstance(host, type) else type(host)
    for klass in cls.__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    return "hosts", DEFAULT_CAPABILITIES


def capabilities_of(host: Host | type[Host]) -> Capabilities:
    """The declared capabilities of *host* (a host or a host class)."""
    return _declared(host)[1]


def provider_of(host: Host | type[Host]) -> str:
    """The name of the provider *host* (a host or a host class) comes from."""
    return _declared(host)[0]


def common_capabilities(hosts: Iterable[Host | type[Host]]) -> Capabilities:
    """What every one of *hosts* can do."""
    caps: Capabilities | None = None
    for host in hosts:
        mine = capabilities_of(host)
        caps = mine if caps is None else caps & mine
    return caps or DEFAULT_CAPABILITIES


class PowerControl(Protocol):
    """A host whose machine can be powered off and on (``power_control``)."""

    def power_off(self) -> None: ...

    def power_on(self) -> None: ...


class LocalPython(Protocol):
    """A host whose nodes can run another Python of this machine (``local_python``)."""

    def set_python(self, python: str) -> None: ...


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


class Sampler(Protocol):
    """An observer of a run: called after each step, stopped at the end."""

    def on_step(self, step: str) -> None:
        """*step* ("prepared", "started", "converged", "loaded", "p2p",
        "checked", "stopped") just finished."""

    def stop(self) -> None:
        """The run is over (success or not)."""


@dataclass
class HostReport:
    """What a provider knows about one of its hosts (merged into the rows of
    the nodes on it)."""

    guest: str | None = None
    accel: str | None = None
    boot_s: float | None = None
    vm: dict[str, Any] | None = None
    clock: dict[str, float] | None = None


@dataclass
class ProviderReport:
    """The provider's part of a run's result."""

    runtime: str | None = None
    guests: list[dict[str, Any]] = field(default_factory=list)
    hosts: dict[str, HostReport] = field(default_factory=dict)
    leftover_pids: list[int] = field(default_factory=list)
    docker: dict[str, Any] | None = None
    containers: dict[str, Any] | None = None


class Provider(abc.ABC):
    """Where the hosts of a run come from (see the module docstring)."""

    name: str = "?"
    capabilities: Capabilities = DEFAULT_CAPABILITIES

    def preflight(self, phases: Phases, progress: Progress) -> None:  # noqa: B027
        """Raise :class:`ProviderUnavailable` when the provider cannot run here."""

    def artifacts(self, phases: Phases, progress: Progress) -> None:  # noqa: B027
        """Build or find what the hosts need (before any host exists)."""

    @abc.abstractmethod
    def provision(self, nodes: int, phases: Phases, progress: Progress) -> list[Host]:
        """The hosts of the run (node *i* runs on ``hosts[i % len(hosts)]``)."""

    def install(
        self, hosts: Sequence[Host], phases: Phases, progress: Progress
    ) -> dict[str, float]:
        """Put plexichat on *hosts* (seconds per host name; {}: nothing to do)."""
        return {}

    def samplers(self) -> list[Sampler]:
        """Observers of the run (VM resources, guest clocks...)."""
        return []

    def network(self, nodes: Sequence[tuple[Host, int]]) -> Any:
        """A partition layer for *nodes* (``(host, node index)``), or None.

        Local providers return None: the pipeline puts a lab link layer
        between their nodes instead.
        """
        return None

    def report(self) -> ProviderReport:
        """The provider's part of the result (after :meth:`teardown`)."""
        return ProviderReport()

    @abc.abstractmethod
    def teardown(self) -> None:
        """Release every host (idempotent; runs on success, failure and Ctrl-C)."""


class StaticProvider(Provider):
    """Hosts made by the caller (a test, a legacy entry point): no set-up of
    its own; teardown leaves them to the caller."""

    name = "hosts"

    def __init__(
        self,
        hosts: Sequence[Host],
        capabilities: Capabilities | None = None,
        *,
        name: str | None = None,
    ) -> None:
        if not hosts:
            raise ValueError("a run needs at least one host")
        self.hosts = list(hosts)
        self.capabilities = capabilities or common_capabilities(self.hosts)
        self.name = name or provider_of(self.hosts[0])

    def provision(self, nodes: int, phases: Phases, progress: Progress) -> list[Host]:
        return list(self.hosts)

    def network(self, nodes: Sequence[tuple[Host, int]]) -> Any:
        return self.hosts[0].network_for(nodes)

    def teardown(self) -> None:
        pass
