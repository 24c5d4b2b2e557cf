"""The replica rules of the node's channel order (plexichat.node.order)."""

from __future__ import annotations

import pytest

from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p
from plexichat.node.order import ChannelMeta, Role, plan_append
from plexichat.node.ownership import SafetyError
from plexichat.node.store import ChannelLog, ChannelState

OK, REFUSED, MISMATCH = (
    pp.AppendStatus.OK,
    pp.AppendStatus.REFUSED,
    pp.AppendStatus.MISMATCH,
)


def rec(seq: int, term: int, tag: str = "m", channel: int = 7) -> p.Record:
    return p.Record(
        channel, seq, f"{tag}{seq}".encode().ljust(16, b"."), 1, 0, b"x", term
    )


def section(
    term: int,
    prev: tuple[int, int],
    records: list[p.Record],
    commit: int = 0,
    channel: int = 7,
) -> pp.AppendSection:
    return pp.AppendSection(channel, term, prev[0], prev[1], commit, tuple(records))


def meta_with(terms: list[int], commit: int = 0) -> ChannelMeta:
    meta = ChannelMeta(7)
    for seq, term in enumerate(terms, 1):
        meta.append_term(term, seq)
    meta.commit = commit
    meta.promised = max(terms, default=0)
    meta.promised_to = "a"
    return meta


def test_epochs_and_term_at_follow_the_log() -> None:
    meta = meta_with([1, 1, 2, 2, 2, 5])
    assert meta.epochs == [(1, 1), (2, 3), (5, 6)]
    assert [meta.term_at(s) for s in range(7)] == [0, 1, 1, 2, 2, 2, 5]
    with pytest.raises(IndexError):
        meta.term_at(7)
    meta.truncate(4)
    assert (meta.last, meta.epochs) == (4, [(1, 1), (2, 3)])
    meta.truncate(2)
    assert (meta.last, meta.epochs) == (2, [(1, 1)])


def test_appends_must_continue_the_log_with_non_decreasing_terms() -> None:
    meta = meta_with([1, 2])
    with pytest.raises(SafetyError):
        meta.append_term(2, 4)
    with pytest.raises(SafetyError):
        meta.append_term(1, 3)


def test_truncating_below_commit_is_refused() -> None:
    meta = meta_with([1, 1, 1], commit=2)
    with pytest.raises(SafetyError):
        meta.truncate(1)
    meta.truncate(2)
    assert meta.last == 2


def test_a_lower_term_is_refused_and_changes_nothing() -> None:
    meta = meta_with([1, 2])
    meta.promised, meta.promised_to = 3, "b"
    plan = plan_append(meta, section(2, (2, 2), [rec(3, 2)]), "a")
    assert plan.status is REFUSED
    assert (meta.last, meta.promised, meta.promised_to) == (2, 3, "b")


def test_the_same_term_from_another_candidate_is_refused() -> None:
    meta = meta_with([1])
    meta.promised, meta.promised_to = 2, "b"
    assert plan_append(meta, section(2, (1, 1), [rec(2, 2)]), "c").status is REFUSED
    assert plan_append(meta, section(2, (1, 1), [rec(2, 2)]), "b").status is OK


def test_a_missing_prev_is_a_mismatch_but_the_promise_is_kept() -> None:
    meta = meta_with([1, 1])
    plan = plan_append(meta, section(4, (1, 5), [rec(6, 4)]), "b")
    assert plan.status is MISMATCH
    assert plan.promise_changed
    assert meta.promised == 4
    assert meta.last == 2
    plan = plan_append(meta, section(4, (3, 2), [rec(3, 4)]), "b")  # wrong term at 2
    assert plan.status is MISMATCH
    assert meta.last == 2


def test_records_already_held_are_skipped() -> None:
    meta = meta_with([1, 1, 1])
    plan = plan_append(meta, section(1, (0, 0), [rec(1, 1), rec(2, 1)], 2), "a")
    assert plan.status is OK
    assert plan.records == []
    assert plan.match == 2
    assert plan.truncate_after is None
    assert meta.last == 3
    assert meta.commit == 2


def test_a_conflicting_tail_is_truncated_not_merged() -> None:
    meta = meta_with([1, 1, 1, 1])  # seqs 3, 4 of term 1 never committed
    meta.commit = 2
    new = [rec(3, 2, "n"), rec(4, 2, "n"), rec(5, 2, "n")]
    plan = plan_append(meta, section(2, (1, 2), new, commit=4), "b")
    assert plan.status is OK
    assert plan.truncate_after == 2
    assert plan.records == new
    assert (meta.last, meta.epochs) == (5, [(1, 1), (2, 3)])
    assert (plan.commit_from, plan.commit_to, meta.commit) == (2, 4, 4)


def test_a_conflict_below_commit_raises_instead_of_losing_a_committed_record() -> None:
    meta = meta_with([1, 1, 1], commit=3)
    with pytest.raises(SafetyError):
        plan_append(meta, section(2, (1, 1), [rec(2, 2, "n")]), "b")


def test_commit_never_passes_what_the_section_proves() -> None:
    meta = meta_with([1, 1, 1, 1, 1])  # a stale tail beyond the owner's log
    meta.promised = 0
    plan = plan_append(meta, section(2, (1, 2), [], commit=9), "b")
    assert plan.status is OK
    assert plan.match == 2
    assert meta.commit == 2


def test_a_higher_term_makes_an_owner_step_down() -> None:
    meta = meta_with([1])
    meta.role, meta.term, meta.members = Role.OWNER, 1, ("a", "b")
    meta.pending[b"x"] = 2
    assert meta.owns(("a", "b"))
    plan = plan_append(meta, section(2, (1, 1), []), "b")
    assert plan.status is OK
    assert plan.promise_changed
    assert meta.role is Role.FOLLOWER
    assert not meta.pending
    assert not meta.owns(("a", "b"))


def test_state_round_trips_through_the_stored_form() -> None:
    meta = meta_with([1, 3, 3], commit=2)
    meta.accepted_term, meta.accepted_members = 3, ("a", "b")
    stored = ChannelLog(last=3, epochs=[(1, 1), (3, 2)], state=meta.state())
    again = ChannelMeta.from_log(7, stored)
    assert (again.last, again.epochs, again.commit) == (3, [(1, 1), (3, 2)], 2)
    assert (again.promised, again.promised_to) == (3, "a")
    assert (again.accepted_term, again.accepted_members) == (3, ("a", "b"))
    assert again.seen == 3
    assert again.role is Role.FOLLOWER
    lost_rows = ChannelLog(last=1, epochs=[(1, 1)], state=ChannelState(7, commit=5))
    assert ChannelMeta.from_log(7, lost_rows).commit == 1


def test_common_prefix_with_another_log() -> None:
    meta = meta_with([1, 1, 2, 2])
    assert meta.common_prefix_with(((1, 1), (2, 3)), 6) == 4
    assert meta.common_prefix_with(((1, 1), (3, 3)), 6) == 2
    assert meta.common_prefix_with((), 0) == 0
