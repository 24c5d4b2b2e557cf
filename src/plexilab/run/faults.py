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

The network layer is :class:`plexilab.infra.links.LinkLayer` for local processes.
Results: :func:`timeline` (fault windows relative to the load start) and
:func:`availability` (requests acked and failed inside and outside them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from plexilab.host import Host
from plexilab.proc import Deadline
from plexilab.providers.base import FAULT_KINDS, common_capabilities

log = logging.getLogger("plexilab.run.faults")

KINDS = FAULT_KINDS
NETWORK_KINDS = frozenset({"partition", "split"})
FIRST_FAULT_S = 1.0  # load warm-up before the first fault


class FaultError(ValueError):
    """A fault specification that cannot be honoured (unknown or unsupported)."""


class TargetNode(Protocol):
    """One node of a :class:`Target`."""

    @property
    def index(self) -> int: ...

    @property
    def node_id(self) -> str: ...


class Target(Protocol):
    """What the nemesis breaks: a cluster's process-level controls."""

    @property
    def nodes(self) -> Sequence[TargetNode]: ...

    def kill(self, index: int) -> None: ...

    def restart(self, index: int) -> None: ...

    def pause(self, index: int) -> None: ...

    def resume(self, index: int) -> None: ...

    def poweroff(self, index: int) -> None: ...

    def poweron(self, index: int) -> None: ...


class Network(Protocol):
    """What a provider's network layer does for partitions."""

    def partition(self, *groups: Sequence[int]) -> int:
        """Nodes in different groups cannot reach each other."""

    def heal(self) -> None:
        """Undo every partition."""


def supported(hosts: Sequence[Host | type[Host]]) -> list[str]:
    """Fault kinds every one of *hosts* (or host classes) can take, in order
    (as their providers declare them)."""
    return common_capabilities(hosts).supported_faults()


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
            "nodes": list(self.nodes),
            "start_s": round(self.start - t0, 3),
            "end_s": None if self.end is None else round(self.end - t0, 3),
        }
        if self.error:
            row["error"] = self.error
        return row


class Nemesis:
    """Applies and heals faults on a cluster, in a thread."""

    def __init__(
        self,
        cluster: Target,
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
        limit = Deadline(60.0)  # the load's journal appears when it runs
        while self.ready is not None and not self.ready():
            if self._stop.wait(0.05) or limit.expired():
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


def _windows(
    faults: Sequence[dict[str, Any]],
) -> list[tuple[float, float, str, set[int]]]:
    return [
        (
            float(f["start_s"]),
            float(f["end_s"]),
            str(f.get("kind", "?")),
            {int(i) for i in f.get("nodes") or []},
        )
        for f in faults
        if f.get("end_s") is not None
    ]


def _side_counts(row: dict[str, Any], targets: set[int]) -> tuple[int, int]:
    """Acked and failed requests *row* sent to nodes outside *targets*."""
    by_node = row.get("by_node")
    if not by_node:
        return 0, 0
    ok = sum(int(c[0]) for i, c in enumerate(by_node) if i not in targets)
    failed = sum(int(c[1]) for i, c in enumerate(by_node) if i not in targets)
    return ok, failed


def availability(
    timeline_rows: Sequence[dict[str, Any]],
    faults: Sequence[dict[str, Any]],
    interval: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Requests acked/failed in timeline buckets inside and outside fault windows.

    A bucket (``t_s - interval .. t_s``) belongs to the faults when its middle
    lies in a window ``start_s .. end_s``.  Besides ``during_faults`` and
    ``outside_faults`` there is one ``during_<kind>`` entry per fault kind and,
    when the timeline counts requests per node (``by_node``), one
    ``during_<kind>_healthy_side`` entry: requests sent to the nodes the fault
    did not touch (for a partition: the majority side).
    """
    windows = _windows(faults)
    kinds = list(dict.fromkeys(w[2] for w in windows))
    names = ["during_faults", "outside_faults"]
    names += [f"during_{k}" for k in kinds]
    per_node = any(row.get("by_node") for row in timeline_rows)
    if per_node:
        names += [f"during_{k}_healthy_side" for k in kinds]
    out = {name: {"ok": 0.0, "failed": 0.0, "seconds": 0.0} for name in names}
    for row in timeline_rows:
        middle = float(row["t_s"]) - interval / 2
        window = next((w for w in windows if w[0] <= middle < w[1]), None)
        counts = [(int(row.get("acked", 0)), int(row.get("failed", 0)))]
        targets = ["outside_faults"]
        if window is not None:
            targets = ["during_faults", f"during_{window[2]}"]
            counts.append(counts[0])
            if per_node:
                targets.append(f"during_{window[2]}_healthy_side")
                counts.append(_side_counts(row, window[3]))
        for name, (ok, failed) in zip(targets, counts, strict=True):
            bucket = out[name]
            bucket["ok"] += ok
            bucket["failed"] += failed
            bucket["seconds"] += interval
    for bucket in out.values():
        total = bucket["ok"] + bucket["failed"]
        bucket["ok_share"] = round(bucket["ok"] / total, 4) if total else 0.0
        bucket["acked_per_s"] = (
            round(bucket["ok"] / bucket["seconds"], 1) if bucket["seconds"] else 0.0
        )
        bucket["ok"], bucket["failed"] = int(bucket["ok"]), int(bucket["failed"])
    return out


def service(
    timeline_rows: Sequence[dict[str, Any]],
    faults: Sequence[dict[str, Any]],
    interval: float = 1.0,
    *,
    threshold: float = 0.99,
) -> list[dict[str, Any]]:
    """Per fault: how its healthy side was served while it lasted.

    ``healthy_ok_share`` counts requests sent to the nodes the fault did not
    touch; ``served_after_s`` is the time from the fault's start to the end of
    the first bucket inside the window in which at least *threshold* of those
    requests succeeded (None: never during the fault).
    """
    rows = sorted(timeline_rows, key=lambda r: float(r["t_s"]))
    out: list[dict[str, Any]] = []
    for start, end, kind, nodes in _windows(faults):
        ok = failed = 0
        served: float | None = None
        for row in rows:
            t_end = float(row["t_s"])
            if not (start <= t_end - interval / 2 < end):
                continue
            r_ok, r_failed = _side_counts(row, nodes)
            ok += r_ok
            failed += r_failed
            total = r_ok + r_failed
            if served is None and total and r_ok / total >= threshold:
                served = round(max(0.0, t_end - start), 3)
        total = ok + failed
        out.append(
            {
                "kind": kind,
                "nodes": sorted(nodes),
                "start_s": start,
                "healthy_ok": ok,
                "healthy_failed": failed,
                "healthy_ok_share": round(ok / total, 4) if total else None,
                "served_after_s": served,
            }
        )
    return out
