"""Operation bodies of the PlexiChat protocol (docs/protocol.md, "Operations").

Hot-path bodies (SEND, ACK, MESSAGES, DELIVER, RELAY) are fixed ``struct``
layouts, big-endian like the frame header.  Rare control bodies (HELLO,
WELCOME, STATS, GOSSIP, PING, PONG) are UTF-8 JSON objects.  The peer-only
bodies of channel order (REPLICATE's APPEND sections, LOG, OWN and the JSON
HANDOFF kinds) are in :mod:`plexichat.node.peer_protocol`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, NamedTuple

PROTOCOL_VERSION: Final = 1
MSG_ID_SIZE: Final = 16

SEND_HEAD: Final = struct.Struct(">Q16sQ")  # channel, message id, sender
ACK_BODY: Final = struct.Struct(">QQ")  # channel, sequence
FETCH_BODY: Final = struct.Struct(">QQI")  # channel, after sequence, limit
MESSAGES_HEAD: Final = struct.Struct(">QIB")  # channel, count, more
MESSAGE_RECORD: Final = struct.Struct(">Q16sQQI")  # seq, id, sender, ts_us, len
CHANNEL_BODY: Final = struct.Struct(">Q")  # SUBSCRIBE, DELIVER head
COUNT: Final = struct.Struct(">I")
HANDOFF_KIND: Final = struct.Struct(">B")
RELAY_HEAD: Final = struct.Struct(">QQBBB")  # relay id, sent ns, ttl, fanout, root len
ERROR_HEAD: Final = struct.Struct(">H")
STATS_HEAD: Final = struct.Struct(">I")
HIST_NAME: Final = struct.Struct(">B")
HIST_BLOB: Final = struct.Struct(">I")

# Decode ranges (docs/protocol.md, "Operations": "Value ranges").  Every u64
# field that the node stores or compares as a number other than an id (seq,
# after, term, prev_term, prev_seq, commit, ts_us, promised, match, and the
# integers of the HANDOFF JSON bodies) is below 2**63: SQLite stores signed
# 64-bit integers.  Channel, sender and relay ids use all 64 bits (the store
# maps ids to signed integers and back).  A decoder checks a value v of such
# a field with one comparison, ``v >= SEQ_END``, and several at once with
# ``(a | b | c) >= SEQ_END`` (the bitwise or of non-negative integers is at
# least 2**63 exactly when one of them is).
SEQ_END: Final = 1 << 63


class ErrorCode(IntEnum):
    """``code`` field of an ERROR body."""

    BAD_VERSION = 1
    MALFORMED = 2  # a body that does not parse, or a frame that fails to decode
    UNKNOWN_OP = 3  # a frame type the node does not accept from this peer
    TOO_LARGE = 4  # message payload above the node's limit
    UNAVAILABLE = 5  # fewer alive nodes than the replication factor
    TIMEOUT = 6  # replica or owner did not answer in time; a read stalled
    NOT_OWNER = 7  # a forwarded SEND reached a node that does not own the channel
    INTERNAL = 8
    SHUTTING_DOWN = 9
    UNAUTHENTICATED = 10  # no credentials, or credentials that do not verify
    FORBIDDEN = 11  # authenticated, but not allowed this operation or value


class HandoffKind(IntEnum):
    """First byte of a HANDOFF body.

    Channel order (terms, issue 11; docs/protocol.md "Channel order between
    peers (terms)").  Kinds 1 .. 5 (DATA, PULL, SEQ, DIGEST, BLOCKS: the
    handoff of the node before terms) are retired:
    :func:`plexichat.node.peer_protocol.handoff_kind` rejects them like any
    unknown kind.
    """

    PREPARE = 6  # JSON: candidate -> every cluster member
    PROMISE = 7  # JSON: reply to PREPARE
    ACCEPT = 8  # JSON: candidate -> every cluster member
    ACCEPTED = 9  # JSON: reply to ACCEPT
    LOG = 10  # request: channel, after, limit; reply: one APPEND section
    OWN = 11  # channel ids the receiver now owns (hint); reply: an empty OWN


class Record(NamedTuple):
    """One stored chat message."""

    channel: int
    seq: int
    msg_id: bytes
    sender: int
    ts_us: int
    payload: bytes
    term: int = 0  # ownership term of the owner that numbered it (0: unknown)


def make_record(fields: tuple[int, int, bytes, int, int, bytes, int]) -> Record:
    """``Record(*fields)`` without the Python-level ``__new__`` (hot paths)."""
    return _tuple_new(Record, fields)


_tuple_new = tuple.__new__


class ProtocolError(ValueError):
    """A body that does not match its layout."""


def message_id(sender: int, counter: int) -> bytes:
    """The conventional 16-byte message id: sender (u64) then counter (u64)."""
    return struct.pack(">QQ", sender, counter)


def split_message_id(msg_id: bytes) -> tuple[int, int]:
    """Inverse of :func:`message_id`."""
    sender, counter = struct.unpack(">QQ", msg_id)
    return int(sender), int(counter)


# -- SEND / ACK --------------------------------------------------------------


def encode_send(channel: int, msg_id: bytes, sender: int, payload: bytes) -> bytes:
    """SEND body."""
    return SEND_HEAD.pack(channel, msg_id, sender) + payload


def decode_send(body: bytes) -> tuple[int, bytes, int, bytes]:
    """``(channel, msg_id, sender, payload)`` of a SEND body."""
    if len(body) < SEND_HEAD.size:
        raise ProtocolError(f"SEND body of {len(body)} bytes < {SEND_HEAD.size}")
    channel, msg_id, sender = SEND_HEAD.unpack_from(body)
    return channel, msg_id, sender, body[SEND_HEAD.size :]


def encode_ack(channel: int, seq: int) -> bytes:
    return ACK_BODY.pack(channel, seq)


def decode_ack(body: bytes) -> tuple[int, int]:
    if len(body) != ACK_BODY.size:
        raise ProtocolError(f"ACK body of {len(body)} bytes != {ACK_BODY.size}")
    channel, seq = ACK_BODY.unpack(body)
    return channel, seq


# -- FETCH / MESSAGES / DELIVER ---------------------------------------------


def encode_fetch(channel: int, after: int, limit: int) -> bytes:
    return FETCH_BODY.pack(channel, after, limit)


def decode_fetch(body: bytes) -> tuple[int, int, int]:
    if len(body) != FETCH_BODY.size:
        raise ProtocolError(f"FETCH body of {len(body)} bytes != {FETCH_BODY.size}")
    channel, after, limit = FETCH_BODY.unpack(body)
    if after >= SEQ_END:
        raise ProtocolError(f"FETCH after {after} is not below 2**63")
    return channel, after, limit


def encode_messages(channel: int, records: Iterable[Record], more: bool) -> bytes:
    """MESSAGES body: head then ``MESSAGE_RECORD`` + payload per record."""
    parts = [b""]
    count = 0
    pack = MESSAGE_RECORD.pack
    for r in records:
        parts.append(pack(r.seq, r.msg_id, r.sender, r.ts_us, len(r.payload)))
        parts.append(r.payload)
        count += 1
    parts[0] = MESSAGES_HEAD.pack(channel, count, 1 if more else 0)
    return b"".join(parts)


def decode_messages(body: bytes) -> tuple[int, list[Record], bool]:
    """``(channel, records, more)`` of a MESSAGES body."""
    if len(body) < MESSAGES_HEAD.size:
        raise ProtocolError("MESSAGES body too short")
    channel, count, more = MESSAGES_HEAD.unpack_from(body)
    pos = MESSAGES_HEAD.size
    out: list[Record] = []
    size = MESSAGE_RECORD.size
    unpack = MESSAGE_RECORD.unpack_from
    top = SEQ_END
    for _ in range(count):
        if pos + size > len(body):
            raise ProtocolError("MESSAGES record truncated")
        seq, msg_id, sender, ts_us, length = unpack(body, pos)
        pos += size
        if pos + length > len(body):
            raise ProtocolError("MESSAGES payload truncated")
        if (seq | ts_us) >= top:
            raise ProtocolError(f"MESSAGES record {seq}: seq or ts_us not below 2**63")
        out.append(
            _tuple_new(
                Record,
                (channel, seq, msg_id, sender, ts_us, body[pos : pos + length], 0),
            )
        )
        pos += length
    if pos != len(body):
        raise ProtocolError("trailing bytes after MESSAGES records")
    return channel, out, bool(more)


def encode_deliver(record: Record) -> bytes:
    r = record
    return (
        CHANNEL_BODY.pack(r.channel)
        + MESSAGE_RECORD.pack(r.seq, r.msg_id, r.sender, r.ts_us, len(r.payload))
        + r.payload
    )


def decode_deliver(body: bytes) -> Record:
    head = CHANNEL_BODY.size + MESSAGE_RECORD.size
    if len(body) < head:
        raise ProtocolError("DELIVER body too short")
    (channel,) = CHANNEL_BODY.unpack_from(body)
    seq, msg_id, sender, ts_us, length = MESSAGE_RECORD.unpack_from(
        body, CHANNEL_BODY.size
    )
    if len(body) != head + length:
        raise ProtocolError("DELIVER payload length mismatch")
    if (seq | ts_us) >= SEQ_END:
        raise ProtocolError(f"DELIVER record {seq}: seq or ts_us not below 2**63")
    return Record(channel, seq, msg_id, sender, ts_us, body[head:])


def encode_channel(channel: int) -> bytes:
    return CHANNEL_BODY.pack(channel)


def decode_channel(body: bytes) -> int:
    if len(body) != CHANNEL_BODY.size:
        raise ProtocolError(f"channel body of {len(body)} bytes != 8")
    (channel,) = CHANNEL_BODY.unpack(body)
    return int(channel)


# -- RELAY -------------------------------------------------------------------


@dataclass(frozen=True)
class Relay:
    """A P2P relay message (see docs/protocol.md)."""

    relay_id: int
    sent_ns: int
    ttl: int
    fanout: int
    root: str
    payload: bytes


def encode_relay(relay: Relay) -> bytes:
    root = relay.root.encode()
    if len(root) > 255:
        raise ValueError("relay root id longer than 255 bytes")
    head = RELAY_HEAD.pack(
        relay.relay_id, relay.sent_ns, relay.ttl, relay.fanout, len(root)
    )
    return head + root + relay.payload


def decode_relay(body: bytes) -> Relay:
    if len(body) < RELAY_HEAD.size:
        raise ProtocolError("RELAY body too short")
    relay_id, sent_ns, ttl, fanout, root_len = RELAY_HEAD.unpack_from(body)
    stop = RELAY_HEAD.size + root_len
    if len(body) < stop:
        raise ProtocolError("RELAY root truncated")
    try:
        root = body[RELAY_HEAD.size : stop].decode()
    except UnicodeDecodeError:
        raise ProtocolError("RELAY root is not UTF-8") from None
    return Relay(relay_id, sent_ns, ttl, fanout, root, body[stop:])


# -- ERROR -------------------------------------------------------------------


def encode_error(code: int, message: str) -> bytes:
    return ERROR_HEAD.pack(code) + message.encode("utf-8", "replace")[:4096]


def decode_error(body: bytes) -> tuple[int, str]:
    if len(body) < ERROR_HEAD.size:
        raise ProtocolError("ERROR body too short")
    (code,) = ERROR_HEAD.unpack_from(body)
    return code, body[ERROR_HEAD.size :].decode("utf-8", "replace")


# -- JSON control bodies -----------------------------------------------------


def encode_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"bad JSON body: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON body must be an object")
    return obj


# -- STATS_REPLY -------------------------------------------------------------


def encode_stats_reply(
    info: Mapping[str, Any], histograms: Mapping[str, bytes]
) -> bytes:
    """JSON section then named ``Histogram.to_bytes`` blobs."""
    doc = encode_json(info)
    parts = [STATS_HEAD.pack(len(doc)), doc]
    for name, blob in histograms.items():
        raw = name.encode()
        parts += [HIST_NAME.pack(len(raw)), raw, HIST_BLOB.pack(len(blob)), blob]
    return b"".join(parts)


def decode_stats_reply(body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    if len(body) < STATS_HEAD.size:
        raise ProtocolError("STATS_REPLY too short")
    (size,) = STATS_HEAD.unpack_from(body)
    pos = STATS_HEAD.size + size
    if pos > len(body):
        raise ProtocolError("STATS_REPLY JSON truncated")
    info = decode_json(body[STATS_HEAD.size : pos])
    hists: dict[str, bytes] = {}
    for name, blob in _iter_blobs(body, pos):
        hists[name] = blob
    return info, hists


def _iter_blobs(body: bytes, pos: int) -> Iterator[tuple[str, bytes]]:
    end = len(body)
    while pos < end:
        if pos + HIST_NAME.size > end:
            raise ProtocolError("STATS_REPLY histogram name truncated")
        (n,) = HIST_NAME.unpack_from(body, pos)
        pos += HIST_NAME.size
        name = body[pos : pos + n].decode("utf-8", "replace")
        pos += n
        if pos + HIST_BLOB.size > end:
            raise ProtocolError("STATS_REPLY histogram size truncated")
        (m,) = HIST_BLOB.unpack_from(body, pos)
        pos += HIST_BLOB.size
        if pos + m > end:
            raise ProtocolError("STATS_REPLY histogram truncated")
        yield name, body[pos : pos + m]
        pos += m
