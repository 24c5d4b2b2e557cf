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


def _digest(blocks: list[dict[str, int]]) -> p.Digest:
    return {e["block"]: (e["rows"], (e["hi"] << 64) | e["lo"]) for e in blocks}


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
        return p.encode_records([_record(r) for r in f["records"]])
    if op == "REPLICATE_ACK":
        return p.encode_replicate_ack(f["received"], f["inserted"])
    if op == "HANDOFF":
        kind = f["kind"]
        if kind == "DATA":
            return p.encode_handoff_data([_record(r) for r in f["records"]])
        if kind == "PULL":
            return p.encode_handoff_pull(f["channel"])
        if kind == "SEQ":
            return p.encode_handoff_seq(f["channel"], f["last_seq"])
        if kind == "DIGEST":
            return p.encode_handoff_digest(f["channel"], f["block"])
        if kind == "BLOCKS":
            return p.encode_handoff_blocks(f["channel"], _digest(f["blocks"]))
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
        assert p.decode_records(body) == [_record(r) for r in f["records"]]
    elif op == "REPLICATE_ACK":
        assert p.decode_replicate_ack(body) == (f["received"], f["inserted"])
    elif op == "HANDOFF" and f["kind"] == "BLOCKS":
        assert p.decode_handoff_blocks(body) == (f["channel"], _digest(f["blocks"]))
    elif op == "HANDOFF":
        kind, channel, last, records = p.decode_handoff(body)
        assert kind is p.HandoffKind[f["kind"]]
        assert channel == f.get("channel", 0)
        assert last == f.get("last_seq", f.get("block", 0))
        assert records == [_record(r) for r in f.get("records", [])]
    elif op == "STATS_REPLY":
        hists = {name: bytes.fromhex(blob) for name, blob in f["histograms"]}
        assert p.decode_stats_reply(body) == (f["info"], hists)
    else:
        raise AssertionError(f"no decoder for {op}")


def test_vectors_cover_every_operation() -> None:
    ops = {c["op"] for c in BODIES + JSON_BODIES}
    # every frame type carries a documented body (SUBSCRIBE's reply is ACK)
    assert ops == set(VECTORS["message_types"])
    kinds = {c["fields"]["kind"] for c in BODIES if c["op"] == "HANDOFF"}
    assert kinds == set(VECTORS["handoff_kinds"])
    gossip = {c["fields"].get("kind") for c in JSON_BODIES if c["op"] == "GOSSIP"}
    assert gossip == {"join", "sync", "ping-req", "leave", None}


def test_numbering_matches_the_spec() -> None:
    assert {t.name: int(t) for t in MessageType} == VECTORS["message_types"]
    assert {c.name: int(c) for c in p.ErrorCode} == VECTORS["error_codes"]
    assert {k.name: int(k) for k in p.HandoffKind} == VECTORS["handoff_kinds"]
    for case in BODIES + JSON_BODIES:
        assert VECTORS["message_types"][case["op"]] == case["type"]
    assert p.PROTOCOL_VERSION == 1


@pytest.mark.parametrize(
    "case",
    [c for c in BODIES if c["op"] != "STATS_REPLY"],
    ids=lambda c: c["name"],
)
def test_encode_gives_the_spec_bytes(case: dict[str, Any]) -> None:
    assert encode(case["op"], case["fields"]).hex() == case["body"]


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
    "REPLICATE": p.decode_records,
    "REPLICATE_ACK": p.decode_replicate_ack,
    "HANDOFF": p.decode_handoff,
    "HANDOFF_BLOCKS": p.decode_handoff_blocks,
    "STATS_REPLY": p.decode_stats_reply,
    "JSON": p.decode_json,
}


@pytest.mark.parametrize("case", BAD, ids=lambda c: c["name"])
def test_malformed_bodies_are_rejected(case: dict[str, Any]) -> None:
    with pytest.raises(p.ProtocolError):
        DECODERS[case["op"]](bytes.fromhex(case["body"]))
