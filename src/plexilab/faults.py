"""Fault injection for cluster runs: a Jepsen-style nemesis next to the load.

Every ``interval`` seconds (from one second after the load starts) the
:class:`Nemesis` applies one fault, keeps it for ``duration`` seconds
(default ``interval / 2``) and heals it before the next one; whatever is
still broken when the load ends is healed, then the run waits for the
cluster to converge before the checker judges it.  Kinds cycle in the order
given; targets rotate over the nodes:

* ``partition``: one node is cut off from every other node (its peers'
  connections are refused and cut by the network layer; clients still reach
  it, as in a real partition between servers);
* ``kill``: SIGKILL of a node's process, restarted on the same data dir;
* ``pause``: SIGSTOP/SIGCONT of the process (a QEMU guest: QMP stop/cont);
* ``poweroff``: a QEMU guest is powered off hard and booted again, then its
  node is restarted (providers with machines only);
* ``split``: a minority of ``(n - 1) // 2`` nodes (at least one) against the
  majority.

The network layer is :class:`plexilab.links.LinkLayer` for local processes.
Results: :func:`timeline` (fault windows relative to the load start) and
:func:`availability` (requests acked and failed inside and outside them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from plexilab.hosts.base import Host

if TYPE_CHECKING:
    from plexilab.cluster import Cluster

log = logging.getLogger("plexilab.faults")

KINDS = ("partition", "kill", "pause", "poweroff", "split")
NETWORK_KINDS = frozenset({"partition", "split"})
FIRST_FAULT_S = 1.0  # load warm-up before the first fault


class FaultError(ValueError):
    """A fault specification that cannot be honoured (unknown or unsupported)."""


class Network(Protocol):
    """What a provider's network layer does for partitions."""

    def partition(self, *groups: Sequence[int]) -> int:
        """Nodes in different groups cannot reach each other."""

    def heal(self) -> None:
        """Undo every partition."""


def supported(hosts: Sequence[Host | type[Host]]) -> list[str]:
    """Fault kinds every one of *hosts* (or host classes) can take, in order."""
    common = set(KINDS)
    for host in hosts:
        common &= set(host.fault_kinds)
    return [k for k in KINDS if k in common]


def parse_kinds(
    spec: str | Sequence[str], available: Sequence[str], provider: str
) -> list[str]:
    """``--faults`` as a list of kinds.

    ``none`` (or empty) is no faults; ``default`` every kind in *available*;
    otherwise a comma list, each kind known and in *available*.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip().lower() for s in items if s.strip()]
    if not names or names == ["none"]:
        return []
    if names == ["default"]:
        return list(available)
    out: list[str] = []
    for name in names:
        if name not in KINDS:
            raise FaultError(
                f"unknown fault kind {name!r}: choose from {', '.join(KINDS)}, "
                "'default' or 'none'"
            )
        if name not in available:
            raise FaultError(
                f"the {provider} provider cannot inject {name!r} faults "
                f"(it supports: {', '.join(available) or 'none'})"
            )
        if name not in out:
            out.append(name)
    return out


@dataclass
class Fault:
    """One injected fault (wall-clock times)."""

    kind: str
    target: str
    nodes: list[int]
    start: float
    end: float | None = None
    error: str | None = None

    def as_dict(self, t0: float) -> dict[str, Any]:
        row: dict[str, Any] = {
            "kind": self.kind,
            "target": self.target,
            "start_s": round(self.start - t0, 3),
            "end_s": None if self.end is None else round(self.end - t0, 3),
        }
        if self.error:
            row["error"] = self.error
        return row


class Nemesis:
    """Applies and heals faults on a :class:`~plexilab.cluster.Cluster` in a thread."""

    def __init__(
        self,
        cluster: Cluster,
        kinds: Sequence[str],
        *,
        interval: float,
        duration: float = 0.0,
        horizon: float,
        network: Network | None = None,
        ready: Callable[[], bool] | None = None,
        first: float = FIRST_FAULT_S,
    ) -> None:
        if interval <= 0:
            raise FaultError("--fault-interval must be positive")
        self.duration = duration or interval / 2
        if self.duration >= interval:
            raise FaultError(
                "a fault must be healed before the next: duration < interval"
            )
        if NETWORK_KINDS.intersection(kinds) and network is None:
            raise FaultError("partitions need a network layer")
        if len(cluster.nodes) < 2 and NETWORK_KINDS.intersection(kinds):
            raise FaultError("a partition needs at least two nodes")
        self.cluster = cluster
        self.kinds = list(kinds)
        self.interval = interval
        self.horizon = horizon
        self.network = network
        self.ready = ready
        self.first = first
        self.faults: list[Fault] = []
        self.started_at = 0.0
        self._rotation: dict[str, int] = {}
        self._active: Fault | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- plan ---------------------------------------------------------------------

    def plan(self, slot: int) -> tuple[str, list[int]]:
        """Kind and target nodes of fault number *slot* (deterministic rotation)."""
        kind = self.kinds[slot % len(self.kinds)]
        turn = self._rotation.get(kind, 0)
        self._rotation[kind] = turn + 1
        n = len(self.cluster.nodes)
        if kind == "split":
            size = max(1, (n - 1) // 2)
            return kind, sorted((turn + j) % n for j in range(size))
        return kind, [turn % n]

    def _describe(self, kind: str, nodes: list[int]) -> str:
        ids = [self.cluster.nodes[i].node_id for i in nodes]
        if kind in NETWORK_KINDS:
            rest = [n.node_id for n in self.cluster.nodes if n.index not in nodes]
            return f"{','.join(ids)}|{','.join(rest)}"
        return ",".join(ids)

    # -- apply / heal -------------------------------------------------------------

    def apply(self, kind: str, nodes: list[int]) -> None:
        """Break *nodes* in the way *kind* says (returns once it is in effect)."""
        cluster = self.cluster
        if kind in NETWORK_KINDS:
            assert self.network is not None
            rest = [i for i in range(len(cluster.nodes)) if i not in nodes]
            self.network.partition(nodes, rest)
        elif kind == "kill":
            for i in nodes:
                cluster.kill(i)
        elif kind == "pause":
            for i in nodes:
                cluster.pause(i)
        elif kind == "poweroff":
            for i in nodes:
                cluster.poweroff(i)
        else:
            raise FaultError(f"unknown fault kind {kind!r}")

    def heal(self, kind: str, nodes: list[int]) -> None:
        """Undo :meth:`apply`."""
        cluster = self.cluster
        if kind in NETWORK_KINDS:
            assert self.network is not None
            self.network.heal()
        elif kind == "kill":
            for i in nodes:
                cluster.restart(i)
        elif kind == "pause":
            for i in nodes:
                cluster.resume(i)
        elif kind == "poweroff":
            for i in nodes:
                cluster.poweron(i)

    # -- the thread -----------------------------------------------------------------

    def start(self) -> Nemesis:
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._thread.start()
        return self

    def _sleep_until(self, deadline: float) -> bool:
        """Wait until the wall-clock *deadline*; False if stopped first."""
        return not self._stop.wait(max(0.0, deadline - time.time()))

    def _run(self) -> None:
        limit = time.monotonic() + 60.0
        while self.ready is not None and not self.ready():
            if self._stop.wait(0.05) or time.monotonic() > limit:
                break
        self.started_at = t0 = time.time()
        slot = 0
        while not self._stop.is_set():
            at = self.first + slot * self.interval
            if at + self.duration > self.horizon + 1e-6:
                break
            if not self._sleep_until(t0 + at):
                break
            kind, nodes = self.plan(slot)
            slot += 1
            fault = Fault(kind, self._describe(kind, nodes), nodes, time.time())
            with self._lock:
                self.faults.append(fault)
                self._active = fault
            log.info("fault %s %s", kind, fault.target)
            try:
                self.apply(kind, nodes)
            except Exception as exc:  # recorded: the run reports it and fails
                log.exception("applying %s to %s failed", kind, fault.target)
                fault.error = f"apply: {exc}"
            self._sleep_until(t0 + at + self.duration)
            self._heal_active()

    def _heal_active(self) -> None:
        with self._lock:
            fault, self._active = self._active, None
        if fault is None:
            return
        try:
            self.heal(fault.kind, fault.nodes)
        except Exception as exc:
            log.exception("healing %s of %s failed", fault.kind, fault.target)
            fault.error = (fault.error + "; " if fault.error else "") + f"heal: {exc}"
        fault.end = time.time()
        log.info("healed %s %s", fault.kind, fault.target)

    def stop(self, timeout: float = 120.0) -> None:
        """Stop injecting, heal the fault in progress, wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._heal_active()

    @property
    def errors(self) -> list[str]:
        return [f"{f.kind} {f.target}: {f.error}" for f in self.faults if f.error]

    def timeline(self, t0: float) -> list[dict[str, Any]]:
        """The faults with times relative to *t0* (the load start, unix seconds)."""
        return [f.as_dict(t0) for f in self.faults]


def availability(
    timeline_rows: Sequence[dict[str, Any]],
    faults: Sequence[dict[str, Any]],
    interval: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Requests acked/failed in timeline buckets inside and outside fault windows.

    A bucket (``t_s - interval .. t_s``) belongs to the faults when its middle
    lies in a window ``start_s .. end_s``.  Besides ``during_faults`` and
    ``outside_faults`` there is one ``during_<kind>`` entry per fault kind.
    """
    windows = [
        (float(f["start_s"]), float(f["end_s"]), str(f.get("kind", "?")))
        for f in faults
        if f.get("end_s") is not None
    ]
    names = ["during_faults", "outside_faults"]
    names += [f"during_{k}" for k in dict.fromkeys(w[2] for w in windows)]
    out = {name: {"ok": 0.0, "failed": 0.0, "seconds": 0.0} for name in names}
    for row in timeline_rows:
        middle = float(row["t_s"]) - interval / 2
        kind = next((k for start, end, k in windows if start <= middle < end), None)
        targets = ["outside_faults"] if kind is None else ["during_faults"]
        if kind is not None:
            targets.append(f"during_{kind}")
        for name in targets:
            bucket = out[name]
            bucket["ok"] += int(row.get("acked", 0))
            bucket["failed"] += int(row.get("failed", 0))
            bucket["seconds"] += interval
    for bucket in out.values():
        total = bucket["ok"] + bucket["failed"]
        bucket["ok_share"] = round(bucket["ok"] / total, 4) if total else 0.0
        bucket["acked_per_s"] = (
            round(bucket["ok"] / bucket["seconds"], 1) if bucket["seconds"] else 0.0
        )
        bucket["ok"], bucket["failed"] = int(bucket["ok"]), int(bucket["failed"])
    return out
