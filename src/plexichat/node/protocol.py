"""Operation bodies of the PlexiChat protocol (docs/protocol.md, "Operations").

Hot-path bodies (SEND, ACK, REPLICATE, MESSAGES, DELIVER, RELAY) are fixed
``struct`` layouts, big-endian like the frame header.  Rare control bodies
(HELLO, WELCOME, STATS, GOSSIP, PING, PONG) are UTF-8 JSON objects.
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
REPLICA_RECORD: Final = struct.Struct(">QQ16sQQI")  # channel + MESSAGE_RECORD
REPLICATE_ACK_BODY: Final = struct.Struct(">II")  # received, inserted
HANDOFF_KIND: Final = struct.Struct(">B")
HANDOFF_SEQ: Final = struct.Struct(">BQQ")  # kind, channel, last sequence
RELAY_HEAD: Final = struct.Struct(">QQBBB")  # relay id, sent ns, ttl, fanout, root len
ERROR_HEAD: Final = struct.Struct(">H")
STATS_HEAD: Final = struct.Struct(">I")
HIST_NAME: Final = struct.Struct(">B")
HIST_BLOB: Final = struct.Struct(">I")


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


class HandoffKind(IntEnum):
    """First byte of a HANDOFF body."""

    DATA = 1  # records, answered with REPLICATE_ACK
    PULL = 2  # channel: ask for the sender's last sequence (answered with SEQ)
    SEQ = 3  # channel, last sequence
    DIGEST = 4  # channel, block size: ask for the receiver's block digests
    BLOCKS = 5  # channel, then (block, count, xor of message ids) per block


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
    for _ in range(count):
        if pos + size > len(body):
            raise ProtocolError("MESSAGES record truncated")
        seq, msg_id, sender, ts_us, length = unpack(body, pos)
        pos += size
        if pos + length > len(body):
            raise ProtocolError("MESSAGES payload truncated")
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
    return Record(channel, seq, msg_id, sender, ts_us, body[head:])


def encode_channel(channel: int) -> bytes:
    return CHANNEL_BODY.pack(channel)


def decode_channel(body: bytes) -> int:
    if len(body) != CHANNEL_BODY.size:
        raise ProtocolError(f"channel body of {len(body)} bytes != 8")
    (channel,) = CHANNEL_BODY.unpack(body)
    return int(channel)


# -- REPLICATE / HANDOFF -----------------------------------------------------


def encode_records(records: Iterable[Record], prefix: bytes = b"") -> bytes:
    """REPLICATE body (or HANDOFF DATA after *prefix*): count + full records."""
    parts = [prefix, b""]
    count = 0
    pack = REPLICA_RECORD.pack
    for r in records:
        parts.append(
            pack(r.channel, r.seq, r.msg_id, r.sender, r.ts_us, len(r.payload))
        )
        parts.append(r.payload)
        count += 1
    parts[1] = COUNT.pack(count)
    return b"".join(parts)


def decode_records(body: bytes, start: int = 0) -> list[Record]:
    """Inverse of :func:`encode_records` (records start at *start*)."""
    if len(body) < start + COUNT.size:
        raise ProtocolError("record list too short")
    (count,) = COUNT.unpack_from(body, start)
    pos = start + COUNT.size
    size = REPLICA_RECORD.size
    unpack = REPLICA_RECORD.unpack_from
    end = len(body)
    out: list[Record] = []
    for _ in range(count):
        if pos + size > end:
            raise ProtocolError("record truncated")
        channel, seq, msg_id, sender, ts_us, length = unpack(body, pos)
        pos += size
        stop = pos + length
        if stop > end:
            raise ProtocolError("record payload truncated")
        out.append(
            _tuple_new(Record, (channel, seq, msg_id, sender, ts_us, body[pos:stop], 0))
        )
        pos = stop
    if pos != end:
        raise ProtocolError("trailing bytes after records")
    return out


def encode_replicate_ack(received: int, inserted: int) -> bytes:
    return REPLICATE_ACK_BODY.pack(received, inserted)


def decode_replicate_ack(body: bytes) -> tuple[int, int]:
    if len(body) != REPLICATE_ACK_BODY.size:
        raise ProtocolError("REPLICATE_ACK body must be 8 bytes")
    received, inserted = REPLICATE_ACK_BODY.unpack(body)
    return received, inserted


def encode_handoff_data(records: Iterable[Record]) -> bytes:
    return encode_records(records, HANDOFF_KIND.pack(HandoffKind.DATA))


def encode_handoff_pull(channel: int) -> bytes:
    return HANDOFF_SEQ.pack(HandoffKind.PULL, channel, 0)


def encode_handoff_seq(channel: int, last_seq: int) -> bytes:
    return HANDOFF_SEQ.pack(HandoffKind.SEQ, channel, last_seq)


HANDOFF_BLOCKS_HEAD: Final = struct.Struct(">BQI")  # kind, channel, count
HANDOFF_BLOCK: Final = struct.Struct(">QIQQ")  # block, rows, xor hi, xor lo

# block index -> (rows, xor of the 128-bit message ids) of one channel
Digest = dict[int, tuple[int, int]]


def encode_handoff_digest(channel: int, block: int) -> bytes:
    return HANDOFF_SEQ.pack(HandoffKind.DIGEST, channel, block)


def encode_handoff_blocks(channel: int, digest: Digest) -> bytes:
    parts = [HANDOFF_BLOCKS_HEAD.pack(HandoffKind.BLOCKS, channel, len(digest))]
    mask = (1 << 64) - 1
    for block, (rows, xor) in sorted(digest.items()):
        parts.append(HANDOFF_BLOCK.pack(block, rows, xor >> 64, xor & mask))
    return b"".join(parts)


def decode_handoff_blocks(body: bytes) -> tuple[int, Digest]:
    """``(channel, digest)`` of a HANDOFF BLOCKS reply."""
    if len(body) < HANDOFF_BLOCKS_HEAD.size or body[0] != HandoffKind.BLOCKS:
        raise ProtocolError("not a HANDOFF BLOCKS body")
    _, channel, count = HANDOFF_BLOCKS_HEAD.unpack_from(body)
    if len(body) != HANDOFF_BLOCKS_HEAD.size + count * HANDOFF_BLOCK.size:
        raise ProtocolError(f"HANDOFF BLOCKS body of {len(body)} bytes for {count}")
    digest: Digest = {}
    for i in range(count):
        offset = HANDOFF_BLOCKS_HEAD.size + i * HANDOFF_BLOCK.size
        block, rows, hi, lo = HANDOFF_BLOCK.unpack_from(body, offset)
        digest[block] = (rows, (hi << 64) | lo)
    return channel, digest


def decode_handoff(body: bytes) -> tuple[HandoffKind, int, int, list[Record]]:
    """``(kind, channel, last_seq, records)``; unused fields are 0 / empty."""
    if not body:
        raise ProtocolError("empty HANDOFF body")
    try:
        kind = HandoffKind(body[0])
    except ValueError:
        raise ProtocolError(f"unknown HANDOFF kind {body[0]}") from None
    if kind is HandoffKind.DATA:
        return kind, 0, 0, decode_records(body, 1)
    if len(body) != HANDOFF_SEQ.size:
        raise ProtocolError("HANDOFF PULL/SEQ/DIGEST body must be 17 bytes")
    _, channel, last_seq = HANDOFF_SEQ.unpack(body)
    return kind, channel, last_seq, []


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
