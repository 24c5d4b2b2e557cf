"""A replica's APPEND fast paths (ChannelOrder.on_append) against the rules
they inline (plexichat.node.order.plan_append): same status, promise, match,
log shape, commit and stored records for any log and any section."""

from __future__ import annotations

import collections
import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p
from plexichat.node.channels import ChannelOrder
from plexichat.node.order import ChannelMeta, plan_append
from plexichat.node.ownership import SafetyError
from plexichat.stats import Histogram

CHANNEL = 7


class _Storage:
    def __init__(self) -> None:
        self.records: list[p.Record] = []
        self.truncated: dict[int, int] = {}

    def insert(
        self, records: Any, callback: Any, truncate: Any = None, states: Any = ()
    ) -> None:
        self.records += records
        self.truncated.update(truncate or {})
        callback(len(records), {}, None)


class _Conn:
    peer_id = "a"

    def __init__(self) -> None:
        self.replies: list[bytes] = []

    def send(self, ftype: int, rid: int, body: bytes) -> None:
        self.replies.append(body)

    def send_error(self, *args: Any) -> None:  # pragma: no cover - a failure
        raise AssertionError(args)


def _order(storage: _Storage, commits: list[tuple[int, int, int]]) -> ChannelOrder:
    return ChannelOrder(
        "n0",
        storage=storage,  # type: ignore[arg-type]
        peers=None,  # type: ignore[arg-type]
        voters=lambda: ["n0", "a", "b"],
        counters=collections.defaultdict(int),  # type: ignore[arg-type]
        hist={"replicate": Histogram()},
        spawn=None,  # type: ignore[arg-type]
        on_commit=lambda c, a, b: commits.append((c, a, b)),
        on_stored=lambda records: None,
        call_timeout=1.0,
        data_timeout=1.0,
        batch=100,
    )


def _record(seq: int, term: int) -> p.Record:
    return p.Record(CHANNEL, seq, b"%015d." % seq, 1, 0, b"x", term)


@st.composite
def cases(draw: st.DrawFn) -> tuple[ChannelMeta, pp.AppendSection, str]:
    steps = draw(st.lists(st.integers(0, 2), max_size=6))
    terms, term = [], 1
    for step in steps:
        term += step
        terms.append(term)
    meta = ChannelMeta(CHANNEL)
    for seq, t in enumerate(terms, 1):
        meta.append_term(t, seq)
    meta.commit = draw(st.integers(0, len(terms)))
    meta.promised = max(terms, default=0) + draw(st.integers(0, 1))
    meta.promised_to = draw(st.sampled_from(["a", "b"]))
    meta.seen = meta.promised
    # the section: prev somewhere around the log, a run of records after it
    prev_seq = draw(st.integers(0, len(terms) + 1))
    held = prev_seq <= len(terms)
    prev_term = (terms[prev_seq - 1] if prev_seq else 0) if held else term
    prev_term = draw(st.sampled_from([prev_term, max(prev_term - 1, 0), prev_term + 1]))
    sec_term = max(0, max(prev_term, meta.promised) + draw(st.integers(-1, 1)))
    prev_term = min(prev_term, sec_term) if prev_seq else 0
    count = draw(st.integers(0, 3))
    rec_terms = sorted(
        draw(st.lists(st.integers(prev_term, sec_term), min_size=count, max_size=count))
    )
    records = tuple(_record(prev_seq + 1 + i, t) for i, t in enumerate(rec_terms))
    commit = draw(st.integers(0, prev_seq + count + 1))
    section = pp.AppendSection(CHANNEL, sec_term, prev_term, prev_seq, commit, records)
    return meta, section, draw(st.sampled_from(["a", "b"]))


def _shape(meta: ChannelMeta) -> tuple[Any, ...]:
    return (
        meta.last,
        list(meta.epochs),
        meta.commit,
        meta.promised,
        meta.promised_to,
        meta.seen,
    )


@settings(max_examples=2000, deadline=None)
@given(cases())
def test_on_append_does_what_plan_append_says(
    case: tuple[ChannelMeta, pp.AppendSection, str],
) -> None:
    meta, section, src = case
    planned = copy.deepcopy(meta)
    try:
        plan = plan_append(planned, section, src)
    except SafetyError:
        return  # a conflict below commit: on_append answers FAILED (tested elsewhere)
    storage, commits = _Storage(), []
    order = _order(storage, commits)
    order.metas[CHANNEL] = applied = copy.deepcopy(meta)
    conn = _Conn()
    conn.peer_id = src
    order.on_append(conn, 1, pp.encode_append([section]))  # type: ignore[arg-type]
    [result] = pp.decode_append_results(conn.replies[0])
    assert (result.status, result.promised, result.match) == (
        plan.status,
        planned.promised,
        plan.match,
    )
    assert _shape(applied) == _shape(planned)
    assert storage.records == plan.records
    cut = storage.truncated.get(CHANNEL)
    assert cut == plan.truncate_after
    if plan.commit_to > plan.commit_from:
        assert commits == [(CHANNEL, plan.commit_from, plan.commit_to)]
    else:
        assert commits == []


def test_a_replica_answer_that_leaves_a_channel_out_fails_that_channel() -> None:
    from types import SimpleNamespace

    from plexichat import wire
    from plexichat.node.writes import WriteGroup

    writes = SimpleNamespace(node=SimpleNamespace(order=SimpleNamespace(metas={})))
    group = WriteGroup(writes, [], [], {}, parts=2)  # type: ignore[arg-type]
    ok = pp.encode_append_results([pp.AppendResult(1, pp.AppendStatus.OK, 3, 9)])
    group.replica_done([1, 2], wire.Frame(wire.MessageType.REPLICATE_ACK, 1, ok), None)
    assert set(group.failed) == {2}
    assert "left it out" in group.failed[2][1]
