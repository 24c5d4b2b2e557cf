"""Write tests/vectors/node.json: byte vectors of the node operation bodies.

Every body is built by hand from docs/protocol.md ("Operations"): fields are
packed with ``int.to_bytes(size, "big")`` in the order and sizes the spec
gives.  Nothing here imports ``plexichat``, so a codec that drifts from the
document fails tests/golden/test_node.py instead of regenerating its vectors.

    python tests/vectors/generate_node.py           # rewrite node.json
    python tests/vectors/generate_node.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "node.json"

# docs/protocol.md, "Message types", "ERROR (12)" and "HANDOFF (16)"
MESSAGE_TYPES = {
    "HELLO": 1, "WELCOME": 2, "SEND": 3, "ACK": 4, "FETCH": 5, "MESSAGES": 6,
    "SUBSCRIBE": 7, "DELIVER": 8, "RELAY": 9, "STATS": 10, "STATS_REPLY": 11,
    "ERROR": 12, "GOSSIP": 13, "REPLICATE": 14, "REPLICATE_ACK": 15,
    "HANDOFF": 16, "PING": 17, "PONG": 18,
}  # fmt: skip
ERROR_CODES = {
    "BAD_VERSION": 1, "MALFORMED": 2, "UNKNOWN_OP": 3, "TOO_LARGE": 4,
    "UNAVAILABLE": 5, "TIMEOUT": 6, "NOT_OWNER": 7, "INTERNAL": 8,
    "SHUTTING_DOWN": 9, "UNAUTHENTICATED": 10, "FORBIDDEN": 11,
}  # fmt: skip
# "REPLICATE (14) -> REPLICATE_ACK (15), HANDOFF (16)": kinds 1 .. 5 are
# retired (the handoff before terms) and rejected like any unassigned kind
HANDOFF_KINDS = {
    "PREPARE": 6, "PROMISE": 7, "ACCEPT": 8, "ACCEPTED": 9, "LOG": 10, "OWN": 11,
}  # fmt: skip
# "REPLICATE_ACK (15): APPEND results"
APPEND_STATUSES = {"OK": 0, "REFUSED": 1, "MISMATCH": 2, "FAILED": 3}

U64_MAX = 2**64 - 1
# "Value ranges": seq, after, term, prev_term, prev_seq, commit, ts_us,
# promised, match and the integers of the HANDOFF JSON bodies (but channel)
# are below 2**63; ids (channel, sender, relay_id) use all 64 bits
SEQ_MAX = 2**63 - 1


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def msg_id(sender: int, counter: int) -> bytes:
    """The conventional message id: sender u64 then the sender's counter u64."""
    return u64(sender) + u64(counter)


def record(r: dict[str, Any]) -> bytes:
    """A record: seq u64, msg_id bytes[16], sender u64, ts_us u64, len u32, payload."""
    payload = bytes.fromhex(r["payload"])
    mid = bytes.fromhex(r["msg_id"])
    assert len(mid) == 16
    return (
        u64(r["seq"])
        + mid
        + u64(r["sender"])
        + u64(r["ts_us"])
        + u32(len(payload))
        + payload
    )


def log_record(r: dict[str, Any]) -> bytes:
    """A log record: term u64, then a record (seq, msg_id, sender, ts_us, len)."""
    return u64(r["term"]) + record(r)


def append_section(s: dict[str, Any]) -> bytes:
    """channel, term, prev_term, prev_seq, commit (u64 each), count u32, records."""
    return (
        u64(s["channel"])
        + u64(s["term"])
        + u64(s["prev_term"])
        + u64(s["prev_seq"])
        + u64(s["commit"])
        + u32(len(s["records"]))
        + b"".join(log_record(r) for r in s["records"])
    )


def append_result(r: dict[str, Any]) -> bytes:
    """channel u64, status u8, promised u64, match u64."""
    return (
        u64(r["channel"])
        + u8(APPEND_STATUSES[r["status"]])
        + u64(r["promised"])
        + u64(r["match"])
    )


def kind_json(kind: str, obj: Any) -> bytes:
    """A HANDOFF JSON body: the kind byte, then the JSON (any formatting)."""
    return u8(HANDOFF_KINDS[kind]) + json.dumps(obj).encode("utf-8")


def rec(
    seq: int, sender: int, counter: int, ts_us: int, payload: bytes
) -> dict[str, Any]:
    return {
        "seq": seq,
        "msg_id": msg_id(sender, counter).hex(),
        "sender": sender,
        "ts_us": ts_us,
        "payload": payload.hex(),
    }


CHANNEL = 0xFEDCBA9876543210  # high bit set: catches signed packing
TS = 1_796_000_000_123_456  # microseconds since the epoch (2026)
BINARY = bytes(range(256))[::37] + b"\x00\xff\x80"  # not UTF-8

RECORDS = [
    rec(1, 7, 1, TS, b"hello"),
    rec(2, 0x8000000000000001, U64_MAX, TS + 1, b""),
    rec(SEQ_MAX, U64_MAX, 0, SEQ_MAX, BINARY),
]
# APPEND sections: records at prev_seq + 1, + 2, ... with non-decreasing terms
# between prev_term and the section's term
SECTIONS = [
    {
        "channel": CHANNEL,
        "term": 7,
        "prev_term": 3,
        "prev_seq": 41,
        "commit": 40,
        "records": [
            {"term": 3, **rec(42, 7, 1, TS, b"hello")},
            {"term": 5, **rec(43, 0x8000000000000001, U64_MAX, TS + 1, b"")},
            {"term": 7, **rec(44, U64_MAX, 0, SEQ_MAX, BINARY)},
        ],
    },
    {  # a commit notice: no records, the commit only
        "channel": U64_MAX,
        "term": SEQ_MAX,
        "prev_term": SEQ_MAX,
        "prev_seq": SEQ_MAX,
        "commit": SEQ_MAX,
        "records": [],
    },
    {  # the start of a log, terms 0 (numbered before terms) then 1
        "channel": 0,
        "term": 1,
        "prev_term": 0,
        "prev_seq": 0,
        "commit": 0,
        "records": [
            {"term": 0, **rec(1, 1, 1, TS, b"a")},
            {"term": 1, **rec(2, 1, 2, TS, b"b")},
        ],
    },
]
RESULTS = [
    {"channel": CHANNEL, "status": "OK", "promised": 7, "match": 44},
    {"channel": 0, "status": "REFUSED", "promised": SEQ_MAX, "match": 0},
    {"channel": 5, "status": "MISMATCH", "promised": 7, "match": 0},
    {"channel": U64_MAX, "status": "FAILED", "promised": 0, "match": 0},
]
PREPARES = [
    {"channel": CHANNEL, "term": 8, "epochs": [[0, 1], [3, 12], [7, 40]], "last": 44},
    {"channel": 0, "term": SEQ_MAX, "epochs": [], "last": 0},
]
PROMISES = [
    {
        "channel": CHANNEL,
        "term": 8,
        "ok": True,
        "promised": 8,
        "accepted": {"term": 7, "members": ["n1", "n2"]},
        "epochs": [[3, 1], [7, 40]],
        "last": 43,
        "commit": 40,
    },
    {
        "channel": 0,
        "term": 2,
        "ok": False,
        "promised": SEQ_MAX,
        "accepted": None,
        "epochs": [],
        "last": 0,
        "commit": 0,
    },
]
ACCEPTS = [
    {"channel": CHANNEL, "term": 8, "members": ["n2", "n1", "nœud-3"]},
    {"channel": U64_MAX, "term": 1, "members": ["n0"]},
]
ACCEPTEDS = [
    {"channel": CHANNEL, "term": 8, "ok": True, "promised": 8},
    {"channel": 0, "term": 8, "ok": False, "promised": 9},
]


def binary_bodies() -> list[dict[str, Any]]:
    """Fixed-layout bodies: (op, name, fields, body)."""
    out: list[tuple[str, str, dict[str, Any], bytes]] = []

    def add(op: str, name: str, fields: dict[str, Any], body: bytes) -> None:
        out.append((op, name, fields, body))

    # SEND: channel u64, msg_id bytes[16], sender u64, payload (rest)
    for name, channel, sender, counter, payload in [
        ("send", CHANNEL, 7, 42, b"hello, world"),
        ("send-empty-payload", 0, U64_MAX, U64_MAX, b""),
        ("send-binary-payload", U64_MAX, 1, 2, BINARY * 3),
    ]:
        mid = msg_id(sender, counter)
        add(
            "SEND",
            name,
            {
                "channel": channel,
                "msg_id": mid.hex(),
                "sender": sender,
                "payload": payload.hex(),
            },
            u64(channel) + mid + u64(sender) + payload,
        )
    # ACK: channel u64, seq u64 (also the SUBSCRIBE and RELAY replies)
    for name, channel, seq in [
        ("ack", CHANNEL, 12345),
        ("ack-zero", 0, 0),
        ("ack-max", U64_MAX, U64_MAX),
    ]:
        add("ACK", name, {"channel": channel, "seq": seq}, u64(channel) + u64(seq))
    # FETCH: channel u64, after u64, limit u32
    for name, channel, after, limit in [
        ("fetch", CHANNEL, 0, 1000),
        ("fetch-max", U64_MAX, SEQ_MAX, 2**32 - 1),
    ]:
        add(
            "FETCH",
            name,
            {"channel": channel, "after": after, "limit": limit},
            u64(channel) + u64(after) + u32(limit),
        )
    # MESSAGES: channel u64, count u32, more u8, then count records
    for name, channel, records, more in [
        ("messages-empty", CHANNEL, [], False),
        ("messages-one-more", CHANNEL, RECORDS[:1], True),
        ("messages-three", U64_MAX, RECORDS, False),
    ]:
        add(
            "MESSAGES",
            name,
            {"channel": channel, "records": records, "more": more},
            u64(channel)
            + u32(len(records))
            + u8(1 if more else 0)
            + b"".join(record(r) for r in records),
        )
    # SUBSCRIBE: channel u64
    for name, channel in [("subscribe", CHANNEL), ("subscribe-zero", 0)]:
        add("SUBSCRIBE", name, {"channel": channel}, u64(channel))
    # DELIVER: channel u64 + record
    for name, channel, r in [
        ("deliver", CHANNEL, RECORDS[0]),
        ("deliver-empty-payload", 0, RECORDS[1]),
        ("deliver-binary", U64_MAX, RECORDS[2]),
    ]:
        add("DELIVER", name, {"channel": channel, **r}, u64(channel) + record(r))
    # RELAY: relay_id u64, sent_ns u64, ttl u8, fanout u8, root_len u8, root, payload
    for name, relay_id, sent_ns, ttl, fanout, root, payload in [
        ("relay-injected", 1, 1_796_000_000_123_456_789, 3, 2, "", b"ping"),
        ("relay-forwarded", U64_MAX, U64_MAX, 0, 255, "node-é-1", BINARY),
        ("relay-long-root", 2**63, 0, 255, 1, "r" * 255, b""),
    ]:
        raw = root.encode("utf-8")
        add(
            "RELAY",
            name,
            {
                "relay_id": relay_id,
                "sent_ns": sent_ns,
                "ttl": ttl,
                "fanout": fanout,
                "root": root,
                "payload": payload.hex(),
            },
            u64(relay_id) + u64(sent_ns) + u8(ttl) + u8(fanout) + u8(len(raw)) + raw
            + payload,
        )  # fmt: skip
    # ERROR: code u16 then a UTF-8 message
    for name, code, message in [
        ("error-bad-version", ERROR_CODES["BAD_VERSION"], "protocol version 2"),
        ("error-empty-message", ERROR_CODES["SHUTTING_DOWN"], ""),
        ("error-utf8", ERROR_CODES["NOT_OWNER"], "owner is nœud-2 ✓"),
    ]:
        add(
            "ERROR",
            name,
            {"code": code, "message": message},
            u16(code) + message.encode("utf-8"),
        )
    # REPLICATE: count u32 then count APPEND sections
    for name, sections in [
        ("replicate-empty", []),
        ("replicate-one", SECTIONS[:1]),
        ("replicate-three", SECTIONS),
    ]:
        add(
            "REPLICATE",
            name,
            {"sections": sections},
            u32(len(sections)) + b"".join(append_section(x) for x in sections),
        )
    # REPLICATE_ACK: count u32 then count APPEND results
    for name, results in [
        ("replicate-ack-empty", []),
        ("replicate-ack", RESULTS),
    ]:
        add(
            "REPLICATE_ACK",
            name,
            {"results": results},
            u32(len(results)) + b"".join(append_result(r) for r in results),
        )
    # HANDOFF PREPARE, PROMISE, ACCEPT, ACCEPTED: kind u8 then a JSON object
    for kind, objs in [
        ("PREPARE", PREPARES),
        ("PROMISE", PROMISES),
        ("ACCEPT", ACCEPTS),
        ("ACCEPTED", ACCEPTEDS),
    ]:
        for i, obj in enumerate(objs):
            add(
                "HANDOFF",
                f"handoff-{kind.lower()}-{i}",
                {"kind": kind, **obj},
                kind_json(kind, obj),
            )
    # HANDOFF LOG request: kind u8, channel u64, after u64, limit u32
    for name, channel, after, limit in [
        ("handoff-log-request", CHANNEL, 41, 500),
        ("handoff-log-request-max", U64_MAX, SEQ_MAX, 2**32 - 1),
    ]:
        add(
            "HANDOFF",
            name,
            {"kind": "LOG", "channel": channel, "after": after, "limit": limit},
            u8(HANDOFF_KINDS["LOG"]) + u64(channel) + u64(after) + u32(limit),
        )
    # HANDOFF LOG reply: kind u8 then one APPEND section
    for name, section in [
        ("handoff-log-reply", SECTIONS[0]),
        ("handoff-log-reply-empty", SECTIONS[1]),
    ]:
        add(
            "HANDOFF",
            name,
            {"kind": "LOG", "section": section},
            u8(HANDOFF_KINDS["LOG"]) + append_section(section),
        )
    # HANDOFF OWN: kind u8, count u32, count channels u64 (count 0: the ack)
    for name, channels in [
        ("handoff-own", [CHANNEL, 0, U64_MAX]),
        ("handoff-own-ack", []),
    ]:
        add(
            "HANDOFF",
            name,
            {"kind": "OWN", "channels": channels},
            u8(HANDOFF_KINDS["OWN"])
            + u32(len(channels))
            + b"".join(u64(c) for c in channels),
        )
    # STATS_REPLY: json_len u32, JSON, then name_len u8, name, blob_len u32, blob
    info = {
        "node_id": "n0",
        "address": "127.0.0.1:7000",
        "backend": "compiled",
        "members": [
            {
                "id": "n0",
                "address": "127.0.0.1:7000",
                "incarnation": 0,
                "status": "alive",
                "weight": 1.0,
            }
        ],
        "ring": ["n0"],
    }
    doc = json.dumps(info, ensure_ascii=False).encode("utf-8")
    hists = [["send", (b"\x00\x01" * 20).hex()], ["relay", ""], ["é", "ff"]]
    add(
        "STATS_REPLY",
        "stats-reply",
        {"info": info, "histograms": hists},
        u32(len(doc))
        + doc
        + b"".join(
            u8(len(n.encode())) + n.encode() + u32(len(b) // 2) + bytes.fromhex(b)
            for n, b in hists
        ),
    )
    empty = b"{}"
    add(
        "STATS_REPLY",
        "stats-reply-no-histograms",
        {"info": {}, "histograms": []},
        u32(len(empty)) + empty,
    )
    return [
        {
            "op": op,
            "type": MESSAGE_TYPES[op],
            "name": name,
            "fields": f,
            "body": b.hex(),
        }
        for op, name, f, b in out
    ]


def update(node: str, port: int, inc: int, status: str, weight: float) -> list[Any]:
    """A member update: [id, host, port, incarnation, status, weight]."""
    return [node, "127.0.0.1", port, inc, status, weight]


def json_bodies() -> list[dict[str, Any]]:
    """JSON bodies (written with spaces: any JSON formatting must decode)."""
    n1 = update("n1", 7001, 3, "alive", 1.0)
    n2 = update("n2", 7002, 0, "suspect", 2.5)
    cases: list[tuple[str, str, dict[str, Any] | None]] = [
        ("HELLO", "hello-client", {"version": 1, "role": "client"}),
        ("HELLO", "hello-peer", {"version": 1, "role": "peer", "node_id": "n1"}),
        (
            "WELCOME",
            "welcome",
            {
                "version": 1,
                "node_id": "n0",
                "address": "10.0.2.15:7000",
                "replicas": 2,
                "backend": "python",
            },
        ),
        ("STATS", "stats-empty", None),
        ("STATS", "stats-reset", {"reset": ["relay", "send"]}),
        ("PING", "ping-empty", None),
        ("PING", "ping-probe", {"from": "n1", "updates": [n1, n2]}),
        ("PONG", "pong-empty", None),
        ("PONG", "pong", {"from": "n2", "updates": []}),
        ("GOSSIP", "gossip-join", {"kind": "join", "member": n1}),
        ("GOSSIP", "gossip-members", {"members": [n1, n2]}),
        ("GOSSIP", "gossip-sync", {"kind": "sync", "members": [n1, n2]}),
        ("GOSSIP", "gossip-ping-req", {"kind": "ping-req", "target": "n2"}),
        ("GOSSIP", "gossip-ping-req-reply", {"ok": False}),
        (
            "GOSSIP",
            "gossip-leave",
            {"kind": "leave", "member": update("n1", 7001, 4, "left", 1.0)},
        ),
        ("GOSSIP", "gossip-leave-reply", {"ok": True}),
    ]
    return [
        {
            "op": op,
            "type": MESSAGE_TYPES[op],
            "name": name,
            "fields": obj or {},
            "body": b"" if obj is None else json.dumps(obj).encode("utf-8"),
        }
        for op, name, obj in cases
    ]


def bad_bodies() -> list[dict[str, Any]]:
    """Bodies that do not match their layout; the decoder must reject them."""
    r0 = record(RECORDS[0])
    stats = u32(2) + b"{}"

    def head(
        term: int, prev_term: int, prev_seq: int, count: int, commit: int = 0
    ) -> bytes:
        """An APPEND section head of channel 1 (commit 0 unless given)."""
        return (
            u64(1) + u64(term) + u64(prev_term) + u64(prev_seq) + u64(commit)
            + u32(count)
        )  # fmt: skip

    def lrec(term: int, seq: int, payload: bytes = b"p", ts_us: int = TS) -> bytes:
        return log_record({"term": term, **rec(seq, 1, seq, ts_us, payload)})

    def messages_with(r: dict[str, Any]) -> bytes:
        return u64(1) + u32(1) + u8(0) + record(r)

    big = 2**63  # the first value out of the "Value ranges"

    def append(*parts: bytes, count: int = 1) -> bytes:
        return u32(count) + b"".join(parts)

    def result(channel: int, status: int, promised: int, match: int) -> bytes:
        return u64(channel) + u8(status) + u64(promised) + u64(match)

    def edit(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
        """*obj* with keys replaced (value ``...``: the key removed)."""
        out = {**obj, **changes}
        return {k: v for k, v in out.items() if v is not ...}

    prep, prom = PREPARES[0], PROMISES[0]
    acc, accd = ACCEPTS[0], ACCEPTEDS[0]
    log_kind = u8(HANDOFF_KINDS["LOG"])
    own_kind = u8(HANDOFF_KINDS["OWN"])
    cases: list[tuple[str, str, bytes]] = [
        ("SEND", "send-short", bytes(31)),
        ("ACK", "ack-short", bytes(15)),
        ("ACK", "ack-long", bytes(17)),
        ("FETCH", "fetch-short", bytes(19)),
        ("FETCH", "fetch-long", bytes(21)),
        ("FETCH", "fetch-after-2-63", u64(1) + u64(big) + u32(10)),
        ("SUBSCRIBE", "subscribe-short", bytes(7)),
        ("SUBSCRIBE", "subscribe-long", bytes(9)),
        ("MESSAGES", "messages-head-short", bytes(12)),
        ("MESSAGES", "messages-record-missing", u64(1) + u32(1) + u8(0)),
        ("MESSAGES", "messages-record-cut", u64(1) + u32(1) + u8(0) + r0[:40]),
        ("MESSAGES", "messages-payload-cut", u64(1) + u32(1) + u8(0) + r0[:-1]),
        ("MESSAGES", "messages-trailing", u64(1) + u32(1) + u8(0) + r0 + b"\x00"),
        ("MESSAGES", "messages-seq-2-63", messages_with(rec(big, 1, 1, TS, b""))),
        ("MESSAGES", "messages-ts-2-63", messages_with(rec(1, 1, 1, big, b""))),
        ("DELIVER", "deliver-short", u64(1) + r0[:43]),
        ("DELIVER", "deliver-payload-cut", u64(1) + r0[:-1]),
        ("DELIVER", "deliver-trailing", u64(1) + r0 + b"\x00"),
        ("DELIVER", "deliver-seq-2-63", u64(1) + record(rec(big, 1, 1, TS, b""))),
        ("DELIVER", "deliver-ts-2-63", u64(1) + record(rec(1, 1, 1, big, b""))),
        ("RELAY", "relay-short", bytes(18)),
        ("RELAY", "relay-root-cut", bytes(18) + u8(5) + b"ab"),
        ("RELAY", "relay-root-not-utf8", bytes(18) + u8(1) + b"\xff"),
        ("ERROR", "error-short", b"\x00"),
        ("STATS_REPLY", "stats-reply-short", bytes(3)),
        ("STATS_REPLY", "stats-reply-json-cut", u32(10) + b"{}"),
        ("STATS_REPLY", "stats-reply-json-array", u32(2) + b"[]"),
        ("STATS_REPLY", "stats-reply-name-cut", stats + u8(4) + b"se"),
        ("STATS_REPLY", "stats-reply-size-cut", stats + u8(1) + b"s" + b"\x00\x00"),
        ("STATS_REPLY", "stats-reply-blob-cut", stats + u8(1) + b"s" + u32(3) + b"ab"),
        ("HANDOFF_KIND", "kind-empty", b""),
        ("HANDOFF_KIND", "kind-0", u8(0)),
        ("HANDOFF_KIND", "kind-12", u8(12) + bytes(20)),
        ("HANDOFF_KIND", "kind-255", u8(255)),
        # the retired kinds 1 .. 5, with the bodies they had before terms
        ("HANDOFF_KIND", "kind-1-data", u8(1) + u32(0)),
        ("HANDOFF_KIND", "kind-2-pull", u8(2) + u64(1) + u64(0)),
        ("HANDOFF_KIND", "kind-3-seq", u8(3) + u64(1) + u64(2)),
        ("HANDOFF_KIND", "kind-4-digest", u8(4) + u64(1) + u64(256)),
        ("HANDOFF_KIND", "kind-5-blocks", u8(5) + u64(1) + u32(0)),
        ("REPLICATE", "append-short", bytes(3)),
        ("REPLICATE", "append-count-high", append(head(1, 0, 0, 0), count=2)),
        ("REPLICATE", "append-head-cut", append(head(1, 0, 0, 0)[:-1])),
        ("REPLICATE", "append-records-high", append(head(1, 0, 0, 2), lrec(1, 1))),
        ("REPLICATE", "append-record-cut", append(head(1, 0, 0, 1), lrec(1, 1)[:51])),
        ("REPLICATE", "append-payload-cut", append(head(1, 0, 0, 1), lrec(1, 1)[:-1])),
        ("REPLICATE", "append-trailing", append(head(1, 0, 0, 1), lrec(1, 1), b"\x00")),
        ("REPLICATE", "append-seq-skips", append(head(1, 0, 0, 1), lrec(1, 2))),
        ("REPLICATE", "append-seq-repeats", append(head(1, 1, 1, 1), lrec(1, 1))),
        ("REPLICATE", "append-term-above", append(head(2, 0, 0, 1), lrec(3, 1))),
        (
            "REPLICATE",
            "append-term-decreases",
            append(head(5, 0, 0, 2), lrec(4, 1), lrec(3, 2)),
        ),
        ("REPLICATE", "append-term-below-prev", append(head(5, 4, 1, 1), lrec(3, 2))),
        ("REPLICATE", "append-prev-term-no-prev-seq", append(head(5, 4, 0, 0))),
        ("REPLICATE", "append-prev-term-above", append(head(5, 6, 3, 0))),
        (
            "REPLICATE",
            "append-channel-twice",
            append(head(1, 0, 0, 0), head(1, 0, 0, 0), count=2),
        ),
        ("REPLICATE", "append-term-2-63", append(head(big, 0, 0, 0))),
        ("REPLICATE", "append-prev-seq-2-63", append(head(1, 1, big, 0))),
        ("REPLICATE", "append-commit-2-63", append(head(1, 0, 0, 0, commit=big))),
        (
            "REPLICATE",
            "append-seq-2-63",
            append(head(1, 1, big - 1, 1), lrec(1, big)),
        ),
        (
            "REPLICATE",
            "append-ts-2-63",
            append(head(1, 0, 0, 1), lrec(1, 1, ts_us=big)),
        ),
        ("REPLICATE_ACK", "results-short", bytes(3)),
        ("REPLICATE_ACK", "results-cut", u32(1) + result(1, 0, 1, 1)[:-1]),
        ("REPLICATE_ACK", "results-trailing", u32(1) + result(1, 0, 1, 1) + b"\x00"),
        ("REPLICATE_ACK", "results-count-high", u32(2) + result(1, 0, 1, 1)),
        ("REPLICATE_ACK", "results-status-4", u32(1) + result(1, 4, 1, 0)),
        ("REPLICATE_ACK", "results-match-refused", u32(1) + result(1, 1, 1, 1)),
        ("REPLICATE_ACK", "results-promised-2-63", u32(1) + result(1, 1, big, 0)),
        ("REPLICATE_ACK", "results-match-2-63", u32(1) + result(1, 0, 1, big)),
        (
            "REPLICATE_ACK",
            "results-channel-twice",
            u32(2) + result(1, 0, 1, 1) + result(1, 0, 1, 1),
        ),
        ("PREPARE", "prepare-no-json", u8(HANDOFF_KINDS["PREPARE"])),
        ("PREPARE", "prepare-array", kind_json("PREPARE", [prep])),
        ("PREPARE", "prepare-not-utf8", u8(HANDOFF_KINDS["PREPARE"]) + b'{"\xff": 1}'),
        (
            "PREPARE",
            "prepare-key-twice",
            u8(HANDOFF_KINDS["PREPARE"]) + b'{"channel": 1, "channel": 1, "term": 1, '
            b'"epochs": [], "last": 0}',
        ),
        ("PREPARE", "prepare-wrong-kind", kind_json("PROMISE", prep)),
        ("PREPARE", "prepare-missing-key", kind_json("PREPARE", edit(prep, last=...))),
        ("PREPARE", "prepare-extra-key", kind_json("PREPARE", edit(prep, ok=True))),
        ("PREPARE", "prepare-negative", kind_json("PREPARE", edit(prep, channel=-1))),
        ("PREPARE", "prepare-2-64", kind_json("PREPARE", edit(prep, channel=2**64))),
        ("PREPARE", "prepare-float", kind_json("PREPARE", edit(prep, channel=1.0))),
        ("PREPARE", "prepare-bool", kind_json("PREPARE", edit(prep, channel=True))),
        ("PREPARE", "prepare-string", kind_json("PREPARE", edit(prep, channel="1"))),
        ("PREPARE", "prepare-term-0", kind_json("PREPARE", edit(prep, term=0))),
        ("PREPARE", "prepare-term-2-63", kind_json("PREPARE", edit(prep, term=big))),
        ("PREPARE", "prepare-last-2-63", kind_json("PREPARE", edit(prep, last=big))),
        (
            "PREPARE",
            "prepare-epochs-object",
            kind_json("PREPARE", edit(prep, epochs={"3": 1})),
        ),
        (
            "PREPARE",
            "prepare-epoch-triple",
            kind_json("PREPARE", edit(prep, epochs=[[1, 1, 1]])),
        ),
        (
            "PREPARE",
            "prepare-epoch-seq-0",
            kind_json("PREPARE", edit(prep, epochs=[[1, 0]])),
        ),
        (
            "PREPARE",
            "prepare-epoch-terms-equal",
            kind_json("PREPARE", edit(prep, epochs=[[1, 1], [1, 5]])),
        ),
        (
            "PREPARE",
            "prepare-epoch-seqs-equal",
            kind_json("PREPARE", edit(prep, epochs=[[1, 1], [2, 1]])),
        ),
        (
            "PREPARE",
            "prepare-epochs-not-from-1",
            kind_json("PREPARE", edit(prep, epochs=[[1, 2]])),
        ),
        (
            "PREPARE",
            "prepare-epoch-after-last",
            kind_json("PREPARE", edit(prep, last=39)),
        ),
        (
            "PREPARE",
            "prepare-last-no-epochs",
            kind_json("PREPARE", edit(prep, epochs=[])),
        ),
        (
            "PREPARE",
            "prepare-epoch-term-above",
            kind_json("PREPARE", edit(prep, epochs=[[9, 1]])),
        ),
        ("PROMISE", "promise-ok-int", kind_json("PROMISE", edit(prom, ok=1))),
        (
            "PROMISE",
            "promise-ok-other-term",
            kind_json("PROMISE", edit(prom, promised=9)),
        ),
        (
            "PROMISE",
            "promise-refusal-below",
            kind_json("PROMISE", edit(prom, ok=False, promised=7)),
        ),
        (
            "PROMISE",
            "promise-accepted-missing",
            kind_json("PROMISE", edit(prom, accepted=...)),
        ),
        (
            "PROMISE",
            "promise-accepted-list",
            kind_json("PROMISE", edit(prom, accepted=[7, ["n1"]])),
        ),
        (
            "PROMISE",
            "promise-accepted-extra-key",
            kind_json(
                "PROMISE",
                edit(prom, accepted={"term": 7, "members": ["n1"], "owner": "n1"}),
            ),
        ),
        (
            "PROMISE",
            "promise-accepted-above-promised",
            kind_json("PROMISE", edit(prom, accepted={"term": 9, "members": ["n1"]})),
        ),
        (
            "PROMISE",
            "promise-members-twice",
            kind_json(
                "PROMISE", edit(prom, accepted={"term": 7, "members": ["n1", "n1"]})
            ),
        ),
        (
            "PROMISE",
            "promise-member-empty",
            kind_json("PROMISE", edit(prom, accepted={"term": 7, "members": [""]})),
        ),
        (
            "PROMISE",
            "promise-commit-above",
            kind_json("PROMISE", edit(prom, commit=44)),
        ),
        (
            "PROMISE",
            "promise-promised-2-63",
            kind_json("PROMISE", edit(prom, ok=False, promised=big)),
        ),
        (
            "PROMISE",
            "promise-epoch-term-above",
            kind_json("PROMISE", edit(prom, epochs=[[3, 1], [9, 40]])),
        ),
        ("ACCEPT", "accept-members-empty", kind_json("ACCEPT", edit(acc, members=[]))),
        (
            "ACCEPT",
            "accept-members-twice",
            kind_json("ACCEPT", edit(acc, members=["n1", "n1"])),
        ),
        ("ACCEPT", "accept-member-int", kind_json("ACCEPT", edit(acc, members=[1]))),
        ("ACCEPT", "accept-term-0", kind_json("ACCEPT", edit(acc, term=0))),
        ("ACCEPT", "accept-term-2-63", kind_json("ACCEPT", edit(acc, term=big))),
        ("ACCEPT", "accept-wrong-kind", kind_json("ACCEPTED", acc)),
        ("ACCEPTED", "accepted-ok-string", kind_json("ACCEPTED", edit(accd, ok="1"))),
        (
            "ACCEPTED",
            "accepted-ok-other-term",
            kind_json("ACCEPTED", edit(accd, promised=9)),
        ),
        (
            "ACCEPTED",
            "accepted-refusal-below",
            kind_json("ACCEPTED", edit(accd, ok=False, promised=7)),
        ),
        ("ACCEPTED", "accepted-extra-key", kind_json("ACCEPTED", edit(accd, x=None))),
        (
            "ACCEPTED",
            "accepted-promised-2-63",
            kind_json("ACCEPTED", edit(accd, ok=False, promised=big)),
        ),
        ("LOG_REQUEST", "log-request-short", log_kind + bytes(19)),
        ("LOG_REQUEST", "log-request-long", log_kind + bytes(21)),
        ("LOG_REQUEST", "log-request-wrong-kind", own_kind + bytes(20)),
        (
            "LOG_REQUEST",
            "log-request-after-2-63",
            log_kind + u64(1) + u64(big) + u32(10),
        ),
        ("LOG_REPLY", "log-reply-head-cut", log_kind + head(1, 0, 0, 0)[:-1]),
        ("LOG_REPLY", "log-reply-request", log_kind + bytes(20)),
        ("LOG_REPLY", "log-reply-trailing", log_kind + head(1, 0, 0, 0) + b"\x00"),
        ("LOG_REPLY", "log-reply-seq-skips", log_kind + head(1, 1, 1, 1) + lrec(1, 3)),
        ("LOG_REPLY", "log-reply-term-above", log_kind + head(1, 0, 0, 1) + lrec(2, 1)),
        ("LOG_REPLY", "log-reply-wrong-kind", own_kind + head(1, 0, 0, 0)),
        ("LOG_REPLY", "log-reply-term-2-63", log_kind + head(big, 0, 0, 0)),
        ("OWN", "own-no-count", own_kind + bytes(3)),
        ("OWN", "own-count-high", own_kind + u32(2) + u64(1)),
        ("OWN", "own-trailing", own_kind + u32(1) + u64(1) + b"\x00"),
        ("OWN", "own-channel-twice", own_kind + u32(2) + u64(1) + u64(1)),
        ("OWN", "own-wrong-kind", log_kind + u32(0)),
        ("JSON", "json-array", b"[1]"),
        ("JSON", "json-string", b'"x"'),
        ("JSON", "json-cut", b'{"version": 1'),
        ("JSON", "json-not-utf8", b'{"a": "\xff"}'),
    ]
    return [{"op": op, "name": name, "body": body.hex()} for op, name, body in cases]


def build() -> dict[str, Any]:
    json_cases = json_bodies()
    for case in json_cases:
        case["body"] = case["body"].hex()
    return {
        "description": "Operation bodies of docs/protocol.md, built by hand from "
        "the document (not from plexichat.node.protocol)",
        "generator": "tests/vectors/generate_node.py",
        "message_types": MESSAGE_TYPES,
        "error_codes": ERROR_CODES,
        "handoff_kinds": HANDOFF_KINDS,
        "append_statuses": APPEND_STATUSES,
        "bodies": binary_bodies(),
        "json_bodies": json_cases,
        "bad": bad_bodies(),
    }


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check node.json")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
