"""Deterministic simulation of the channel ownership state machine (issue 11).

A seeded simulator drives 3..5 :class:`ChannelReplica` nodes of one channel
over a simulated network with a fake clock: client writes through any node
(forwarded to the owner a node believes in), ownership changes (a node starts
a term with a replica set of its choosing, as a divergent ring view would),
partitions (sets of cut links), kills and restarts (the durable state stays),
pauses, and delayed, duplicated and reordered messages.  The invariants are
checked after every step; a failure names the seed that reproduces it::

    PLEXICHAT_SIM_SEED=<seed> PLEXICHAT_SIM_FAULTS=<faults> \
        pytest tests/node/test_ownership_sim.py

Longer runs: ``PLEXICHAT_SIM_STEPS`` (steps per run, default 2500) and
``PLEXICHAT_SIM_SEEDS`` (runs per fault kind, default 3).  The state machine is
not wired into the node yet; this tests the model only.
"""

from __future__ import annotations

import os
import random
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import SupportsIndex

import pytest

from plexichat.node.ownership import (
    Ack,
    ChannelReplica,
    Deliver,
    Durable,
    Effect,
    Entry,
    Message,
    Refuse,
    Role,
)

CHANNEL = 7
FAULTS = ("partition", "kill", "pause", "delay", "duplicate", "reorder")
STEPS = int(os.environ.get("PLEXICHAT_SIM_STEPS", "2500"))
SEEDS = int(os.environ.get("PLEXICHAT_SIM_SEEDS", "3"))


class TrackedLog(list[Entry]):
    """A log that remembers the lowest index changed since the last check."""

    low: int = 0

    def append(self, e: Entry) -> None:
        self.low = min(self.low, len(self))
        super().append(e)

    def __delitem__(self, key: SupportsIndex | slice) -> None:
        start = key.start if isinstance(key, slice) else int(key)
        self.low = min(self.low, start or 0)
        super().__delitem__(key)


@dataclass(frozen=True, slots=True)
class ClientWrite:
    """A SEND forwarded between nodes (simulator level)."""

    src: str
    dst: str
    msg_id: bytes
    hops: int


Packet = Message | ClientWrite


@dataclass(order=True)
class Flight:
    at: int
    n: int
    packet: Packet = field(compare=False)


class SimFailure(AssertionError):
    pass


class Sim:
    def __init__(self, seed: int, faults: Iterable[str], replicas: int = 2) -> None:
        self.seed = seed
        self.faults = frozenset(faults)
        self.calm = False  # no more faults: healing
        self.rng = random.Random(seed)
        self.n = self.rng.randint(3, 5)
        self.replicas = replicas
        self.ids = [f"n{i}" for i in range(self.n)]
        self.disks = {i: Durable(log=TrackedLog()) for i in self.ids}
        self.nodes: dict[str, ChannelReplica | None] = {
            i: ChannelReplica(i, CHANNEL, self.ids, self.disks[i]) for i in self.ids
        }
        self.paused: set[str] = set()
        # node -> (config it believes it should own, retries left): its ring view
        self.want: dict[str, tuple[tuple[str, ...], int]] = {}
        self.cut: set[frozenset[str]] = set()
        self.flight: list[Flight] = []
        self.link_at: dict[tuple[str, str], int] = {}
        self.now = 0
        self.sent = 0
        self.step_no = 0
        self.acked: dict[bytes, int] = {}
        self.new_acks: list[tuple[bytes, int]] = []
        self.history: list[bytes] = []
        self.in_history: set[bytes] = set()
        self.submitted: list[bytes] = []
        self.delivered = dict.fromkeys(self.ids, 0)
        self.checked = dict.fromkeys(self.ids, 0)  # committed prefix verified
        self.chains: dict[str, list[int]] = {i: [] for i in self.ids}
        self.chain_at: dict[tuple[int, int], int] = {}
        self.owners: set[tuple[str, int]] = set()
        self.stats: Counter[str] = Counter()
        self.trace: deque[str] = deque(maxlen=40)

    # -- failure reporting -------------------------------------------------

    def fail(self, what: str) -> SimFailure:
        faults = ",".join(sorted(self.faults)) or "none"
        return SimFailure(
            f"{what}\n  at step {self.step_no} of seed {self.seed} (faults {faults},"
            f" {self.n} nodes); reproduce with PLEXICHAT_SIM_SEED={self.seed}"
            f" PLEXICHAT_SIM_FAULTS={faults}\n  last events:\n    "
            + "\n    ".join(self.trace)
        )

    # -- network -------------------------------------------------------------

    def send(self, p: Packet) -> None:
        copies = 1
        if "duplicate" in self.faults and not self.calm and self.rng.random() < 0.1:
            copies = 2
            self.stats["duplicated"] += 1
        for _ in range(copies):
            delay = self.rng.randint(1, 30) if "delay" in self.faults else 1
            if self.calm:
                delay = 1
            at = self.now + delay
            link = (p.src, p.dst)
            if "reorder" not in self.faults or self.calm:  # FIFO per link
                at = max(at, self.link_at.get(link, 0))
                self.link_at[link] = at
            self.sent += 1
            self.flight.append(Flight(at, self.sent, p))

    def run(self, node: str, effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Ack):
                old = self.acked.get(e.msg_id)
                if old is not None and old != e.seq:
                    raise self.fail(f"{e.msg_id!r} acked at {old} and at {e.seq}")
                self.acked[e.msg_id] = e.seq
                self.new_acks.append((e.msg_id, e.seq))
                self.stats["acked"] += 1
            elif isinstance(e, Refuse):
                self.stats["refused"] += 1
            elif isinstance(e, Deliver):
                first = e.entries[0].seq
                if first != self.delivered[node] + 1:
                    raise self.fail(
                        f"{node} DELIVER starts at {first} after"
                        f" {self.delivered[node]}: a gap or a repeat"
                    )
                self.delivered[node] = e.entries[-1].seq
            else:
                self.send(e)

    def deliver(self, f: Flight) -> None:
        p = f.packet
        node = self.nodes[p.dst]
        if node is None or frozenset((p.src, p.dst)) in self.cut:
            self.stats["dropped"] += 1
            return
        self.stats["delivered"] += 1
        self.trace.append(f"t={self.now} {p}"[:300])
        if isinstance(p, ClientWrite):
            self.write_at(p.dst, p.msg_id, p.hops)
        else:
            self.run(p.dst, node.receive(p))

    def due(self) -> list[Flight]:
        return [
            f
            for f in self.flight
            if f.at <= self.now and f.packet.dst not in self.paused
        ]

    # -- client and faults ---------------------------------------------------

    def write_at(self, at: str, msg_id: bytes, hops: int) -> None:
        node = self.nodes[at]
        if node is None:
            return
        hint = node.owner_hint()
        if hint is None or hint == at or hops >= 2:
            self.run(at, node.submit(msg_id))
        else:
            self.send(ClientWrite(at, hint, msg_id, hops + 1))

    def live(self) -> list[str]:
        return [
            i for i in self.ids if self.nodes[i] is not None and i not in self.paused
        ]

    def step(self) -> None:
        self.step_no += 1
        rng = self.rng
        kinds = ["deliver", "write", "tick", "view"]
        weights = [60.0, 15.0, 6.0, 2.0]
        chaos = [f for f in ("partition", "kill", "pause") if f in self.faults]
        for f in chaos:
            kinds.append(f)
            weights.append(4.0 / len(chaos) + 1.0)
        kind = rng.choices(kinds, weights)[0]
        self.stats[kind] += 1
        live = self.live()
        if kind == "deliver":  # a burst of messages, one at a time
            for _ in range(rng.randint(1, 12)):
                due = self.due()
                if not due:  # the fake clock jumps to the next arrival
                    waiting = [
                        f.at for f in self.flight if f.packet.dst not in self.paused
                    ]
                    self.now = max(self.now + 1, min(waiting, default=0))
                    break
                f = rng.choice(due) if "reorder" in self.faults else min(due)
                self.flight.remove(f)
                self.deliver(f)
                self.check()
        elif kind == "write" and live:
            if self.submitted and rng.random() < 0.25:
                msg_id = rng.choice(self.submitted)
                self.stats["retries"] += 1
            else:
                msg_id = b"m%d" % len(self.submitted)
                self.submitted.append(msg_id)
            at = rng.choice(live)
            self.trace.append(f"t={self.now} write {msg_id!r} at {at}")
            self.write_at(at, msg_id, 0)
        elif kind == "tick":
            self.now += rng.randint(1, 10)
            for i in live:
                node = self.nodes[i]
                assert node is not None
                self.run(i, node.tick())
                want = self.want.get(i)
                if want and node.role is Role.FOLLOWER and rng.random() < 0.3:
                    # its view still says it owns: try again (random backoff)
                    self.want[i] = (want[0], want[1] - 1)
                    if want[1] <= 1:
                        del self.want[i]
                    self.trace.append(f"t={self.now} {i} retries term {want[0]}")
                    self.run(i, node.start_term(want[0]))
        elif kind == "view" and live:
            c = rng.choice(live)
            others = [i for i in self.ids if i != c]
            members = (c, *rng.sample(others, min(self.replicas - 1, len(others))))
            self.trace.append(f"t={self.now} view: {c} starts term with {members}")
            for i in list(self.want):  # most nodes learn the new view
                if rng.random() < 0.8:
                    del self.want[i]
            self.want[c] = (members, 5)
            node = self.nodes[c]
            assert node is not None
            self.run(c, node.start_term(members))
        elif kind == "partition":
            if self.cut and rng.random() < 0.4:
                self.cut.clear()
            elif rng.random() < 0.5:
                lonely = rng.choice(self.ids)
                self.cut = {frozenset((lonely, o)) for o in self.ids if o != lonely}
            else:
                pairs = [frozenset((a, b)) for a in self.ids for b in self.ids if a < b]
                self.cut = {p for p in pairs if rng.random() < 0.4}
            self.trace.append(f"t={self.now} cut {sorted(map(sorted, self.cut))}")
        elif kind == "kill":
            dead = [i for i in self.ids if self.nodes[i] is None]
            if dead and rng.random() < 0.7:
                i = rng.choice(dead)
                self.nodes[i] = ChannelReplica(i, CHANNEL, self.ids, self.disks[i])
                self.delivered[i] = self.disks[i].commit  # subscribers re-fetch
                self.trace.append(f"t={self.now} restart {i}")
            elif live:
                i = rng.choice(live)
                self.nodes[i] = None
                self.flight = [f for f in self.flight if f.packet.dst != i]
                self.trace.append(f"t={self.now} kill {i}")
        elif kind == "pause":
            if self.paused and rng.random() < 0.7:
                self.paused.discard(rng.choice(sorted(self.paused)))
            elif live:
                self.paused.add(rng.choice(live))
            self.trace.append(f"t={self.now} paused {sorted(self.paused)}")
        self.check()

    # -- invariants ----------------------------------------------------------

    def check(self) -> None:
        for i in self.ids:
            self.check_node(i)
        for msg_id, seq in self.new_acks:
            # (c) an acknowledged message is committed at its seq; the committed
            # history never changes (check_node), so it stays there forever
            if seq > len(self.history) or self.history[seq - 1] != msg_id:
                raise self.fail(f"acked {msg_id!r} at {seq} is not committed there")
        self.new_acks.clear()
        for i in self.ids:
            node = self.nodes[i]
            if node is not None and node.role is Role.OWNER:
                key = (i, node.term)
                if key not in self.owners:
                    self.owners.add(key)
                    self.check_owner(node)

    def check_node(self, i: str) -> None:
        d = self.disks[i]
        log = d.log
        assert isinstance(log, TrackedLog)
        chain = self.chains[i]
        low = min(log.low, len(chain))
        del chain[low:]
        for e in log[low:]:
            # Log Matching: one (term, seq) names one record with one prefix
            if e.seq != len(chain) + 1:
                raise self.fail(f"{i}: log not gap-free at {e}")
            h = hash((chain[-1] if chain else 0, e.term, e.msg_id))
            chain.append(h)
            seen = self.chain_at.setdefault((e.term, e.seq), h)
            if seen != h:
                raise self.fail(f"{i}: (term, seq) {e.term, e.seq} names two histories")
        log.low = len(log)
        if d.commit > len(log):
            raise self.fail(f"{i}: commit {d.commit} past its log {len(log)}")
        # (a)/(b) the committed prefix agrees with every other one
        start = self.checked[i]
        if d.commit < start:
            raise self.fail(f"{i}: commit went back from {start} to {d.commit}")
        h = self.history
        for e in log[start : d.commit]:
            if e.seq <= len(h):
                if h[e.seq - 1] != e.msg_id:
                    raise self.fail(
                        f"{i} committed {e.msg_id!r} at {e.seq}, another node"
                        f" {h[e.seq - 1]!r}"
                    )
            else:
                if e.msg_id in self.in_history:  # (d) at most once
                    raise self.fail(f"{e.msg_id!r} committed twice (again at {e.seq})")
                h.append(e.msg_id)
                self.in_history.add(e.msg_id)
        self.checked[i] = d.commit

    def check_owner(self, node: ChannelReplica) -> None:
        """Owner completeness (Raft's Leader Completeness): an owner holds
        every record committed in lower terms.  Only checked while no node
        promised a higher term: a candidate paused with its ACCEPTEDs
        queued can become owner after later terms committed more.  It
        then cannot commit anything (its members refuse it), and what it
        installed is a prefix of the history (``check_node``)."""
        if max(d.promised for d in self.disks.values()) > node.term:
            self.stats["stale_owners"] += 1
            return
        h = self.history
        mine = [e.msg_id for e in node.log[: len(h)]]
        if mine != h:
            raise self.fail(f"new owner {node.node} (term {node.term}) lacks history")

    # -- the end: heal and check that the system still works -------------------

    def heal(self) -> None:
        self.step_no += 1
        self.cut.clear()
        self.paused.clear()
        self.calm = True
        for i in self.ids:
            if self.nodes[i] is None:
                self.nodes[i] = ChannelReplica(i, CHANNEL, self.ids, self.disks[i])
                self.delivered[i] = self.disks[i].commit
        self.drain()
        c = self.ids[0]
        members = tuple(self.ids[: self.replicas])
        final = b"final"
        for _ in range(20):
            node = self.nodes[c]
            assert node is not None
            if node.role is not Role.OWNER:
                self.run(c, node.start_term(members))
            self.drain()
            if node.role is Role.OWNER:
                self.run(c, node.submit(final))
                self.drain()
                if final in self.acked:
                    break
        else:
            raise self.fail("after healing, no owner acknowledged a write")
        self.check()
        assert node.config is not None
        for i in node.config.members:
            n = self.nodes[i]
            assert n is not None
            if n.commit != node.commit:
                raise self.fail(f"{i} commit {n.commit} != owner's {node.commit}")
        if [e.msg_id for e in node.visible()][: len(self.history)] != self.history:
            raise self.fail("the healed owner lost committed history")
        self.stats["steps"] += self.step_no

    def drain(self) -> None:
        for _ in range(5000):
            due = self.due()
            if not due:
                if not self.flight:
                    for i in self.ids:
                        node = self.nodes[i]
                        assert node is not None
                        if (
                            node.role is not Role.FOLLOWER
                            and node.role is not Role.OWNER
                        ):
                            self.run(i, node.tick())
                    if not self.flight:
                        return
                self.now += 1
                continue
            f = min(due)
            self.flight.remove(f)
            self.deliver(f)
            self.check()
        raise self.fail("the network did not go quiet")


def simulate(seed: int, faults: Iterable[str], steps: int) -> Sim:
    sim = Sim(seed, faults)
    try:
        for _ in range(steps):
            sim.step()
        sim.heal()
    except SimFailure:
        raise
    except Exception as exc:  # a SafetyError or a crash: name the seed
        raise sim.fail(f"{type(exc).__name__}: {exc}") from exc
    return sim


def runs() -> list[tuple[int, tuple[str, ...]]]:
    only = os.environ.get("PLEXICHAT_SIM_SEED")
    if only is not None:
        spec = os.environ.get("PLEXICHAT_SIM_FAULTS", "none")
        faults = () if spec == "none" else tuple(spec.split(","))
        return [(int(only), faults)]
    kinds: list[tuple[str, ...]] = [(), *((f,) for f in FAULTS), FAULTS]
    return [(1000 * k + s, kind) for k, kind in enumerate(kinds) for s in range(SEEDS)]


@pytest.mark.parametrize(
    ("seed", "faults"),
    runs(),
    ids=lambda v: (",".join(v) or "none") if isinstance(v, tuple) else str(v),
)
def test_simulation_keeps_the_invariants(seed: int, faults: tuple[str, ...]) -> None:
    sim = simulate(seed, faults, STEPS)
    # the run did something: writes were acknowledged, owners changed
    assert sim.stats["acked"] > 0, sim.stats
    assert len(sim.owners) >= 1, sim.stats
    print(f"seed {seed} faults {faults}: {dict(sim.stats)}")
