"""Node operation bodies against tests/vectors/node.json (built from the spec).

The vectors are packed by hand from docs/protocol.md
(tests/vectors/generate_node.py), so these tests catch a codec that drifts
from the document: each encoder must produce the vector's bytes and each
decoder must give back its fields.  Only pytest is needed (guests run it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p
from plexichat.node.membership import parse_update
from plexichat.wire import MessageType

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "node.json").read_text(
        encoding="utf-8"
    )
)
BODIES: list[dict[str, Any]] = VECTORS["bodies"]
JSON_BODIES: list[dict[str, Any]] = VECTORS["json_bodies"]
BAD: list[dict[str, Any]] = VECTORS["bad"]


def _record(r: dict[str, Any], channel: int | None = None) -> p.Record:
    return p.Record(
        r["channel"] if channel is None else channel,
        r["seq"],
        bytes.fromhex(r["msg_id"]),
        r["sender"],
        r["ts_us"],
        bytes.fromhex(r["payload"]),
    )


def _section(s: dict[str, Any]) -> pp.AppendSection:
    records = tuple(
        p.Record(
            s["channel"],
            r["seq"],
            bytes.fromhex(r["msg_id"]),
            r["sender"],
            r["ts_us"],
            bytes.fromhex(r["payload"]),
            r["term"],
        )
        for r in s["records"]
    )
    return pp.AppendSection(
        s["channel"], s["term"], s["prev_term"], s["prev_seq"], s["commit"], records
    )


def _result(r: dict[str, Any]) -> pp.AppendResult:
    return pp.AppendResult(
        r["channel"], pp.AppendStatus[r["status"]], r["promised"], r["match"]
    )


def _epochs(epochs: list[list[int]]) -> pp.Epochs:
    return tuple((term, first) for term, first in epochs)


def _prepare(f: dict[str, Any]) -> pp.Prepare:
    return pp.Prepare(f["channel"], f["term"], _epochs(f["epochs"]), f["last"])


def _promise(f: dict[str, Any]) -> pp.PromiseMsg:
    acc = f["accepted"]
    return pp.PromiseMsg(
        f["channel"],
        f["term"],
        f["ok"],
        f["promised"],
        None if acc is None else pp.AcceptedConfig(acc["term"], tuple(acc["members"])),
        _epochs(f["epochs"]),
        f["last"],
        f["commit"],
    )


def _accept(f: dict[str, Any]) -> pp.AcceptMsg:
    return pp.AcceptMsg(f["channel"], f["term"], tuple(f["members"]))


def _accepted(f: dict[str, Any]) -> pp.AcceptedMsg:
    return pp.AcceptedMsg(f["channel"], f["term"], f["ok"], f["promised"])


# HANDOFF kinds whose body is the kind byte then JSON (any formatting)
JSON_KINDS = {"PREPARE", "PROMISE", "ACCEPT", "ACCEPTED"}


def _relay(f: dict[str, Any]) -> p.Relay:
    return p.Relay(
        f["relay_id"],
        f["sent_ns"],
        f["ttl"],
        f["fanout"],
        f["root"],
        bytes.fromhex(f["payload"]),
    )


def encode(op: str, f: dict[str, Any]) -> bytes:
    """The body *op* with fields *f*, from plexichat.node.protocol."""
    if op == "SEND":
        return p.encode_send(
            f["channel"],
            bytes.fromhex(f["msg_id"]),
            f["sender"],
            bytes.fromhex(f["payload"]),
        )
    if op == "ACK":
        return p.encode_ack(f["channel"], f["seq"])
    if op == "FETCH":
        return p.encode_fetch(f["channel"], f["after"], f["limit"])
    if op == "MESSAGES":
        records = [_record(r, f["channel"]) for r in f["records"]]
        return p.encode_messages(f["channel"], records, f["more"])
    if op == "SUBSCRIBE":
        return p.encode_channel(f["channel"])
    if op == "DELIVER":
        return p.encode_deliver(_record(f))
    if op == "RELAY":
        return p.encode_relay(_relay(f))
    if op == "ERROR":
        return p.encode_error(f["code"], f["message"])
    if op == "REPLICATE":
        return pp.encode_append([_section(s) for s in f["sections"]])
    if op == "REPLICATE_ACK":
        return pp.encode_append_results([_result(r) for r in f["results"]])
    if op == "HANDOFF":
        kind = f["kind"]
        if kind == "PREPARE":
            return pp.encode_prepare(_prepare(f))
        if kind == "PROMISE":
            return pp.encode_promise(_promise(f))
        if kind == "ACCEPT":
            return pp.encode_accept(_accept(f))
        if kind == "ACCEPTED":
            return pp.encode_accepted(_accepted(f))
        if kind == "LOG" and "section" in f:
            return pp.encode_log_reply(_section(f["section"]))
        if kind == "LOG":
            return pp.encode_log_request(
                pp.LogRequest(f["channel"], f["after"], f["limit"])
            )
        if kind == "OWN":
            return pp.encode_own(f["channels"])
    raise AssertionError(f"no encoder for {op} {f}")


def check_decode(op: str, body: bytes, f: dict[str, Any]) -> None:
    """Decode *body* as *op* and compare with the vector's fields."""
    if op == "SEND":
        assert p.decode_send(body) == (
            f["channel"],
            bytes.fromhex(f["msg_id"]),
            f["sender"],
            bytes.fromhex(f["payload"]),
        )
    elif op == "ACK":
        assert p.decode_ack(body) == (f["channel"], f["seq"])
    elif op == "FETCH":
        assert p.decode_fetch(body) == (f["channel"], f["after"], f["limit"])
    elif op == "MESSAGES":
        records = [_record(r, f["channel"]) for r in f["records"]]
        assert p.decode_messages(body) == (f["channel"], records, f["more"])
    elif op == "SUBSCRIBE":
        assert p.decode_channel(body) == f["channel"]
    elif op == "DELIVER":
        assert p.decode_deliver(body) == _record(f)
    elif op == "RELAY":
        assert p.decode_relay(body) == _relay(f)
    elif op == "ERROR":
        assert p.decode_error(body) == (f["code"], f["message"])
    elif op == "REPLICATE":
        assert pp.decode_append(body) == [_section(s) for s in f["sections"]]
    elif op == "REPLICATE_ACK":
        assert pp.decode_append_results(body) == [_result(r) for r in f["results"]]
    elif op == "HANDOFF":
        assert pp.handoff_kind(body) is p.HandoffKind[f["kind"]]
        assert KIND_DECODERS[f["kind"]](body) == KIND_FIELDS[f["kind"]](f)
    elif op == "STATS_REPLY":
        hists = {name: bytes.fromhex(blob) for name, blob in f["histograms"]}
        assert p.decode_stats_reply(body) == (f["info"], hists)
    else:
        raise AssertionError(f"no decoder for {op}")


def _decode_log(body: bytes) -> object:
    """A LOG reply (a section) or a LOG request (21 bytes)."""
    if len(body) == pp.LOG_REQUEST.size:
        return pp.decode_log_request(body)
    return pp.decode_log_reply(body)


def _log_fields(f: dict[str, Any]) -> object:
    if "section" in f:
        return _section(f["section"])
    return pp.LogRequest(f["channel"], f["after"], f["limit"])


KIND_DECODERS: dict[str, Callable[[bytes], object]] = {
    "PREPARE": pp.decode_prepare,
    "PROMISE": pp.decode_promise,
    "ACCEPT": pp.decode_accept,
    "ACCEPTED": pp.decode_accepted,
    "LOG": _decode_log,
    "OWN": pp.decode_own,
}
KIND_FIELDS: dict[str, Callable[[dict[str, Any]], object]] = {
    "PREPARE": _prepare,
    "PROMISE": _promise,
    "ACCEPT": _accept,
    "ACCEPTED": _accepted,
    "LOG": _log_fields,
    "OWN": lambda f: tuple(f["channels"]),
}


def _cases(op: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [
        c["fields"]
        for c in BODIES
        if c["op"] == op and (kind is None or c["fields"]["kind"] == kind)
    ]


def test_vectors_cover_every_operation() -> None:
    ops = {c["op"] for c in BODIES + JSON_BODIES}
    # every frame type carries a documented body (SUBSCRIBE's reply is ACK)
    assert ops == set(VECTORS["message_types"])
    kinds = {c["fields"]["kind"] for c in BODIES if c["op"] == "HANDOFF"}
    assert kinds == set(VECTORS["handoff_kinds"]) == set(KIND_DECODERS)
    gossip = {c["fields"].get("kind") for c in JSON_BODIES if c["op"] == "GOSSIP"}
    assert gossip == {"join", "sync", "ping-req", "leave", None}
    # REPLICATE carries APPEND sections (a commit notice among them: no
    # records), REPLICATE_ACK APPEND results of every status
    sections = [s for f in _cases("REPLICATE") for s in f["sections"]]
    assert {bool(s["records"]) for s in sections} == {True, False}
    statuses = {r["status"] for f in _cases("REPLICATE_ACK") for r in f["results"]}
    assert statuses == set(VECTORS["append_statuses"])
    # both directions of LOG and OWN, both answers of PROMISE and ACCEPTED
    assert {"section" in f for f in _cases("HANDOFF", "LOG")} == {True, False}
    assert {bool(f["channels"]) for f in _cases("HANDOFF", "OWN")} == {True, False}
    promises = _cases("HANDOFF", "PROMISE")
    assert {f["ok"] for f in promises} == {True, False}
    assert {f["accepted"] is None for f in promises} == {True, False}
    assert {f["ok"] for f in _cases("HANDOFF", "ACCEPTED")} == {True, False}
    # every decoder is given bodies it must reject, HANDOFF kinds outside
    # 6 .. 11 among them (the retired kinds 1 .. 5 too)
    assert {c["op"] for c in BAD} == set(DECODERS)
    unknown = {
        bytes.fromhex(c["body"])[0]
        for c in BAD
        if c["op"] == "HANDOFF_KIND" and c["body"]
    }
    assert unknown >= {0, 1, 2, 3, 4, 5, 12, 255}
    assert not unknown & set(VECTORS["handoff_kinds"].values())


def test_numbering_matches_the_spec() -> None:
    assert {t.name: int(t) for t in MessageType} == VECTORS["message_types"]
    assert {c.name: int(c) for c in p.ErrorCode} == VECTORS["error_codes"]
    assert {k.name: int(k) for k in p.HandoffKind} == VECTORS["handoff_kinds"]
    assert {s.name: int(s) for s in pp.AppendStatus} == VECTORS["append_statuses"]
    for case in BODIES + JSON_BODIES:
        assert VECTORS["message_types"][case["op"]] == case["type"]
    assert p.PROTOCOL_VERSION == 1


@pytest.mark.parametrize(
    "case",
    [c for c in BODIES if c["op"] != "STATS_REPLY"],
    ids=lambda c: c["name"],
)
def test_encode_gives_the_spec_bytes(case: dict[str, Any]) -> None:
    out = encode(case["op"], case["fields"])
    if case["op"] == "HANDOFF" and case["fields"]["kind"] in JSON_KINDS:
        # the kind byte, then JSON equal to the vector's (formatting is free)
        want = bytes.fromhex(case["body"])
        assert out[:1] == want[:1]
        assert json.loads(out[1:].decode("utf-8")) == json.loads(want[1:])
    else:
        assert out.hex() == case["body"]


@pytest.mark.parametrize("case", BODIES, ids=lambda c: c["name"])
def test_decode_gives_the_fields(case: dict[str, Any]) -> None:
    check_decode(case["op"], bytes.fromhex(case["body"]), case["fields"])


@pytest.mark.parametrize(
    "case",
    [c for c in BODIES if c["op"] == "STATS_REPLY"],
    ids=lambda c: c["name"],
)
def test_encode_stats_reply(case: dict[str, Any]) -> None:
    """Exact bytes around the JSON section, which must decode to the same object."""
    f = case["fields"]
    hists = {name: bytes.fromhex(blob) for name, blob in f["histograms"]}
    out = p.encode_stats_reply(f["info"], hists)
    want = bytes.fromhex(case["body"])
    size = int.from_bytes(out[:4], "big")
    assert json.loads(out[4 : 4 + size].decode("utf-8")) == f["info"]
    want_size = int.from_bytes(want[:4], "big")
    assert out[4 + size :] == want[4 + want_size :]


@pytest.mark.parametrize("case", JSON_BODIES, ids=lambda c: c["name"])
def test_json_bodies(case: dict[str, Any]) -> None:
    body = bytes.fromhex(case["body"])
    assert p.decode_json(body) == case["fields"]
    out = p.encode_json(case["fields"])
    assert json.loads(out.decode("utf-8")) == case["fields"]


def test_member_updates_follow_the_spec_order() -> None:
    """``[id, host, port, incarnation, status, weight]``."""
    updates = []
    for case in JSON_BODIES:
        f = case["fields"]
        updates += f.get("updates", []) + f.get("members", [])
        updates += [f["member"]] if "member" in f else []
    assert updates
    for update in updates:
        member = parse_update(update)
        assert member is not None, update
        assert member.update() == update
        node_id, host, port, incarnation, status, weight = update
        assert (member.id, member.host, member.port) == (node_id, host, port)
        assert (member.incarnation, member.status) == (incarnation, status)
        assert member.weight == weight


DECODERS: dict[str, Callable[[bytes], object]] = {
    "SEND": p.decode_send,
    "ACK": p.decode_ack,
    "FETCH": p.decode_fetch,
    "MESSAGES": p.decode_messages,
    "SUBSCRIBE": p.decode_channel,
    "DELIVER": p.decode_deliver,
    "RELAY": p.decode_relay,
    "ERROR": p.decode_error,
    "REPLICATE": pp.decode_append,
    "REPLICATE_ACK": pp.decode_append_results,
    "HANDOFF_KIND": pp.handoff_kind,
    "PREPARE": pp.decode_prepare,
    "PROMISE": pp.decode_promise,
    "ACCEPT": pp.decode_accept,
    "ACCEPTED": pp.decode_accepted,
    "LOG_REQUEST": pp.decode_log_request,
    "LOG_REPLY": pp.decode_log_reply,
    "OWN": pp.decode_own,
    "STATS_REPLY": p.decode_stats_reply,
    "JSON": p.decode_json,
}


@pytest.mark.parametrize("case", BAD, ids=lambda c: c["name"])
def test_malformed_bodies_are_rejected(case: dict[str, Any]) -> None:
    with pytest.raises(p.ProtocolError):
        DECODERS[case["op"]](bytes.fromhex(case["body"]))
