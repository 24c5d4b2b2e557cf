"""Operation bodies: round trips and rejection of malformed bodies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p

REC = p.Record(
    channel=2**64 - 1,
    seq=7,
    msg_id=p.message_id(3, 9),
    sender=3,
    ts_us=123,
    payload=b"hi",
)


def test_send_layout_is_32_bytes_then_payload():
    body = p.encode_send(5, p.message_id(1, 2), 1, b"xyz")
    assert len(body) == 32 + 3
    assert body[:8] == (5).to_bytes(8, "big")
    assert p.decode_send(body) == (5, p.message_id(1, 2), 1, b"xyz")
    with pytest.raises(p.ProtocolError):
        p.decode_send(body[:31])


def test_message_id_convention():
    assert p.split_message_id(p.message_id(2**63, 5)) == (2**63, 5)


def test_ack_fetch_channel_round_trip():
    assert p.decode_ack(p.encode_ack(1, 2)) == (1, 2)
    assert p.decode_fetch(p.encode_fetch(1, 2, 3)) == (1, 2, 3)
    assert p.decode_channel(p.encode_channel(9)) == 9
    for bad in (p.decode_ack, p.decode_fetch, p.decode_channel):
        with pytest.raises(p.ProtocolError):
            bad(b"\x00")


def test_messages_round_trip_and_truncation():
    body = p.encode_messages(REC.channel, [REC, REC._replace(seq=8, payload=b"")], True)
    channel, records, more = p.decode_messages(body)
    assert channel == REC.channel
    assert more is True
    assert records == [REC, REC._replace(seq=8, payload=b"")]
    for cut in (5, len(body) - 1, 13 + 10):
        with pytest.raises(p.ProtocolError):
            p.decode_messages(body[:cut])
    with pytest.raises(p.ProtocolError):
        p.decode_messages(body + b"x")


def test_deliver_round_trip():
    assert p.decode_deliver(p.encode_deliver(REC)) == REC
    with pytest.raises(p.ProtocolError):
        p.decode_deliver(p.encode_deliver(REC)[:-1])
    with pytest.raises(p.ProtocolError):
        p.decode_deliver(b"abc")


# -- channel order (terms): APPEND, results, HANDOFF PREPARE .. OWN -----------


def _rec(seq: int, term: int, payload: bytes = b"p") -> p.Record:
    return p.Record(9, seq, p.message_id(3, seq), 3, 1000 + seq, payload, term)


SECTION = pp.AppendSection(
    9, 5, 2, 3, 2, (_rec(4, 2), _rec(5, 4, b""), _rec(6, 5, b"x" * 300))
)


def _head(
    channel: int, term: int, prev_term: int, prev_seq: int, commit: int, count: int
) -> bytes:
    return pp.APPEND_HEAD.pack(channel, term, prev_term, prev_seq, commit, count)


def _log_record(term: int, seq: int, payload: bytes = b"p") -> bytes:
    return (
        pp.LOG_RECORD.pack(term, seq, p.message_id(3, seq), 3, 1000 + seq, len(payload))
        + payload
    )


def test_append_round_trip_and_layout():
    empty = pp.AppendSection(2**64 - 1, 0, 0, 0, 0, ())
    body = pp.encode_append([SECTION, empty])
    assert body[:4] == (2).to_bytes(4, "big")
    assert body[4:48] == _head(9, 5, 2, 3, 2, 3)
    assert body[48:100] == _log_record(2, 4)[:52]
    assert len(body) == 4 + 2 * 44 + 3 * 52 + 1 + 0 + 300
    assert pp.decode_append(body) == [SECTION, empty]
    assert pp.decode_append(pp.encode_append([])) == []
    # the section's channel is sent, not each record's
    other = pp.AppendSection(9, 5, 0, 0, 0, (_rec(1, 5)._replace(channel=1),))
    assert pp.decode_append(pp.encode_append([other]))[0].records == (_rec(1, 5),)


def _case_id(value: object) -> str:
    """Test ids: the expected message, not the body's bytes."""
    if isinstance(value, str):
        return value
    return getattr(value, "__name__", "body")


def _append(head: bytes, *records: bytes, count: int = 1) -> bytes:
    return p.COUNT.pack(count) + head + b"".join(records)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\x00\x00\x00", "no count"),
        (_append(b""), "section count 1 runs past the end"),
        (_append(_head(1, 1, 0, 0, 0, 0))[:-1], "section count 1 runs past the end"),
        (
            _append(_head(1, 1, 0, 0, 0, 1), _log_record(1, 1), count=2) + bytes(43),
            "head truncated",
        ),
        (
            _append(_head(1, 1, 0, 0, 0, 2), _log_record(1, 1)),
            "record count 2 runs past",
        ),
        (
            _append(_head(1, 1, 0, 0, 0, 2), _log_record(1, 1, bytes(60)), bytes(40)),
            "record truncated",
        ),
        (_append(_head(1, 1, 0, 0, 0, 1), _log_record(1, 1)[:-1]), "payload"),
        (_append(_head(1, 1, 0, 0, 0, 1), _log_record(1, 1), b"\x00"), "trailing"),
        (_append(_head(1, 1, 0, 0, 0, 1), _log_record(1, 2)), "seq 2 where 1"),
        (_append(_head(1, 1, 1, 4, 0, 1), _log_record(1, 4)), "seq 4 where 5"),
        (
            _append(_head(1, 1, 0, 0, 0, 2), _log_record(1, 1), _log_record(1, 3)),
            "seq 3 where 2",
        ),
        (_append(_head(1, 2, 0, 0, 0, 1), _log_record(3, 1)), "term 3 above term 2"),
        (
            _append(_head(1, 5, 0, 0, 0, 2), _log_record(4, 1), _log_record(3, 2)),
            "below the previous record's 4",
        ),
        (_append(_head(1, 5, 4, 1, 0, 1), _log_record(3, 2)), "below prev_term 4"),
        (_append(_head(1, 5, 4, 0, 0, 0)), "prev_term 4 with prev_seq 0"),
        (_append(_head(1, 5, 6, 3, 0, 0)), "prev_term 6 above term 5"),
        (
            _append(_head(1, 1, 0, 0, 0, 0), _head(1, 1, 0, 0, 0, 0), count=2),
            "two sections for channel 1",
        ),
    ],
    ids=_case_id,
)
def test_append_rejects(body: bytes, match: str):
    with pytest.raises(p.ProtocolError, match=match):
        pp.decode_append(body)


@st.composite
def sections(draw: st.DrawFn) -> list[pp.AppendSection]:
    """Valid APPEND sections: consecutive seqs, non-decreasing terms <= term."""
    u64 = st.integers(0, 2**64 - 1)
    below = st.integers(0, p.SEQ_END - 1)  # terms, commits, timestamps
    channels = draw(st.lists(u64, unique=True, max_size=4))
    out = []
    for channel in channels:
        term = draw(below)
        prev_seq = draw(st.integers(0, 2**40))
        prev_term = draw(st.integers(0, term)) if prev_seq else 0
        terms = sorted(draw(st.lists(st.integers(prev_term, term), max_size=6)))
        records = tuple(
            p.Record(
                channel,
                prev_seq + i + 1,
                draw(st.binary(min_size=16, max_size=16)),
                draw(u64),
                draw(below),
                draw(st.binary(max_size=40)),
                t,
            )
            for i, t in enumerate(terms)
        )
        out.append(
            pp.AppendSection(channel, term, prev_term, prev_seq, draw(below), records)
        )
    return out


@settings(deadline=None, max_examples=150)
@given(sections(), st.data())
def test_append_round_trip_property(secs: list[pp.AppendSection], data: st.DataObject):
    body = pp.encode_append(secs)
    assert pp.decode_append(body) == secs
    for section in secs:
        assert pp.decode_log_reply(pp.encode_log_reply(section)) == section
    cut = data.draw(st.integers(0, len(body) - 1))
    for bad in (body[:cut], body + b"\x00"):
        with pytest.raises(p.ProtocolError):
            pp.decode_append(bad)


def test_append_results_round_trip_and_rejects():
    results = [
        pp.AppendResult(1, pp.AppendStatus.OK, 4, 2**63 - 1),
        pp.AppendResult(2, pp.AppendStatus.REFUSED, 9, 0),
        pp.AppendResult(3, pp.AppendStatus.MISMATCH, 4, 0),
        pp.AppendResult(2**64 - 1, pp.AppendStatus.FAILED, 0, 0),
    ]
    body = pp.encode_append_results(results)
    assert len(body) == 4 + 4 * 25
    assert body[4:29] == pp.APPEND_RESULT.pack(1, 0, 4, 2**63 - 1)
    assert pp.decode_append_results(body) == results
    assert pp.decode_append_results(pp.encode_append_results([])) == []
    one = p.COUNT.pack(1)
    for bad, match in [
        (b"\x00", "no count"),
        (body[:-1], "for count 4"),
        (body + b"\x00", "for count 4"),
        (one + pp.APPEND_RESULT.pack(1, 4, 0, 0), "unknown status 4"),
        (one + pp.APPEND_RESULT.pack(1, 2, 0, 3), "match 3 with MISMATCH"),
        (p.COUNT.pack(2) + pp.APPEND_RESULT.pack(1, 0, 0, 0) * 2, "two results"),
    ]:
        with pytest.raises(p.ProtocolError, match=match):
            pp.decode_append_results(bad)


def test_handoff_kind():
    for kind in p.HandoffKind:
        assert pp.handoff_kind(bytes([kind]) + b"rest") is kind
    assert [int(k) for k in p.HandoffKind] == list(range(6, 12))
    for bad, match in [(b"", "empty"), (b"\x00", "kind 0"), (b"\x0c", "kind 12")]:
        with pytest.raises(p.ProtocolError, match=match):
            pp.handoff_kind(bad)


@pytest.mark.parametrize(
    "body",
    [
        b"\x01" + p.COUNT.pack(0),  # DATA: count, replica records
        b"\x02" + bytes(16),  # PULL: channel, 0
        b"\x03" + bytes(16),  # SEQ: channel, last seq
        b"\x04" + bytes(16),  # DIGEST: channel, block
        b"\x05" + bytes(12),  # BLOCKS: channel, count, blocks
        b"\x01",
        b"\x05",
    ],
)
def test_retired_handoff_kinds_are_rejected(body: bytes) -> None:
    """Kinds 1 .. 5 (the handoff before terms) are unknown kinds now."""
    with pytest.raises(p.ProtocolError, match=f"unknown HANDOFF kind {body[0]}"):
        pp.handoff_kind(body)
    assert body[0] not in {int(k) for k in p.HandoffKind}


def test_log_request_and_reply():
    req = pp.LogRequest(2**64 - 1, 41, 500)
    body = pp.encode_log_request(req)
    assert body == b"\x0a" + pp.LOG_REQUEST.pack(10, 2**64 - 1, 41, 500)[1:]
    assert pp.decode_log_request(body) == req
    for bad, match in [
        (body[:-1], "20 bytes != 21"),
        (body + b"\x00", "22 bytes != 21"),
        (b"\x06" + body[1:], "PREPARE body where LOG"),
        (b"", "empty"),
    ]:
        with pytest.raises(p.ProtocolError, match=match):
            pp.decode_log_request(bad)
    reply = pp.encode_log_reply(SECTION)
    assert reply == b"\x0a" + pp.encode_append([SECTION])[4:]
    assert pp.decode_log_reply(reply) == SECTION
    for bad, match in [
        (reply + b"\x00", "trailing"),
        (reply[:-1], "payload truncated"),
        (body, "head truncated"),
        (b"\x0b" + reply[1:], "OWN body where LOG"),
        (b"\x0a" + _head(1, 1, 0, 0, 0, 1) + _log_record(2, 1), "above term 1"),
    ]:
        with pytest.raises(p.ProtocolError, match=match):
            pp.decode_log_reply(bad)


def test_own_round_trip_and_rejects():
    body = pp.encode_own([5, 2**64 - 1, 0])
    assert body == b"\x0b" + p.COUNT.pack(3) + b"".join(
        pp.U64.pack(c) for c in (5, 2**64 - 1, 0)
    )
    assert pp.decode_own(body) == (5, 2**64 - 1, 0)
    ack = pp.encode_own([])
    assert ack == b"\x0b\x00\x00\x00\x00"
    assert pp.decode_own(ack) == ()
    for bad, match in [
        (b"\x0b\x00\x00", "no count"),
        (body[:-1], "for count 3"),
        (body + b"\x00", "for count 3"),
        (b"\x0b" + p.COUNT.pack(2) + pp.U64.pack(1) * 2, "twice"),
        (b"\x0a" + body[1:], "LOG body where OWN"),
    ]:
        with pytest.raises(p.ProtocolError, match=match):
            pp.decode_own(bad)


PREPARE = pp.Prepare(2**64 - 1, 7, ((0, 1), (3, 4), (7, 9)), 12)
PROMISE = pp.PromiseMsg(
    5, 8, True, 8, pp.AcceptedConfig(7, ("n1", "n2")), ((1, 1), (7, 3)), 4, 3
)
ACCEPT = pp.AcceptMsg(5, 8, ("n2", "n1", "n3"))
ACCEPTED = pp.AcceptedMsg(5, 8, False, 9)


def test_json_handoff_round_trips():
    cases: list[tuple[Any, Any, Any, int]] = [
        (PREPARE, pp.encode_prepare, pp.decode_prepare, 6),
        (pp.Prepare(1, 1, (), 0), pp.encode_prepare, pp.decode_prepare, 6),
        (PROMISE, pp.encode_promise, pp.decode_promise, 7),
        (
            pp.PromiseMsg(5, 3, False, 9, None, (), 0, 0),
            pp.encode_promise,
            pp.decode_promise,
            7,
        ),
        (ACCEPT, pp.encode_accept, pp.decode_accept, 8),
        (ACCEPTED, pp.encode_accepted, pp.decode_accepted, 9),
        (pp.AcceptedMsg(5, 8, True, 8), pp.encode_accepted, pp.decode_accepted, 9),
    ]
    for msg, encode, decode, kind in cases:
        body = encode(msg)
        assert body[0] == kind
        assert decode(body) == msg
    assert json.loads(pp.encode_promise(PROMISE)[1:]) == {
        "channel": 5,
        "term": 8,
        "ok": True,
        "promised": 8,
        "accepted": {"term": 7, "members": ["n1", "n2"]},
        "epochs": [[1, 1], [7, 3]],
        "last": 4,
        "commit": 3,
    }


def _json(kind: int, obj: object) -> bytes:
    return bytes([kind]) + json.dumps(obj).encode()


def _with(base: pp.Prepare | pp.PromiseMsg | pp.AcceptMsg | pp.AcceptedMsg, **kw: Any):
    """The JSON object of *base* with keys replaced (``...``: deleted)."""
    encode = {
        pp.Prepare: pp.encode_prepare,
        pp.PromiseMsg: pp.encode_promise,
        pp.AcceptMsg: pp.encode_accept,
        pp.AcceptedMsg: pp.encode_accepted,
    }[type(base)]
    body = encode(base)  # type: ignore[operator]
    obj = json.loads(body[1:])
    for key, value in kw.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    return _json(body[0], obj)


BAD_PREPARES = [
    (b"\x06", "bad JSON"),
    (b"\x06[]", "must be an object"),
    (b"\x06\xff", "bad JSON"),
    (b'\x06{"channel": 1, "channel": 1}', "repeats a key"),
    (b"\x06" + b"[" * 100_000, "bad JSON"),
    (_with(PREPARE, last=...), "missing keys \\['last'\\]"),
    (_with(PREPARE, extra=1), "unknown keys \\['extra'\\]"),
    (_with(PREPARE, channel=-1), "channel must be"),
    (_with(PREPARE, channel=2**64), "channel must be"),
    (_with(PREPARE, channel=1.0), "channel must be"),
    (_with(PREPARE, channel=True), "channel must be"),
    (_with(PREPARE, channel="1"), "channel must be"),
    (_with(PREPARE, term=0), "term must be an integer in 1"),
    (_with(PREPARE, epochs={}), "epochs must be a list"),
    (_with(PREPARE, epochs=[1, 1]), "entries must be"),
    (_with(PREPARE, epochs=[[1, 1, 1]]), "entries must be"),
    (_with(PREPARE, epochs=[[True, 1]]), "epoch's term"),
    (_with(PREPARE, epochs=[[None, 1]]), "epoch's term"),
    (_with(PREPARE, epochs=[[1, 0]]), "epoch's first seq"),
    (_with(PREPARE, epochs=[[1, 1], [1, 5]]), "strictly increase"),
    (_with(PREPARE, epochs=[[1, 1], [2, 1]]), "strictly increase"),
    (_with(PREPARE, epochs=[[2, 1], [1, 5]]), "strictly increase"),
    (_with(PREPARE, epochs=[[1, 2]]), "do not start seqs 1 .. 12"),
    (_with(PREPARE, last=8), "do not start seqs 1 .. 8"),
    (_with(PREPARE, epochs=[]), "last 12 with no epochs"),
    (_with(PREPARE, epochs=[[8, 1]]), "term 8 above term 7"),
    (_with(PREPARE, last=-1), "last must be"),
    (b"\x07" + pp.encode_prepare(PREPARE)[1:], "PROMISE body where PREPARE"),
]

BAD_PROMISES = [
    (_with(PROMISE, ok=1), "ok must be true or false"),
    (_with(PROMISE, ok=None), "ok must be true or false"),
    (_with(PROMISE, promised=9), "ok with promised 9 != term 8"),
    (_with(PROMISE, ok=False, promised=7), "refusal with promised 7 below"),
    (_with(PROMISE, accepted=...), "missing keys \\['accepted'\\]"),
    (_with(PROMISE, accepted=[7, ["n1"]]), "accepted must be null or"),
    (_with(PROMISE, accepted={"term": 7}), "accepted must be null or"),
    (
        _with(PROMISE, accepted={"term": 7, "members": ["a"], "x": 1}),
        "accepted must be null or",
    ),
    (_with(PROMISE, accepted={"term": 0, "members": ["a"]}), "accepted term"),
    (_with(PROMISE, accepted={"term": 9, "members": ["a"]}), "above promised 8"),
    (_with(PROMISE, accepted={"term": 7, "members": []}), "non-empty list"),
    (_with(PROMISE, accepted={"term": 7, "members": "n1"}), "non-empty list"),
    (_with(PROMISE, accepted={"term": 7, "members": [""]}), "non-empty strings"),
    (_with(PROMISE, accepted={"term": 7, "members": [1]}), "non-empty strings"),
    (_with(PROMISE, accepted={"term": 7, "members": ["a", "a"]}), "twice"),
    (_with(PROMISE, commit=5), "commit 5 above last 4"),
    (_with(PROMISE, epochs=[[9, 1]]), "term 9 above promised 8"),
    (_with(PROMISE, last=2), "do not start seqs 1 .. 2"),
    (_with(PROMISE, term=0, promised=0), "term must be an integer in 1"),
]

BAD_ACCEPTS = [
    (_with(ACCEPT, term=0), "term must be an integer in 1"),
    (_with(ACCEPT, members=[]), "non-empty list"),
    (_with(ACCEPT, members=["a", "b", "a"]), "twice"),
    (_with(ACCEPT, members=["a", None]), "non-empty strings"),
    (_with(ACCEPT, members=...), "missing keys"),
    (_with(ACCEPT, promised=1), "unknown keys"),
    (b"\x09" + pp.encode_accept(ACCEPT)[1:], "ACCEPTED body where ACCEPT"),
]

BAD_ACCEPTEDS = [
    (_with(ACCEPTED, ok="false"), "ok must be true or false"),
    (_with(ACCEPTED, ok=0), "ok must be true or false"),
    (_with(ACCEPTED, ok=True), "ok with promised 9 != term 8"),
    (_with(ACCEPTED, promised=7), "refusal with promised 7 below term 8"),
    (_with(ACCEPTED, promised=2**64), "promised must be"),
    (_with(ACCEPTED, channel=...), "missing keys \\['channel'\\]"),
    (b"", "empty HANDOFF body"),
]


@pytest.mark.parametrize(
    ("decode", "body", "match"),
    [(pp.decode_prepare, b, m) for b, m in BAD_PREPARES]
    + [(pp.decode_promise, b, m) for b, m in BAD_PROMISES]
    + [(pp.decode_accept, b, m) for b, m in BAD_ACCEPTS]
    + [(pp.decode_accepted, b, m) for b, m in BAD_ACCEPTEDS],
    ids=_case_id,
)
def test_json_handoff_rejects(decode: Any, body: bytes, match: str):
    with pytest.raises(p.ProtocolError, match=match):
        decode(body)


def test_relay_round_trip():
    relay = p.Relay(1, 2, 3, 4, "node-é", b"payload")
    assert p.decode_relay(p.encode_relay(relay)) == relay
    with pytest.raises(ValueError, match="longer than 255"):
        p.encode_relay(p.Relay(1, 2, 3, 4, "x" * 256, b""))
    with pytest.raises(p.ProtocolError):
        p.decode_relay(b"\x00" * 18)
    with pytest.raises(p.ProtocolError):
        p.decode_relay(b"\x00" * 18 + b"\x05ab")
    with pytest.raises(p.ProtocolError):
        p.decode_relay(b"\x00" * 18 + b"\x01\xff")


def test_error_and_json_bodies():
    assert p.decode_error(p.encode_error(5, "nope")) == (5, "nope")
    with pytest.raises(p.ProtocolError):
        p.decode_error(b"\x01")
    assert p.decode_json(p.encode_json({"a": [1]})) == {"a": [1]}
    assert p.decode_json(b"") == {}
    for bad in (b"[1]", b"{", b"\xff"):
        with pytest.raises(p.ProtocolError):
            p.decode_json(bad)


def test_stats_reply_round_trip():
    body = p.encode_stats_reply({"x": 1}, {"send": b"\x01\x02", "relay": b""})
    assert p.decode_stats_reply(body) == ({"x": 1}, {"send": b"\x01\x02", "relay": b""})
    with pytest.raises(p.ProtocolError):
        p.decode_stats_reply(b"\x00")
    with pytest.raises(p.ProtocolError):
        p.decode_stats_reply(body[:6])
    for cut in (1, 3, 8):
        with pytest.raises(p.ProtocolError):
            p.decode_stats_reply(body[: len(body) - cut])


def test_node_vectors_are_what_the_spec_generator_writes():
    """tests/vectors/node.json is fresh (the golden tests check the codec)."""
    script = Path(__file__).parents[1] / "vectors" / "generate_node.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# -- value ranges (issue 12) -------------------------------------------------------

TOP = p.SEQ_END - 1  # the highest seq, term, commit, ts_us, after


def _range_section(
    term: int, prev_term: int, prev_seq: int, commit: int, *recs
) -> bytes:
    head = pp.APPEND_HEAD.pack(1, term, prev_term, prev_seq, commit, len(recs))
    return p.COUNT.pack(1) + head + b"".join(recs)


def _range_rec(term: int, seq: int, ts_us: int) -> bytes:
    return pp.LOG_RECORD.pack(term, seq, p.message_id(1, seq), 2**64 - 1, ts_us, 0)


def _range_record(seq: int, ts_us: int) -> bytes:
    return p.MESSAGE_RECORD.pack(seq, p.message_id(1, 1), 2**64 - 1, ts_us, 0)


def _prepare_json(**fields: Any) -> bytes:
    obj = {"channel": 2**64 - 1, "term": 1, "epochs": [], "last": 0, **fields}
    return bytes([p.HandoffKind.PREPARE]) + json.dumps(obj).encode()


# (decoder, the body at the top of the range, the body one above it)
RANGES = [
    (
        p.decode_fetch,
        p.FETCH_BODY.pack(2**64 - 1, TOP, 1),
        p.FETCH_BODY.pack(1, TOP + 1, 1),
    ),
    (
        pp.decode_log_request,
        pp.LOG_REQUEST.pack(10, 2**64 - 1, TOP, 1),
        pp.LOG_REQUEST.pack(10, 1, TOP + 1, 1),
    ),
    (pp.decode_append, _range_section(TOP, 0, 0, 0), _range_section(TOP + 1, 0, 0, 0)),
    (pp.decode_append, _range_section(1, 0, 0, TOP), _range_section(1, 0, 0, TOP + 1)),
    (pp.decode_append, _range_section(1, 1, TOP, 0), _range_section(1, 1, TOP + 1, 0)),
    (
        pp.decode_append,
        _range_section(1, 1, TOP - 1, 0, _range_rec(1, TOP, 1)),
        _range_section(1, 1, TOP, 0, _range_rec(1, TOP + 1, 1)),
    ),
    (
        pp.decode_append,
        _range_section(1, 0, 0, 0, _range_rec(1, 1, TOP)),
        _range_section(1, 0, 0, 0, _range_rec(1, 1, TOP + 1)),
    ),
    (
        pp.decode_append_results,
        p.COUNT.pack(1) + pp.APPEND_RESULT.pack(1, 0, TOP, TOP),
        p.COUNT.pack(1) + pp.APPEND_RESULT.pack(1, 0, 1, TOP + 1),
    ),
    (
        pp.decode_append_results,
        p.COUNT.pack(1) + pp.APPEND_RESULT.pack(1, 1, TOP, 0),
        p.COUNT.pack(1) + pp.APPEND_RESULT.pack(1, 1, TOP + 1, 0),
    ),
    (
        p.decode_messages,
        p.MESSAGES_HEAD.pack(1, 1, 0) + _range_record(TOP, TOP),
        p.MESSAGES_HEAD.pack(1, 1, 0) + _range_record(TOP + 1, 1),
    ),
    (
        p.decode_messages,
        p.MESSAGES_HEAD.pack(1, 1, 0) + _range_record(1, TOP),
        p.MESSAGES_HEAD.pack(1, 1, 0) + _range_record(1, TOP + 1),
    ),
    (
        p.decode_deliver,
        p.CHANNEL_BODY.pack(1) + _range_record(TOP, TOP),
        p.CHANNEL_BODY.pack(1) + _range_record(1, TOP + 1),
    ),
    (pp.decode_prepare, _prepare_json(term=TOP), _prepare_json(term=TOP + 1)),
    (
        pp.decode_prepare,
        _prepare_json(epochs=[[1, 1]], last=TOP),
        _prepare_json(epochs=[[1, 1]], last=TOP + 1),
    ),
]


RANGE_NAMES = [
    "fetch-after",
    "log-request-after",
    "append-term",
    "append-commit",
    "append-prev-seq",
    "append-record-seq",
    "append-record-ts",
    "results-match",
    "results-promised",
    "messages-seq",
    "messages-ts",
    "deliver-ts",
    "prepare-term",
    "prepare-last",
]


@pytest.mark.parametrize(("decode", "top", "above"), RANGES, ids=RANGE_NAMES)
def test_values_below_2_63_decode_and_2_63_is_rejected(decode, top, above):
    decode(top)
    with pytest.raises(p.ProtocolError, match="2\\*\\*63"):
        decode(above)
