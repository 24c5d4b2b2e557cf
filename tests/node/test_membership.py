"""Unit tests of the SWIM membership: a manual clock and an in-memory transport.

Every node of a test lives in one event loop; :class:`FakeNet` routes their
PING and GOSSIP calls to each other directly (through a JSON round trip, as
the wire would) and can drop the calls to or from chosen members.  Time only
moves when a test advances the shared :class:`ManualClock`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from plexichat.node.membership import (
    LIVE,
    MONOTONIC,
    RANK,
    GossipConfig,
    ManualClock,
    Member,
    Membership,
    MonotonicClock,
    check_update,
    parse_update,
)
from plexichat.node.testing import wait_for
from plexichat.routing import Ring
from plexichat.wire import MessageType

HOST = "127.0.0.1"  # fake addresses: FakeNet never opens a socket
SUSPECT_TIMEOUT = 3.0


def config(**overrides: Any) -> GossipConfig:
    values: dict[str, Any] = {
        "interval": 0.01,
        "ping_timeout": 0.05,
        "suspect_timeout": SUSPECT_TIMEOUT,
        "indirect": 2,
    }
    values.update(overrides)
    return GossipConfig(**values)


def upd(
    node_id: str,
    inc: int,
    status: str = "alive",
    *,
    port: int = 9000,
    host: str = HOST,
    weight: float = 1.0,
) -> list[Any]:
    return [node_id, host, port, inc, status, weight]


@dataclass
class Call:
    sender: str
    address: tuple[str, int]
    type: int
    kind: str | None
    delivered: bool


@dataclass
class FakeNet:
    """Routes gossip calls between Membership instances of one event loop."""

    nodes: dict[tuple[str, int], Membership] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)  # ids that neither send nor receive
    cut: set[frozenset[str]] = field(default_factory=set)  # pairs that cannot talk
    explode: int = 0  # the next calls raise instead of answering
    gate: asyncio.Event | None = None  # when set up, calls wait for it
    entered: asyncio.Event | None = None  # set when a call waits at the gate
    calls: list[Call] = field(default_factory=list)

    def add(
        self,
        node_id: str,
        clock: ManualClock,
        *,
        seeds: tuple[tuple[str, int], ...] = (),
        weight: float = 1.0,
        cfg: GossipConfig | None = None,
        changes: list[str] | None = None,
    ) -> Membership:
        port = 7000 + len(self.nodes)
        member = Membership(
            node_id,
            HOST,
            port,
            FakeTransport(self, node_id),
            weight=weight,
            config=cfg or config(),
            on_change=(lambda: changes.append(node_id))
            if changes is not None
            else None,
            seeds=seeds,
            clock=clock,
        )
        self.nodes[(HOST, port)] = member
        return member

    def reachable(self, a: str, b: str) -> bool:
        return a not in self.down and b not in self.down and {a, b} not in self.cut

    def sent(self, sender: str, type: int, kind: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.sender == sender and c.type == type and c.kind == kind
        ]


class FakeTransport:
    def __init__(self, net: FakeNet, sender: str) -> None:
        self.net = net
        self.sender = sender

    async def gossip_call(
        self, host: str, port: int, type: int, body: dict[str, Any], timeout: float
    ) -> dict[str, Any] | None:
        net = self.net
        target = net.nodes.get((host, port))
        delivered = target is not None and net.reachable(self.sender, target.id)
        net.calls.append(
            Call(self.sender, (host, port), int(type), body.get("kind"), delivered)
        )
        if net.gate is not None:
            assert net.entered is not None
            net.entered.set()
            await net.gate.wait()
        if net.explode:
            net.explode -= 1
            raise RuntimeError("transport exploded")
        if not delivered:
            return None
        assert target is not None
        assert timeout > 0
        body = json.loads(json.dumps(body))  # what the wire would carry
        if type == MessageType.PING:
            reply = target.handle_ping(body)
        else:
            assert type == MessageType.GOSSIP
            try:
                reply = await target.handle_gossip(body)
            except ValueError:  # the node answers ERROR: a failed call
                return None
        return json.loads(json.dumps(reply))


def mesh(*members: Membership) -> None:
    """Every member learns every other member's table (all alive)."""
    for a in members:
        for b in members:
            if a is not b:
                a.merge(b.table())
    for a in members:
        assert {m["id"]: m["status"] for m in a.view()} == {
            m.id: "alive" for m in members
        }


def solo(clock: ManualClock | None = None, **kwargs: Any) -> Membership:
    return FakeNet().add("a", clock or ManualClock(), **kwargs)


# -- clocks and parsing ---------------------------------------------------------


def test_manual_clock_moves_only_when_advanced():
    clock = ManualClock(5.0)
    assert clock.now() == 5.0
    assert clock.now() == 5.0
    clock.advance(2.5)
    assert clock.now() == 7.5
    clock.advance(0)
    assert clock.now() == 7.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-0.1)
    assert clock.now() == 7.5
    assert ManualClock().now() == 0.0


def test_monotonic_clock_reads_time_monotonic():
    before = time.monotonic()
    reading = MonotonicClock().now()
    after = time.monotonic()
    assert before <= reading <= after
    assert isinstance(MONOTONIC, MonotonicClock)


def test_parse_update_accepts_a_well_formed_update():
    member = parse_update(["n1", "10.1.2.3", 7001, 42, "suspect", 2])
    assert member == Member("n1", "10.1.2.3", 7001, 42, "suspect", 2.0)
    assert isinstance(member.weight, float)
    assert parse_update(("n1", "h", 1, 1, "left", 0.5)) == Member(
        "n1", "h", 1, 1, "left", 0.5
    )


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "n1",
        {"id": "n1"},
        [],
        ["n1", "h", 1, 1, "alive"],
        ["n1", "h", 1, 1, "alive", 1.0, "extra"],
        [1, "h", 1, 1, "alive", 1.0],
        ["n1", 1, 1, 1, "alive", 1.0],
        ["n1", "h", "1", 1, "alive", 1.0],
        ["n1", "h", 1, 1.5, "alive", 1.0],
        ["n1", "h", 1, 1, "zombie", 1.0],
        ["n1", "h", 1, 1, "alive", "1"],
        ["n1", "h", 1, 1, "alive", 0],
        ["n1", "h", 1, 1, "alive", -1.0],
        ["n1", "h", 1, 1, "alive", float("nan")],
    ],
)
def test_parse_update_rejects_malformed_updates(raw):
    assert parse_update(raw) is None


@pytest.mark.parametrize("status", [["alive"], {"alive": 1}])
def test_parse_update_rejects_an_unhashable_status(status):
    assert parse_update(["n1", "h", 1, 1, status, 1.0]) is None


def test_merge_skips_an_update_with_an_unhashable_status():
    changes: list[str] = []
    m = solo(changes=changes)
    assert m.merge([upd("x", 1, ["alive"]), upd("b", 1)]) is True
    assert m.status("b") == "alive"
    assert m.status("x") is None
    assert changes == ["a"]


# -- merging ----------------------------------------------------------------------


def test_new_member_is_added_with_clock_time_and_reported_once():
    clock = ManualClock(100.0)
    changes: list[str] = []
    m = solo(clock, changes=changes)
    assert m.merge([upd("b", 7, port=9001, weight=2.0)]) is True
    assert changes == ["a"]
    b = m.members["b"]
    assert (b.host, b.port, b.incarnation, b.status, b.weight, b.since) == (
        HOST,
        9001,
        7,
        "alive",
        2.0,
        100.0,
    )
    # the same update again changes nothing and does not call on_change
    assert m.merge([upd("b", 7, port=9001, weight=2.0)]) is False
    assert changes == ["a"]


def test_merge_ignores_non_lists_and_malformed_entries():
    changes: list[str] = []
    m = solo(changes=changes)
    assert m.merge(None) is False
    assert m.merge({"b": upd("b", 1)}) is False
    assert m.merge("b") is False
    assert m.merge([None, ["b"], upd("c", 1, "zombie")]) is False
    assert sorted(m.members) == ["a"]
    assert changes == []
    # valid entries around a malformed one still apply
    assert m.merge([upd("b", 1), "junk", upd("c", 1)]) is True
    assert sorted(m.members) == ["a", "b", "c"]
    assert changes == ["a"]


@pytest.mark.parametrize("current", list(RANK))
@pytest.mark.parametrize("new", list(RANK))
def test_equal_incarnations_left_beats_dead_beats_suspect_beats_alive(current, new):
    m = solo()
    m.merge([upd("b", 5, current)])
    m.merge([upd("b", 5, new)])
    expected = max(current, new, key=RANK.__getitem__)
    assert m.status("b") == expected
    assert m.members["b"].incarnation == 5


def test_precedence_order_is_left_dead_suspect_alive():
    assert sorted(RANK, key=RANK.__getitem__) == ["alive", "suspect", "dead", "left"]
    assert frozenset({"alive", "suspect"}) == LIVE


@pytest.mark.parametrize("current", ["suspect", "dead", "left"])
def test_higher_incarnation_wins_even_with_a_lower_status(current):
    m = solo()
    m.merge([upd("b", 5, current, port=9001)])
    m.merge([upd("b", 6, "alive", port=9002, weight=3.0)])
    b = m.members["b"]
    assert (b.status, b.incarnation, b.port, b.weight) == ("alive", 6, 9002, 3.0)


@pytest.mark.parametrize("new", list(RANK))
def test_lower_incarnation_never_wins(new):
    m = solo()
    m.merge([upd("b", 5, "alive", port=9001)])
    assert m.merge([upd("b", 4, new, port=9999, weight=9.0)]) is False
    b = m.members["b"]
    assert (b.status, b.incarnation, b.port, b.weight) == ("alive", 5, 9001, 1.0)


def test_winning_update_replaces_address_and_weight_and_since_tracks_status():
    clock = ManualClock(10.0)
    m = solo(clock)
    m.merge([upd("b", 1, port=9001)])
    clock.advance(2.0)
    # newer incarnation, same status: address and weight move, since does not
    m.merge([upd("b", 2, port=9002, host="10.0.0.9", weight=0.5)])
    b = m.members["b"]
    assert (b.host, b.port, b.weight, b.since) == ("10.0.0.9", 9002, 0.5, 10.0)
    clock.advance(3.0)
    m.merge([upd("b", 2, "suspect", port=9002, host="10.0.0.9", weight=0.5)])
    assert (b.status, b.since) == ("suspect", 15.0)
    assert m.address("b") == ("10.0.0.9", 9002)


def test_on_change_fires_only_when_the_routing_set_changes():
    changes: list[str] = []
    m = solo(changes=changes)
    m.merge([upd("b", 1), upd("c", 1)])
    assert changes == ["a"]
    m.merge([upd("b", 1, "suspect")])  # suspects still route
    assert changes == ["a"]
    m.merge([upd("b", 1, "dead")])
    assert changes == ["a", "a"]
    m.merge([upd("c", 2, "alive", weight=2.0)])  # a weight is part of routing
    assert changes == ["a", "a", "a"]
    m.merge([upd("b", 1, "left")])  # dead -> left: leaves the voters
    assert changes == ["a", "a", "a", "a"]
    assert m.quorum() == (2, 2)


# -- refutation -----------------------------------------------------------------


@pytest.mark.parametrize("status", ["suspect", "dead"])
def test_member_accused_at_its_incarnation_refutes_by_raising_it(status):
    changes: list[str] = []
    m = solo(changes=changes)
    inc = m.me.incarnation
    assert m.merge([upd("a", inc, status, port=m.me.port)]) is False
    assert (m.me.incarnation, m.me.status) == (inc + 1, "alive")
    assert m.counters["refuted"] == 1
    assert m.status("a") == "alive"
    assert changes == []
    # the refutation is queued for gossip
    assert [HOST, m.me.port, inc + 1, "alive", 1.0] in [u[1:] for u in m.piggyback()]


def test_member_hearing_a_newer_incarnation_of_itself_jumps_past_it():
    m = solo()
    inc = m.me.incarnation
    m.merge([upd("a", inc + 10, "alive", port=m.me.port)])
    assert m.me.incarnation == inc + 11
    assert m.counters["refuted"] == 1


def test_stale_or_alive_news_about_itself_is_not_refuted():
    m = solo()
    inc = m.me.incarnation
    m.merge([upd("a", inc - 1, "dead", port=m.me.port)])
    m.merge([upd("a", inc, "alive", port=m.me.port)])
    assert m.me.incarnation == inc
    assert m.counters["refuted"] == 0
    assert m.me.status == "alive"


def test_left_about_itself_is_refuted_only_while_running(run):
    async def scenario() -> None:
        m = solo(cfg=config(interval=3600.0))
        inc = m.me.incarnation
        m.merge([upd("a", inc, "left", port=m.me.port)])
        assert (m.me.incarnation, m.counters["refuted"]) == (inc, 0)
        m.start()
        try:
            m.merge([upd("a", inc, "left", port=m.me.port)])
            assert (m.me.incarnation, m.counters["refuted"]) == (inc + 1, 1)
        finally:
            await m.stop(leave=False)

    run(scenario())


def test_suspected_member_refutes_through_piggybacked_pings(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        changes: list[str] = []
        a = net.add("a", clock, changes=changes)
        b = net.add("b", clock)
        mesh(a, b)
        changes.clear()
        inc = b.me.incarnation
        net.down.add("b")
        await a.probe(a.members["b"])
        assert a.status("b") == "suspect"
        assert a.counters["suspected"] == 1
        net.down.clear()
        # a's next ping carries "b suspect"; b refutes, its PONG carries the fix
        assert await a.ping("b") is True
        assert b.counters["refuted"] == 1
        assert b.me.incarnation == inc + 1
        assert a.status("b") == "alive"
        assert a.members["b"].incarnation == inc + 1
        assert changes == []  # suspect and alive both route: no change

    run(scenario())


# -- views ------------------------------------------------------------------------


def test_views_of_the_table():
    m = solo(weight=2.0)
    m.merge(
        [
            upd("c", 3, "dead", port=9003),
            upd("b", 2, "suspect", port=9002, weight=0.5),
            upd("d", 4, "left", port=9004),
        ]
    )
    inc = m.me.incarnation
    assert m.view() == [
        {
            "id": "a",
            "address": f"{HOST}:{m.me.port}",
            "incarnation": inc,
            "status": "alive",
            "weight": 2.0,
        },
        {
            "id": "b",
            "address": f"{HOST}:9002",
            "incarnation": 2,
            "status": "suspect",
            "weight": 0.5,
        },
        {
            "id": "c",
            "address": f"{HOST}:9003",
            "incarnation": 3,
            "status": "dead",
            "weight": 1.0,
        },
        {
            "id": "d",
            "address": f"{HOST}:9004",
            "incarnation": 4,
            "status": "left",
            "weight": 1.0,
        },
    ]
    assert m.live() == {"a": 2.0, "b": 0.5}
    assert m.quorum() == (2, 3)
    assert m.has_quorum() is True
    assert m.address("c") == (HOST, 9003)
    assert m.address("zz") is None
    assert m.status("d") == "left"
    assert m.status("zz") is None
    assert sorted(m.table()) == sorted(
        [
            ["a", HOST, m.me.port, inc, "alive", 2.0],
            upd("b", 2, "suspect", port=9002, weight=0.5),
            upd("c", 3, "dead", port=9003),
            upd("d", 4, "left", port=9004),
        ]
    )
    m.merge([upd("b", 2, "dead", port=9002, weight=0.5)])
    assert m.quorum() == (1, 3)
    assert m.has_quorum() is False


def test_piggyback_retransmits_each_update_a_bounded_number_of_times():
    m = solo(cfg=config(max_piggyback=2))
    m.merge([upd("b", 1), upd("c", 1)])
    # 3 members: 3 * ceil(log2(4)) + 2 = 8 transmissions each
    assert m._retransmit_limit() == 8
    counts = {"a": 0, "b": 0, "c": 0}
    rounds = 0
    while True:
        out = m.piggyback()
        if not out:
            break
        assert len(out) <= 2
        for update in out:
            counts[update[0]] += 1
        rounds += 1
    assert counts == {"a": 8, "b": 8, "c": 8}
    assert rounds == 12  # 24 transmissions, two per message
    assert m.piggyback() == []
    # a change is queued again, and goes out first (fewest transmissions)
    m.merge([upd("d", 1)])
    m.merge([upd("b", 2)])
    assert sorted(u[0] for u in m.piggyback()) == ["b", "d"]


def test_next_target_visits_every_live_member_once_per_round():
    m = solo()
    m.merge([upd(x, 1) for x in "bcde"] + [upd("f", 1, "dead"), upd("g", 1, "left")])
    first = [m._next_target().id for _ in range(4)]
    second = [m._next_target().id for _ in range(4)]
    assert sorted(first) == ["b", "c", "d", "e"]
    assert sorted(second) == ["b", "c", "d", "e"]
    # a member that dies mid-round is skipped
    third = [m._next_target().id]
    dead = next(x for x in "bcde" if x != third[0])
    m.merge([upd(dead, 1, "dead")])
    third += [m._next_target().id for _ in range(2)]
    assert sorted(third) == sorted(set("bcde") - {dead})
    assert solo()._next_target() is None


# -- probes -----------------------------------------------------------------------


def test_probe_of_a_reachable_member_keeps_it_alive(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        a, b, c = (net.add(x, clock) for x in "abc")
        mesh(a, b, c)
        await a.probe(a.members["b"])
        assert a.status("b") == "alive"
        assert (a.counters["pings"], a.counters["ping_failures"]) == (1, 0)
        assert a.counters["indirect"] == 0
        assert [c.address for c in net.sent("a", MessageType.PING)] == [
            (HOST, b.me.port)
        ]

    run(scenario())


def test_probe_falls_back_to_indirect_pings_through_helpers(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        a, b, c = (net.add(x, clock) for x in "abc")
        mesh(a, b, c)
        net.cut.add(frozenset({"a", "c"}))
        await a.probe(a.members["c"])
        assert a.status("c") == "alive"
        counted = ("pings", "ping_failures", "indirect", "suspected")
        assert [a.counters[k] for k in counted] == [1, 1, 1, 0]
        reqs = net.sent("a", MessageType.GOSSIP, "ping-req")
        assert [(r.address, r.delivered) for r in reqs] == [((HOST, b.me.port), True)]
        assert b.counters["pings"] == 1  # b pinged c for a
        assert b.counters["ping_failures"] == 0

    run(scenario())


def test_probe_suspects_a_member_nobody_reaches(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock(50.0)
        changes: list[str] = []
        a = net.add("a", clock, changes=changes)
        b, c, d = (net.add(x, clock) for x in "bcd")
        mesh(a, b, c, d)
        assert changes == ["a", "a", "a"]  # a learned b, c and d
        changes.clear()
        net.down.add("d")
        await a.probe(a.members["d"])
        assert a.status("d") == "suspect"
        assert a.members["d"].since == 50.0
        assert (a.counters["suspected"], a.counters["indirect"]) == (1, 1)
        assert a.counters["ping_failures"] == 1
        assert len(net.sent("a", MessageType.GOSSIP, "ping-req")) == 2  # indirect=2
        assert b.counters["ping_failures"] + c.counters["ping_failures"] == 2
        assert changes == []  # a suspect still routes
        # probing a suspect again does not count a second suspicion
        await a.probe(a.members["d"])
        assert a.counters["suspected"] == 1

    run(scenario())


def test_probe_without_helpers_suspects_directly(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        a, b = (net.add(x, clock) for x in "ab")
        mesh(a, b)
        net.down.add("b")
        await a.probe(a.members["b"])
        assert a.status("b") == "suspect"
        assert a.counters["indirect"] == 0
        assert net.sent("a", MessageType.GOSSIP, "ping-req") == []

    run(scenario())


def test_ping_of_unknown_or_self_is_false_without_a_call(run):
    async def scenario() -> None:
        net = FakeNet()
        a = net.add("a", ManualClock())
        assert await a.ping("a") is False
        assert await a.ping("nobody") is False
        assert net.calls == []
        assert a.counters["pings"] == 0

    run(scenario())


def test_ping_req_handler(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        a, b, c = (net.add(x, clock) for x in "abc")
        mesh(a, b, c)
        assert await b.handle_gossip({"kind": "ping-req", "target": "c"}) == {
            "ok": True
        }
        assert await b.handle_gossip({"kind": "ping-req", "target": "zz"}) == {
            "ok": False
        }
        net.down.add("c")
        assert await b.handle_gossip({"kind": "ping-req", "target": "c"}) == {
            "ok": False
        }
        with pytest.raises(ValueError, match="unknown gossip kind 'bogus'"):
            await b.handle_gossip({"kind": "bogus"})

    run(scenario())


def test_handle_ping_merges_and_answers_with_piggyback():
    m = solo()
    reply = m.handle_ping({"from": "b", "updates": [upd("b", 3)]})
    assert reply["from"] == "a"
    assert sorted(u[0] for u in reply["updates"]) == ["a", "b"]
    assert m.status("b") == "alive"
    assert m.handle_ping({})["from"] == "a"


# -- suspicion expiry --------------------------------------------------------------


def three_with_suspect(clock: ManualClock, changes: list[str]) -> Membership:
    m = solo(clock, changes=changes)
    m.merge([upd("b", 1), upd("c", 1)])
    m.merge([upd("c", 1, "suspect")])
    changes.clear()
    return m


def test_suspect_dies_only_after_suspect_timeout_of_clock_time():
    clock = ManualClock(1000.0)
    changes: list[str] = []
    m = three_with_suspect(clock, changes)
    m.expire_suspects()
    assert m.status("c") == "suspect"
    clock.advance(SUSPECT_TIMEOUT - 0.001)
    m.expire_suspects()
    assert m.status("c") == "suspect"
    assert m.counters["declared_dead"] == 0
    assert changes == []
    clock.advance(0.001)
    m.expire_suspects()
    assert m.status("c") == "dead"
    assert m.members["c"].since == clock.now()
    assert m.counters["declared_dead"] == 1
    assert m.counters["held_suspect"] == 0
    assert changes == ["a"]
    assert m.live() == {"a": 1.0, "b": 1.0}
    # the death is gossiped
    assert upd("c", 1, "dead") in m.piggyback()


def test_without_a_majority_suspects_are_held_not_declared_dead():
    clock = ManualClock()
    changes: list[str] = []
    m = solo(clock, changes=changes)
    m.merge([upd("b", 1), upd("c", 1), upd("d", 1)])
    m.merge([upd("c", 1, "suspect"), upd("d", 1, "suspect")])
    changes.clear()
    clock.advance(SUSPECT_TIMEOUT)
    m.expire_suspects()  # 2 alive of 4 voters: no majority
    assert (m.status("c"), m.status("d")) == ("suspect", "suspect")
    assert m.counters["held_suspect"] == 2
    assert m.counters["declared_dead"] == 0
    assert (m.members["c"].since, m.members["d"].since) == (clock.now(),) * 2
    assert changes == []
    # c answers again: 3 of 4 alive; d gets a full timeout from the hold
    m.merge([upd("c", 2, "alive")])
    clock.advance(SUSPECT_TIMEOUT - 0.5)
    m.expire_suspects()
    assert m.status("d") == "suspect"
    assert m.counters["held_suspect"] == 2
    clock.advance(0.5)
    m.expire_suspects()
    assert m.status("d") == "dead"
    assert m.counters["declared_dead"] == 1
    assert changes == ["a"]


def test_two_node_cluster_never_declares_its_peer_dead():
    clock = ManualClock()
    m = solo(clock)
    m.merge([upd("b", 1, "suspect")])
    for _ in range(3):
        clock.advance(SUSPECT_TIMEOUT)
        m.expire_suspects()
    assert m.status("b") == "suspect"
    assert m.counters["held_suspect"] == 3


def test_left_members_do_not_count_as_voters_for_the_majority():
    clock = ManualClock()
    m = solo(clock)
    m.merge([upd("b", 1), upd("c", 1, "suspect"), upd("x", 1, "left")])
    m.merge([upd("y", 1, "left")])
    clock.advance(SUSPECT_TIMEOUT)
    m.expire_suspects()  # 2 alive of 3 voters (a, b, c)
    assert m.status("c") == "dead"
    assert m.counters["held_suspect"] == 0


# -- join, sync, leave -------------------------------------------------------------


def test_join_through_a_seed_exchanges_tables(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        changes: list[str] = []
        a = net.add("a", clock, changes=changes)
        b = net.add("b", clock, changes=changes)
        c = net.add("c", clock, seeds=((HOST, a.me.port), (HOST, 7999)))
        b.merge(a.table())
        a.merge(b.table())
        changes.clear()
        assert await c.join() is True
        assert sorted(c.live()) == ["a", "b", "c"]
        assert a.counters["joins"] == 1
        assert a.status("c") == "alive"
        assert b.status("c") is None  # b hears of c through gossip later
        assert changes == ["a"]
        assert [
            (x.address, x.delivered) for x in net.sent("c", MessageType.GOSSIP, "join")
        ] == [
            ((HOST, a.me.port), True),
            ((HOST, 7999), False),
        ]
        # a second join also asks the members it learned (each address once)
        net.calls.clear()
        assert await c.join() is True
        assert sorted(x.address for x in net.sent("c", MessageType.GOSSIP, "join")) == [
            (HOST, a.me.port),
            (HOST, b.me.port),
            (HOST, 7999),
        ]
        assert b.status("c") == "alive"

    run(scenario())


def test_join_with_no_seed_answering_fails(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        a = net.add("a", clock)
        b = net.add("b", clock, seeds=((HOST, a.me.port),))
        net.down.add("a")
        assert await b.join() is False
        assert sorted(b.members) == ["b"]
        assert await net.add("c", clock).join() is False  # no seeds at all

    run(scenario())


def test_seeds_leave_out_the_node_itself():
    net = FakeNet()
    m = net.add("a", ManualClock(), seeds=((HOST, 7000), (HOST, 7005), (HOST, 7006)))
    assert m.me.port == 7000
    assert m.seeds == [(HOST, 7005), (HOST, 7006)]


def test_sync_exchanges_full_tables_with_a_live_peer(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        a, b = (net.add(x, clock) for x in "ab")
        mesh(a, b)
        a.merge([upd("x", 4, "dead")])
        b.merge([upd("y", 5, "suspect")])
        await a.sync()
        assert (a.status("y"), b.status("x")) == ("suspect", "dead")
        assert [x.delivered for x in net.sent("a", MessageType.GOSSIP, "sync")] == [
            True
        ]
        assert await b.handle_gossip({"kind": "sync", "members": None}) == {
            "members": b.table()
        }
        lonely = net.add("z", clock)
        await lonely.sync()  # nobody to talk to: no call
        assert net.sent("z", MessageType.GOSSIP, "sync") == []

    run(scenario())


def test_stop_with_leave_tells_every_live_member(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        changes: list[str] = []
        a = net.add("a", clock)
        b, c = (net.add(x, clock, changes=changes) for x in "bc")
        d = net.add("d", clock)
        mesh(a, b, c, d)
        a.merge([upd("d", d.me.incarnation, "dead", port=d.me.port)])
        changes.clear()
        inc = a.me.incarnation
        await a.stop()
        assert (a.me.status, a.me.incarnation) == ("left", inc + 1)
        for peer in (b, c):
            assert peer.status("a") == "left"
            assert peer.members["a"].incarnation == inc + 1
            assert peer.quorum() == (3, 3)
        assert sorted(changes) == ["b", "c"]
        leaves = net.sent("a", MessageType.GOSSIP, "leave")
        assert sorted(x.address[1] for x in leaves) == [b.me.port, c.me.port]
        assert d.status("a") == "alive"  # a thought d dead: not told

    run(scenario())


def test_stop_without_leave_is_silent(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        a, b = (net.add(x, clock) for x in "ab")
        mesh(a, b)
        inc = a.me.incarnation
        await a.stop(leave=False)
        assert (a.me.status, a.me.incarnation) == ("alive", inc)
        assert net.calls == []
        assert b.status("a") == "alive"

    run(scenario())


def test_stop_does_not_swallow_its_callers_cancellation(run):
    async def scenario() -> None:
        m = solo(cfg=config(interval=3600.0))
        m.start()
        task = m._task
        stopping = asyncio.ensure_future(m.stop(leave=False))
        await asyncio.sleep(0)  # one deterministic step: stop now awaits the task
        assert m._running is False
        assert not stopping.done()
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert task is not None
        assert task.cancelled()

    run(scenario())


# -- the probe loop -----------------------------------------------------------------


def test_probe_loop_joins_detects_a_failure_and_leaves(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        cfg = config(sync_every=2)
        changes: list[str] = []
        a = net.add("a", clock, cfg=cfg, changes=changes)
        seed = ((HOST, a.me.port),)
        b = net.add("b", clock, cfg=cfg, seeds=seed, changes=changes)
        c = net.add("c", clock, cfg=cfg, seeds=seed, changes=changes)
        nodes = (a, b, c)
        for node in nodes:
            node.start()
        try:
            await wait_for(
                lambda: all(sorted(n.live()) == ["a", "b", "c"] for n in nodes),
                10,
                "convergence",
            )
            await wait_for(
                lambda: all(n.counters["pings"] > 0 for n in nodes), 10, "probes"
            )
            assert all(n.status(x) == "alive" for n in nodes for x in ("a", "b", "c"))
            await wait_for(
                lambda: net.sent("b", MessageType.GOSSIP, "sync"), 10, "sync"
            )
            net.down.add("c")
            await wait_for(
                lambda: a.status("c") == b.status("c") == "suspect", 10, "suspicion"
            )
            await wait_for(
                lambda: c.status("a") == c.status("b") == "suspect", 10, "cut off"
            )
            # no clock time has passed: nobody is dead, however long that took
            assert "dead" not in {a.status("c"), b.status("c")}
            clock.advance(SUSPECT_TIMEOUT)
            await wait_for(
                lambda: a.status("c") == b.status("c") == "dead", 10, "death"
            )
            # c, cut off from the majority, holds its suspects instead
            await wait_for(lambda: c.counters["held_suspect"] > 0, 10, "held")
            assert c.status("a") == c.status("b") == "suspect"
            assert a.counters["declared_dead"] + b.counters["declared_dead"] >= 1
        finally:
            await c.stop(leave=False)
            await a.stop()
            await b.stop()
        assert b.status("a") == "left"
        assert a.status("b") == "alive"  # a had stopped when b left
        assert "a" in changes
        assert "b" in changes

    run(scenario())


def test_probe_loop_survives_a_failing_round(caplog, run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        a = net.add("a", clock)
        b = net.add("b", clock, seeds=((HOST, a.me.port),))
        net.explode = 1
        b.start()
        try:
            await wait_for(lambda: b.status("a") == "alive", 10, "join after failure")
        finally:
            await b.stop(leave=False)
        assert net.explode == 0
        assert net.calls[0].kind == "join"

    with caplog.at_level(logging.ERROR, logger="plexichat.node.membership"):
        run(scenario())
    failed = [r for r in caplog.records if r.getMessage() == "membership round failed"]
    assert len(failed) == 1
    assert failed[0].exc_info[0] is RuntimeError


def test_stop_cancels_a_round_waiting_on_the_network(run):
    async def scenario() -> None:
        net = FakeNet()
        clock = ManualClock()
        a = net.add("a", clock)
        b = net.add("b", clock, seeds=((HOST, a.me.port),))
        net.gate, net.entered = asyncio.Event(), asyncio.Event()
        b.start()
        task = b._task
        await net.entered.wait()  # b's join waits for an answer
        assert [c.kind for c in net.calls] == ["join"]
        await b.stop(leave=False)
        assert task is not None
        assert task.cancelled()
        assert b._task is None
        assert b.status("a") is None  # the join never completed
        assert a.counters["joins"] == 0

    run(scenario())


# -- validation, the member cap and forgetting (issue 12) ------------------------


@pytest.mark.parametrize(
    "raw",
    [
        # weights: finite, in (0, 1e6], a JSON number (not a bool)
        upd("x", 1, weight=float("inf")),
        upd("x", 1, weight=float("-inf")),
        upd("x", 1, weight=1e6 + 1),
        upd("x", 1, weight=10**400),  # too big for a float
        upd("x", 1, weight=True),
        # ports: 1 .. 65535, not a bool
        upd("x", 1, port=99999),
        upd("x", 1, port=0),
        upd("x", 1, port=-1),
        upd("x", 1, port=True),
        # hosts: an IP literal or a hostname of at most 253 characters
        upd("x", 1, host=""),
        upd("x", 1, host="bad host"),
        upd("x", 1, host="a" * 300),
        upd("x", 1, host="a\x00b"),
        upd("x", 1, host="-lead.example"),
        upd("x", 1, host="a..b"),
        upd("x", 1, host="x" * 64 + ".example"),
        upd("x", 1, host="ex\udcffample"),
        # node ids: 1 .. 64 printable characters
        upd("", 1),
        upd("x" * 65, 1),
        upd("a\nb", 1),
        upd("\ud800", 1),
        # incarnations: 0 .. 2**63 - 1, not a bool
        upd("x", -1),
        upd("x", 2**63),
        upd("x", True),
    ],
)
def test_out_of_range_member_entries_are_invalid(raw):
    reason = check_update(raw)
    assert isinstance(reason, str), raw
    assert parse_update(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        ["n1", "::1", 1, 0, "alive", 1e6],
        ["n1", "fe80::1%eth0", 65535, 2**63 - 1, "left", 0.001],
        ["nœud-3", "node-1.lab.example", 7000, 5, "dead", 3],
        ["n_1", "plexi_node1", 7000, 5, "suspect", 1.0],
        ["x" * 64, "y" * 63 + "." + "z" * 63, 7000, 5, "alive", 1.0],
    ],
)
def test_in_range_member_entries_are_valid(raw):
    member = check_update(raw)
    assert isinstance(member, Member)
    assert member.update() == [*raw[:5], float(raw[5])]


def test_a_gossiped_infinite_weight_is_dropped_and_the_ring_still_builds(caplog):
    """Issue 12: a ``weight: Infinity`` (JSON allows it in Python) was stored
    and re-gossiped, after which every ring rebuild raised."""
    m = solo()
    body = json.loads(
        '{"from": "x", "updates": [["x", "127.0.0.1", 7100, 1, "alive", Infinity],'
        ' ["y", "127.0.0.1", 7101, 1, "alive", NaN], ["b", "127.0.0.1", 7102, 1,'
        ' "alive", 1.0]]}'
    )
    with caplog.at_level(logging.WARNING, logger="plexichat.node.membership"):
        reply = m.handle_ping(body)
    assert sorted(m.members) == ["a", "b"]
    assert all(u[0] in ("a", "b") for u in reply["updates"])
    Ring(m.live())  # raises on an infinite or NaN weight
    assert m.counters["invalid_updates"] == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "dropped 2 invalid member update(s)" in warnings[0]


def test_invalid_entries_are_dropped_valid_ones_in_the_same_message_apply(run):
    async def scenario() -> None:
        m = solo()
        good = upd("b", 1, port=9002)
        reply = await m.handle_gossip(
            {
                "kind": "sync",
                "members": [
                    upd("c", 1, port=99999),
                    good,
                    upd("d", 1, host="not a host"),
                    upd("e", 1, weight=0),
                ],
            }
        )
        assert sorted(m.members) == ["a", "b"]
        assert good in reply["members"]
        assert m.counters["invalid_updates"] == 3
        # a join or a leave naming an invalid member changes nothing
        await m.handle_gossip({"kind": "join", "member": upd("f", 1, port=0)})
        await m.handle_gossip({"kind": "leave", "member": upd("b", 2, "left", port=0)})
        assert sorted(m.members) == ["a", "b"]
        assert m.status("b") == "alive"
        assert m.counters["invalid_updates"] == 5

    run(scenario())


def test_joins_of_new_members_stop_at_the_member_cap(caplog, run):
    """Issue 12: any number of fake members could join."""

    async def scenario() -> None:
        m = solo(cfg=config(max_members=4))
        for i in range(10):
            await m.handle_gossip({"kind": "join", "member": upd(f"f{i}", 1)})
        assert sorted(m.members) == ["a", "f0", "f1", "f2"]
        assert m.counters["members_capped"] == 7
        # members already known are still updated at the cap
        m.merge([upd("f0", 2, "suspect"), upd("f9", 1)])
        assert m.status("f0") == "suspect"
        assert "f9" not in m.members
        assert m.counters["members_capped"] == 8

    with caplog.at_level(logging.WARNING, logger="plexichat.node.membership"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # one warning per 10 s, the counter counts all
    assert "the table is full (max_members 4)" in warnings[0]


def test_the_default_member_cap_is_256():
    m = solo()
    assert m.config.max_members == 256
    m.merge([upd(f"f{i}", 1, port=1 + i) for i in range(300)])
    assert len(m.members) == 256
    assert m.counters["members_capped"] == 300 - 255


def test_dead_and_left_members_are_forgotten_after_forget_after():
    clock = ManualClock(100.0)
    changes: list[str] = []
    m = solo(clock, cfg=config(forget_after=60.0), changes=changes)
    assert m.config.forget_after == 60.0
    m.merge([upd("b", 5), upd("c", 5), upd("d", 5), upd("e", 5)])
    changes.clear()
    m.merge([upd("b", 5, "dead"), upd("c", 5, "left")])
    assert m.quorum() == (3, 4)  # b (dead) still counts as a voter
    changes.clear()
    clock.advance(59.9)
    assert m.forget_gone() == []
    assert sorted(m.members) == ["a", "b", "c", "d", "e"]
    clock.advance(0.1)
    assert sorted(m.forget_gone()) == ["b", "c"]
    assert sorted(m.members) == ["a", "d", "e"]
    assert m.quorum() == (3, 3)
    assert changes == ["a"]  # the voters changed
    assert m.counters["forgotten"] == 2
    assert all(u[0] not in ("b", "c") for u in m.piggyback())
    # a peer that has not forgotten them yet does not bring them back...
    m.merge([upd("b", 5, "dead"), upd("c", 4, "left"), upd("c", 5, "dead")])
    assert sorted(m.members) == ["a", "d", "e"]
    # ...but news of b alive, or of c at a higher incarnation, does
    m.merge([upd("b", 5, "alive"), upd("c", 6, "dead")])
    assert m.status("b") == "alive"
    assert m.status("c") == "dead"
    assert "b" not in m.forgotten
    assert "c" not in m.forgotten
    # tombstones end after forget_after too
    m.merge([upd("c", 6, "dead")])
    clock.advance(60.0)
    assert m.forget_gone() == ["c"]
    assert "c" in m.forgotten
    clock.advance(60.0)
    m.forget_gone()
    assert m.forgotten == {}
    m.merge([upd("c", 6, "dead")])
    assert m.status("c") == "dead"


def test_live_members_and_this_node_are_never_forgotten():
    clock = ManualClock()
    m = solo(clock, cfg=config(forget_after=1.0))
    m.merge([upd("b", 1), upd("c", 1, "suspect")])
    clock.advance(1000.0)
    assert m.forget_gone() == []
    assert sorted(m.members) == ["a", "b", "c"]


def test_the_probe_loop_forgets_dead_members(run):
    async def scenario() -> None:
        clock = ManualClock()
        m = solo(clock, cfg=config(forget_after=5.0))
        m.merge([upd("b", 1, "dead"), upd("c", 1), upd("d", 1)])
        clock.advance(5.0)
        m.start()
        try:
            await wait_for(lambda: "b" not in m.members, 5, "b forgotten")
        finally:
            await m.stop(leave=False)
        assert m.counters["forgotten"] == 1

    run(scenario())


@pytest.mark.parametrize(
    ("host", "port", "weight"),
    [("127.0.0.1", 0, 1.0), ("127.0.0.1", 70000, 1.0), ("bad host", 7000, 1.0),
     ("127.0.0.1", 7000, float("inf")), ("127.0.0.1", 7000, 0.0)],
)  # fmt: skip
def test_a_node_with_an_invalid_own_entry_does_not_start(host, port, weight):
    with pytest.raises(ValueError, match="own member entry is invalid"):
        Membership("a", host, port, FakeTransport(FakeNet(), "a"), weight=weight)
