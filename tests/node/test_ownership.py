"""Unit tests of the channel ownership state machine, one transition at a time.

The state machine (``plexichat.node.ownership``) is the pure model the node's
channel order follows (issue 11; the node's own rules: test_node_order.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from plexichat.node.ownership import (
    Accept,
    Accepted,
    Ack,
    Append,
    AppendReply,
    ChannelReplica,
    Config,
    Deliver,
    Durable,
    Effect,
    Entry,
    Message,
    Prepare,
    Promise,
    Refuse,
    Role,
    SafetyError,
    common_prefix,
    epochs_of,
)

CH = 7
CLUSTER = ("a", "b", "c")


def e(term: int, seq: int, msg: str) -> Entry:
    return Entry(term, seq, msg.encode())


def ids(entries: Iterable[Entry]) -> list[str]:
    return [x.msg_id.decode() for x in entries]


class Net:
    """Delivers messages synchronously; *drop* filters them out."""

    def __init__(self, cluster: tuple[str, ...] = CLUSTER) -> None:
        self.nodes = {n: ChannelReplica(n, CH, cluster) for n in cluster}
        self.local: list[Effect] = []
        self.dropped: list[Message] = []

    def run(
        self, effects: list[Effect], drop: Callable[[Message], bool] = lambda m: False
    ) -> None:
        queue = list(effects)
        while queue:
            x = queue.pop(0)
            if isinstance(x, Ack | Refuse | Deliver):
                self.local.append(x)
            elif drop(x):
                self.dropped.append(x)
            else:
                queue += self.nodes[x.dst].receive(x)

    def acks(self) -> list[tuple[str, int]]:
        return [(x.msg_id.decode(), x.seq) for x in self.local if isinstance(x, Ack)]


def elect(net: Net, owner: str, members: tuple[str, ...]) -> ChannelReplica:
    node = net.nodes[owner]
    net.run(node.start_term(members))
    if node.role is not Role.OWNER:  # refused: it learnt a higher term
        net.run(node.start_term(members))
    assert node.role is Role.OWNER
    return node


# -- log helpers ---------------------------------------------------------------


def test_epochs_of_lists_the_first_seq_of_every_term() -> None:
    log = [e(1, 1, "x"), e(1, 2, "y"), e(3, 3, "z"), e(4, 4, "w"), e(4, 5, "v")]
    assert epochs_of(log) == ((1, 1), (3, 3), (4, 4))
    assert epochs_of([]) == ()


def test_common_prefix_ends_at_the_last_shared_term() -> None:
    # a: terms 1 1 2 2 2 ; b: terms 1 1 2 3 (b's owner of term 3 cut a's tail)
    assert common_prefix(((1, 1), (2, 3)), 5, ((1, 1), (2, 3), (3, 4)), 4) == 3
    assert common_prefix(((1, 1),), 2, ((1, 1),), 6) == 2
    assert common_prefix(((1, 1),), 4, ((2, 1),), 4) == 0
    assert common_prefix((), 0, ((1, 1),), 3) == 0


# -- electing an owner ---------------------------------------------------------


def test_start_term_asks_every_member_to_promise_the_next_term() -> None:
    a = ChannelReplica("a", CH, CLUSTER)
    out = a.start_term(("a", "b"))
    assert out == [
        Prepare(CH, "a", "b", 1, (), 0),
        Prepare(CH, "a", "c", 1, (), 0),
    ]
    assert (a.role, a.term, a.config) == (Role.CANDIDATE, 1, Config(1, ("a", "b")))
    with pytest.raises(ValueError, match="bad config"):
        a.start_term(("b", "a"))
    with pytest.raises(ValueError, match="outside the cluster"):
        a.start_term(("a", "z"))


def test_a_promise_refuses_lower_terms_and_other_candidates_of_the_same() -> None:
    b = ChannelReplica("b", CH, CLUSTER)
    (ok,) = b.receive(Prepare(CH, "a", "b", 2, (), 0))
    assert isinstance(ok, Promise)
    assert (ok.ok, ok.promised, b.term) == (True, 2, 2)
    (low,) = b.receive(Prepare(CH, "c", "b", 1, (), 0))
    assert isinstance(low, Promise)
    assert (low.ok, low.promised) == (False, 2)
    (same,) = b.receive(Prepare(CH, "c", "b", 2, (), 0))
    assert isinstance(same, Promise)
    assert (same.ok, same.promised) == (False, 2)
    (again,) = b.receive(Prepare(CH, "a", "b", 2, (), 0))  # a retransmission
    assert isinstance(again, Promise)
    assert again.ok is True


def test_a_promise_carries_the_tail_after_the_common_prefix() -> None:
    d = Durable(promised=1, log=[e(1, 1, "x"), e(1, 2, "y"), e(2, 3, "z")], commit=2)
    b = ChannelReplica("b", CH, CLUSTER, d)
    (p,) = b.receive(Prepare(CH, "a", "b", 3, ((1, 1),), 2))
    assert isinstance(p, Promise)
    assert (p.base, ids(p.tail), p.last_seq, p.commit) == (2, ["z"], 3, 2)
    assert p.epochs == ((1, 1), (2, 3))


def test_the_candidate_adopts_the_log_of_the_last_config() -> None:
    net = Net()
    # term 1: b owned with members (b, c); c holds an uncommitted tail
    cfg = Config(1, ("b", "c"))
    for n in "bc":
        net.nodes[n].d.promised, net.nodes[n].d.promised_to = 1, "b"
        net.nodes[n].d.accepted = cfg
        net.nodes[n].d.log += [e(1, 1, "x")]
        net.nodes[n].d.commit = 1
    net.nodes["c"].d.log.append(e(1, 2, "y"))
    a = net.nodes["a"]
    a.d.log.append(e(1, 1, "x"))  # a lags
    cut_b = lambda m: "b" in (m.src, m.dst)  # noqa: E731
    net.run(a.start_term(("a", "c")), drop=cut_b)
    assert (a.role, a.term) == (Role.FOLLOWER, 1)  # refused by c: term 1 is taken
    net.run(a.start_term(("a", "c")), drop=cut_b)
    assert (a.role, a.term) == (Role.OWNER, 2)
    assert a.log == [e(1, 1, "x"), e(1, 2, "y")]  # c's tail, kept under term 1
    assert a.commit == 2  # installed on every member and accepted: committed
    assert net.nodes["c"].commit == 2
    assert net.nodes["c"].d.accepted == Config(2, ("a", "c"))
    assert net.nodes["b"].d.accepted == cfg  # b heard nothing


def test_of_several_members_the_longest_log_wins() -> None:
    net = Net(("a", "b", "c", "d", "e"))
    cfg = Config(1, ("b", "c", "d"))
    for n in "bcde":
        net.nodes[n].d.promised, net.nodes[n].d.promised_to = 1, "b"
        net.nodes[n].d.accepted = cfg
    net.nodes["a"].d.promised, net.nodes["a"].d.promised_to = 1, "b"
    for n, msgs in (("b", "x"), ("c", "xy"), ("d", "x")):
        net.nodes[n].d.log += [e(1, i + 1, m) for i, m in enumerate(msgs)]
    a = net.nodes["a"]
    net.run(a.start_term(("a", "b", "d")), drop=lambda m: "e" in (m.src, m.dst))
    assert a.role is Role.OWNER
    assert ids(a.log) == ["x", "y"]  # c (last (1, 2)) beats b and d (1, 1)
    assert ids(net.nodes["b"].visible()) == ["x", "y"]
    assert ids(net.nodes["d"].visible()) == ["x", "y"]


def test_no_adoption_without_a_member_of_the_last_config() -> None:
    net = Net(("a", "b", "c", "d", "e"))
    for n in "acde":
        net.nodes[n].d.promised, net.nodes[n].d.promised_to = 1, "d"
    for n in "cde":  # config 1 was accepted by a majority
        net.nodes[n].d.accepted = Config(1, ("d", "e"))
    a = net.nodes["a"]
    out = a.start_term(("a", "b"))
    net.run(out, drop=lambda m: m.dst in "de" or m.src in "de")
    assert a.role is Role.CANDIDATE  # a majority (a, b, c), but none of d, e
    assert sorted(a.promises) == ["a", "b", "c"]
    retry = a.tick()
    assert [m.dst for m in retry if isinstance(m, Prepare)] == ["d", "e"]
    net.run(retry)
    assert a.role is Role.OWNER
    assert a.term == 2


def test_a_refusal_deposes_the_candidate_and_the_next_term_is_higher() -> None:
    a = ChannelReplica("a", CH, CLUSTER)
    a.start_term(("a", "b"))
    out = a.receive(Promise(CH, "b", "a", 1, False, 5, None, (), 0, 0, 0, ()))
    assert (out, a.role) == ([], Role.FOLLOWER)
    (first, _) = a.start_term(("a", "b"))
    assert isinstance(first, Prepare)
    assert first.term == 6


def test_accept_is_refused_below_the_promise() -> None:
    c = ChannelReplica("c", CH, CLUSTER, Durable(promised=4, promised_to="b"))
    assert c.receive(Accept(CH, "a", "c", Config(3, ("a", "b")))) == [
        Accepted(CH, "c", "a", 3, False, 4)
    ]
    assert c.d.accepted is None
    assert c.receive(Accept(CH, "b", "c", Config(4, ("b", "a")))) == [
        Accepted(CH, "c", "b", 4, True, 4)
    ]
    assert c.d.accepted == Config(4, ("b", "a"))


# -- writes --------------------------------------------------------------------


def test_a_write_is_acked_only_once_every_member_stored_it() -> None:
    net = Net()
    a = elect(net, "a", ("a", "b"))
    out = a.submit(b"m1")
    assert out == [Append(CH, "a", "b", 1, 0, 0, (e(1, 1, "m1"),), 0)]
    assert (a.commit, net.acks()) == (0, [])
    (reply,) = net.nodes["b"].receive(out[0])
    assert reply == AppendReply(CH, "b", "a", 1, True, False, 1, 1, ((1, 1),), 1)
    effects = a.receive(reply)
    assert Ack(CH, b"m1", 1) in effects
    assert Deliver(CH, (e(1, 1, "m1"),)) in effects
    assert a.commit == 1
    assert net.nodes["b"].commit == 0  # learns it from the next APPEND
    net.run([x for x in effects if isinstance(x, Append)])
    assert net.nodes["b"].visible() == (e(1, 1, "m1"),)


def test_retries_dedupe_to_the_one_seq() -> None:
    net = Net()
    a = elect(net, "a", ("a", "b"))
    first = a.submit(b"m1")
    assert a.submit(b"m1") == []  # stored, not committed: wait for it
    net.run(first)
    net.run(a.submit(b"m2"))
    assert a.submit(b"m1") == [Ack(CH, b"m1", 1)]
    assert net.acks() == [("m1", 1), ("m2", 2)]
    assert ids(a.log) == ["m1", "m2"]


def test_a_non_owner_refuses_writes() -> None:
    b = ChannelReplica("b", CH, CLUSTER)
    assert b.submit(b"m1") == [Refuse(CH, b"m1", "not the owner (follower)")]


def test_a_single_member_config_commits_at_once() -> None:
    net = Net()
    a = elect(net, "a", ("a",))
    assert a.submit(b"m1") == [
        Deliver(CH, (e(1, 1, "m1"),)),
        Ack(CH, b"m1", 1),
    ]


# -- appends: consistency check and truncation -----------------------------------


def test_an_append_with_an_unknown_prev_is_rejected_with_the_epochs() -> None:
    b = ChannelReplica("b", CH, CLUSTER, Durable(log=[e(1, 1, "x")], commit=1))
    (r,) = b.receive(Append(CH, "a", "b", 2, 2, 2, (e(2, 3, "z"),), 0))
    assert r == AppendReply(CH, "b", "a", 2, False, False, 2, 0, ((1, 1),), 1)
    assert ids(b.log) == ["x"]


def test_a_conflicting_tail_is_truncated_not_merged() -> None:
    log = [e(1, 1, "x"), e(1, 2, "stale"), e(1, 3, "stale2")]
    b = ChannelReplica("b", CH, CLUSTER, Durable(promised=1, log=log, commit=1))
    *delivered, r = b.receive(Append(CH, "a", "b", 2, 1, 1, (e(2, 2, "new"),), 2))
    assert delivered == [Deliver(CH, (e(2, 2, "new"),))]
    assert isinstance(r, AppendReply)
    assert (r.ok, r.match) == (True, 2)
    assert ids(b.log) == ["x", "new"]
    assert b.commit == 2
    # a delayed copy of the same APPEND changes nothing
    (again,) = b.receive(Append(CH, "a", "b", 2, 1, 1, (e(2, 2, "new"),), 2))
    assert isinstance(again, AppendReply)
    assert again.ok is True
    assert ids(b.log) == ["x", "new"]


def test_truncating_a_committed_record_is_a_safety_error() -> None:
    log = [e(1, 1, "x"), e(1, 2, "y")]
    b = ChannelReplica("b", CH, CLUSTER, Durable(promised=1, log=log, commit=2))
    with pytest.raises(SafetyError, match="below commit 2"):
        b.receive(Append(CH, "a", "b", 2, 1, 1, (e(2, 2, "z"),), 0))


def test_an_append_of_an_older_term_is_refused_and_deposes_its_sender() -> None:
    net = Net()
    a = elect(net, "a", ("a", "b"))
    b = net.nodes["b"]
    b.receive(Prepare(CH, "c", "b", 5, (), 0))
    (out,) = a.submit(b"m1")
    (r,) = b.receive(out)
    assert isinstance(r, AppendReply)
    assert (r.ok, r.refused, r.promised) == (False, True, 5)
    assert a.receive(r) == [Refuse(CH, b"m1", "append refused by b")]
    assert a.role is Role.FOLLOWER
    assert a.commit == 0  # m1 stays unacknowledged


def test_a_higher_prepare_deposes_an_owner_and_refuses_its_pending_writes() -> None:
    net = Net()
    a = elect(net, "a", ("a", "b"))
    a.submit(b"m1")
    out = a.receive(Prepare(CH, "c", "a", 2, (), 0))
    assert out[0] == Refuse(CH, b"m1", "deposed by term 2")
    assert isinstance(out[1], Promise)
    assert (a.role, a.term) == (Role.FOLLOWER, 2)


def test_the_issue_11_shared_seq_cannot_happen() -> None:
    """Issue 11's trace: the old owner stores m1 at S, the outcome at its
    replica is unknown, a new owner reuses S for m2; after the heal m1 must
    be truncated, not merged, and its retry lands once at a new seq."""
    net = Net()
    a = elect(net, "a", ("a", "b"))
    net.run(a.submit(b"m0"))
    net.run(a.submit(b"m1"), drop=lambda m: True)  # the APPEND to b is lost
    assert ids(a.log) == ["m0", "m1"]
    assert net.acks() == [("m0", 1)]
    # a is cut off; c takes the channel over with b
    c = net.nodes["c"]
    net.run(c.start_term(("c", "b")), drop=lambda m: "a" in (m.src, m.dst))
    assert c.role is Role.OWNER
    net.run(c.submit(b"m2"), drop=lambda m: "a" in (m.src, m.dst))
    assert net.acks() == [("m0", 1), ("m2", 2)]
    # a still believes it owns: m1 waits; its re-send is refused by b
    assert a.submit(b"m1") == []
    net.run(a.tick())
    assert a.role is Role.FOLLOWER
    assert net.local[-1] == Refuse(CH, b"m1", "append refused by b")
    assert ("m1", 2) not in net.acks()
    # heal: c's next APPEND reaches a (a member of a new config), which
    # truncates its tail to c's epoch boundary
    net.run(c.start_term(("c", "a")))
    assert ids(net.nodes["a"].log) == ["m0", "m2"]
    assert net.nodes["a"].visible() == (e(1, 1, "m0"), e(2, 2, "m2"))
    net.run(c.submit(b"m1"))
    assert net.acks()[-1] == ("m1", 3)
    assert ids(c.visible()) == ["m0", "m2", "m1"]


# -- retries -------------------------------------------------------------------


def test_tick_resends_what_is_outstanding() -> None:
    net = Net()
    a = elect(net, "a", ("a", "b"))
    net.run(a.submit(b"m1"), drop=lambda m: True)
    assert a.tick() == [Append(CH, "a", "b", 1, 0, 0, (e(1, 1, "m1"),), 0)]
    net.run(a.tick())
    assert net.acks() == [("m1", 1)]
    assert net.nodes["c"].tick() == []


def test_a_candidate_activated_late_owns_but_cannot_commit() -> None:
    """Found by the long simulation: a candidate paused with its ACCEPTEDs
    queued becomes owner after a later term took over and committed more.
    It must hold only a prefix of the history and commit nothing new."""
    net = Net()
    a = net.nodes["a"]
    held: list[Message] = []
    net.run(a.start_term(("a", "b")), drop=lambda m: isinstance(m, Accepted))
    held += [m for m in net.dropped if isinstance(m, Accepted)]
    assert (a.role, len(held)) == (Role.ACTIVATING, 2)  # b and c accepted term 1
    c = net.nodes["c"]
    paused = lambda m: m.dst == "a"  # noqa: E731
    net.run(c.start_term(("c", "b")), drop=paused)
    if c.role is not Role.OWNER:  # term 1 was taken: c learnt it
        net.run(c.start_term(("c", "b")), drop=paused)
    assert (c.role, c.term) == (Role.OWNER, 2)
    net.run(c.submit(b"m1"), drop=paused)
    assert net.acks() == [("m1", 1)]
    # a wakes up: a majority accepted its term 1 (its heartbeats are late)
    net.run(held, drop=lambda m: m.src == "a")
    assert (a.role, a.term, a.commit, list(a.log)) == (Role.OWNER, 1, 0, [])
    net.run(a.submit(b"m2"))  # b promised term 2: a is deposed, m2 refused
    assert a.role is Role.FOLLOWER
    assert net.local[-1] == Refuse(CH, b"m2", "append refused by b")
    assert ids(c.visible()) == ["m1"]
    assert ids(net.nodes["b"].log) == ["m1"]
