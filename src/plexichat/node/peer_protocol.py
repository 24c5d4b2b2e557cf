"""Peer-only bodies of channel order (docs/protocol.md, "Channel order between
peers (terms)"): APPEND sections and results (the REPLICATE and REPLICATE_ACK
bodies), the LOG request and reply, OWN, and the JSON bodies of HANDOFF
PREPARE, PROMISE, ACCEPT and ACCEPTED.  The model is
:mod:`plexichat.node.ownership` (docs/design/channel-order.md).

Encoders do not validate (the receiver's decoder does); decoders reject every
body that breaks the layout or an invariant the spec states.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, NamedTuple, NoReturn

from plexichat.node.protocol import (
    COUNT,
    HANDOFF_KIND,
    SEQ_END,
    HandoffKind,
    ProtocolError,
    Record,
    _tuple_new,
    encode_json,
)

APPEND_HEAD: Final = struct.Struct(">QQQQQI")
LOG_RECORD: Final = struct.Struct(">QQ16sQQI")  # term, seq, id, sender, ts_us, len
APPEND_RESULT: Final = struct.Struct(">QBQQ")  # channel, status, promised, match
LOG_REQUEST: Final = struct.Struct(">BQQI")  # kind, channel, after, limit
OWN_HEAD: Final = struct.Struct(">BI")  # kind, count (then count u64 channels)
U64: Final = struct.Struct(">Q")
U64_END: Final = 1 << 64

Epochs = tuple[tuple[int, int], ...]
"""Epoch boundaries of a log: ``(term, first seq of that term)``, increasing."""


class AppendSection(NamedTuple):
    """One channel's part of an APPEND (REPLICATE) body or of a LOG reply."""

    channel: int
    term: int  # the sender's (owner's or candidate's) term
    prev_term: int  # term of the record at prev_seq in the sender's log
    prev_seq: int  # records follow this seq (prev_term is 0 when prev_seq is 0)
    commit: int  # the sender's commit for this channel
    records: tuple[Record, ...]  # seqs prev_seq + 1, prev_seq + 2, ...


class AppendStatus(IntEnum):
    """``status`` of an APPEND result."""

    OK = 0  # the replica's log matches the sender's up to `match`
    REFUSED = 1  # the replica promised a higher term (or this term to another)
    MISMATCH = 2  # the replica does not hold prev (term, seq)
    FAILED = 3  # the replica could not store the records (storage error)


class AppendResult(NamedTuple):
    """A replica's answer to one APPEND section (``match`` is 0 unless OK)."""

    channel: int
    status: AppendStatus
    promised: int  # the replica's promised term
    match: int  # OK: the replica's log equals the sender's up to this seq


@dataclass(frozen=True, slots=True)
class Prepare:
    """HANDOFF PREPARE: candidate -> every cluster member."""

    channel: int
    term: int
    epochs: Epochs  # the candidate's log
    last: int  # the candidate's last seq


@dataclass(frozen=True, slots=True)
class AcceptedConfig:
    """The config a node accepted last: its term and members, owner first."""

    term: int
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PromiseMsg:
    """HANDOFF PROMISE: the reply to PREPARE (``ok`` False: a refusal)."""

    channel: int
    term: int  # the PREPARE's term
    ok: bool
    promised: int  # the replier's promised term (== term when ok)
    accepted: AcceptedConfig | None
    epochs: Epochs  # the replier's log
    last: int
    commit: int


@dataclass(frozen=True, slots=True)
class AcceptMsg:
    """HANDOFF ACCEPT: candidate -> every cluster member."""

    channel: int
    term: int
    members: tuple[str, ...]  # owner first


@dataclass(frozen=True, slots=True)
class AcceptedMsg:
    """HANDOFF ACCEPTED: the reply to ACCEPT (``ok`` False: a refusal)."""

    channel: int
    term: int
    ok: bool
    promised: int


@dataclass(frozen=True, slots=True)
class LogRequest:
    """HANDOFF LOG request: the records with seq > *after*, at most *limit*."""

    channel: int
    after: int
    limit: int


def handoff_kind(body: bytes) -> HandoffKind:
    """The kind of a HANDOFF body (its first byte)."""
    if not body:
        raise ProtocolError("empty HANDOFF body")
    try:
        return HandoffKind(body[0])
    except ValueError:
        raise ProtocolError(f"unknown HANDOFF kind {body[0]}") from None


def _expect_kind(body: bytes, kind: HandoffKind) -> None:
    got = handoff_kind(body)
    if got is not kind:
        raise ProtocolError(f"HANDOFF {got.name} body where {kind.name} was expected")


# -- APPEND sections (REPLICATE, LOG reply) and results (REPLICATE_ACK) --------

_pack_append_head = APPEND_HEAD.pack
_pack_log_record = LOG_RECORD.pack
_unpack_append_head = APPEND_HEAD.unpack_from
_unpack_log_record = LOG_RECORD.unpack_from


def _add_section(parts: list[bytes], s: AppendSection) -> None:
    records = s.records
    append = parts.append
    pack = _pack_log_record
    append(
        _pack_append_head(
            s.channel, s.term, s.prev_term, s.prev_seq, s.commit, len(records)
        )
    )
    for _channel, seq, msg_id, sender, ts_us, payload, term in records:
        append(pack(term, seq, msg_id, sender, ts_us, len(payload)))
        append(payload)


def add_append_section(
    parts: list[bytes],
    channel: int,
    term: int,
    prev_term: int,
    prev_seq: int,
    commit: int,
    records: Sequence[Record],
) -> int:
    """Append one APPEND section's bytes to *parts* (an :func:`encode_append`
    without the section objects, for the write path); returns their size."""
    append = parts.append
    pack = _pack_log_record
    append(_pack_append_head(channel, term, prev_term, prev_seq, commit, len(records)))
    size = APPEND_HEAD.size + LOG_RECORD.size * len(records)
    for _channel, seq, msg_id, sender, ts_us, payload, rec_term in records:
        append(pack(rec_term, seq, msg_id, sender, ts_us, len(payload)))
        append(payload)
        size += len(payload)
    return size


def join_append(parts: list[bytes], count: int) -> bytes:
    """The APPEND body of *count* sections added to *parts* after its first
    item (kept free for the count)."""
    parts[0] = COUNT.pack(count)
    return b"".join(parts)


def encode_append(sections: Iterable[AppendSection]) -> bytes:
    """APPEND body (REPLICATE): count u32, then each section's head and records.

    ``Record.channel`` is not sent (the section's channel is).
    """
    parts = [b""]
    count = 0
    for s in sections:
        _add_section(parts, s)
        count += 1
    parts[0] = COUNT.pack(count)
    return b"".join(parts)


def _read_section(body: bytes, pos: int, what: str) -> tuple[AppendSection, int]:
    """The section at *pos* and the position after it."""
    end = len(body)
    if pos + APPEND_HEAD.size > end:
        raise ProtocolError(f"{what} section head truncated")
    channel, term, prev_term, prev_seq, commit, count = _unpack_append_head(body, pos)
    pos += APPEND_HEAD.size
    if (prev_seq == 0 and prev_term != 0) or prev_term > term:
        where = f"{what} channel {channel}"
        if prev_term > term:
            raise ProtocolError(f"{where}: prev_term {prev_term} above term {term}")
        raise ProtocolError(f"{where}: prev_term {prev_term} with prev_seq 0")
    size = LOG_RECORD.size
    if count > (end - pos) // size:
        raise ProtocolError(
            f"{what} channel {channel}: record count {count} runs past the end"
        )
    # ranges: prev_term <= term (above), record terms <= term and record
    # seqs <= prev_seq + count (below): one comparison covers them all
    if (term | commit | (prev_seq + count)) >= SEQ_END:
        raise ProtocolError(
            f"{what} channel {channel}: term {term}, commit {commit} or the seqs "
            f"after {prev_seq} (count {count}) not below 2**63"
        )
    unpack = _unpack_log_record
    new = _tuple_new
    top = SEQ_END
    records: list[Record] = []
    last_term = prev_term
    want = prev_seq
    for _ in range(count):
        if pos + size > end:
            raise ProtocolError(f"{what} channel {channel}: record truncated")
        rec_term, seq, msg_id, sender, ts_us, length = unpack(body, pos)
        pos += size
        stop = pos + length
        want += 1
        if (
            stop > end
            or seq != want
            or rec_term > term
            or rec_term < last_term
            or ts_us >= top
        ):
            _bad_record(what, channel, term, prev_seq, last_term, want, stop > end,
                        seq, rec_term, ts_us)  # fmt: skip
        last_term = rec_term
        records.append(
            new(Record, (channel, seq, msg_id, sender, ts_us, body[pos:stop], rec_term))
        )
        pos = stop
    head = (channel, term, prev_term, prev_seq, commit, tuple(records))
    return new(AppendSection, head), pos


def _bad_record(
    what: str,
    channel: int,
    term: int,
    prev_seq: int,
    last_term: int,
    want: int,
    truncated: bool,
    seq: int,
    rec_term: int,
    ts_us: int,
) -> NoReturn:
    where = f"{what} channel {channel}"
    if truncated:
        raise ProtocolError(f"{where}: record payload truncated")
    if ts_us >= SEQ_END:
        raise ProtocolError(f"{where}: record {seq} has ts_us {ts_us} >= 2**63")
    if seq != want:
        raise ProtocolError(f"{where}: record seq {seq} where {want} was due")
    if rec_term > term:
        raise ProtocolError(f"{where}: record term {rec_term} above term {term}")
    before = "prev_term" if seq == prev_seq + 1 else "the previous record's"
    raise ProtocolError(
        f"{where}: record {seq} has term {rec_term} below {before} {last_term}"
    )


def decode_append(body: bytes) -> list[AppendSection]:
    """Inverse of :func:`encode_append` (at most one section per channel)."""
    if len(body) < COUNT.size:
        raise ProtocolError(f"APPEND body of {len(body)} bytes has no count")
    (count,) = COUNT.unpack_from(body)
    pos = COUNT.size
    if count > (len(body) - pos) // APPEND_HEAD.size:
        raise ProtocolError(f"APPEND: section count {count} runs past the end")
    out: list[AppendSection] = []
    seen: set[int] = set()
    for _ in range(count):
        section, pos = _read_section(body, pos, "APPEND")
        if section.channel in seen:
            raise ProtocolError(f"APPEND: two sections for channel {section.channel}")
        seen.add(section.channel)
        out.append(section)
    if pos != len(body):
        raise ProtocolError("trailing bytes after APPEND sections")
    return out


def encode_append_results(results: Iterable[AppendResult]) -> bytes:
    """APPEND results body (REPLICATE_ACK): count u32, then 25 bytes each."""
    pack = APPEND_RESULT.pack
    parts = [b""]
    parts += [pack(*r) for r in results]  # channel, status, promised, match
    parts[0] = COUNT.pack(len(parts) - 1)
    return b"".join(parts)


_STATUSES: Final = {int(s): s for s in AppendStatus}


def decode_append_results(body: bytes) -> list[AppendResult]:
    """Inverse of :func:`encode_append_results`."""
    if len(body) < COUNT.size:
        raise ProtocolError(f"APPEND results body of {len(body)} bytes has no count")
    (count,) = COUNT.unpack_from(body)
    size = APPEND_RESULT.size
    if len(body) != COUNT.size + count * size:
        raise ProtocolError(
            f"APPEND results body of {len(body)} bytes for count {count} "
            f"(want {COUNT.size + count * size})"
        )
    out: list[AppendResult] = []
    seen: set[int] = set()
    statuses = _STATUSES
    for channel, raw, promised, match in APPEND_RESULT.iter_unpack(body[COUNT.size :]):
        status = statuses.get(raw)
        if status is None:
            raise ProtocolError(
                f"APPEND result of channel {channel}: unknown status {raw}"
            )
        if match and status is not AppendStatus.OK:
            raise ProtocolError(
                f"APPEND result of channel {channel}: match {match} with {status.name}"
            )
        if (promised | match) >= SEQ_END:
            raise ProtocolError(
                f"APPEND result of channel {channel}: promised {promised} or "
                f"match {match} not below 2**63"
            )
        if channel in seen:
            raise ProtocolError(f"APPEND results: two results for channel {channel}")
        seen.add(channel)
        out.append(_tuple_new(AppendResult, (channel, status, promised, match)))
    return out


# -- HANDOFF LOG and OWN -------------------------------------------------------


def encode_log_request(req: LogRequest) -> bytes:
    """HANDOFF LOG request, 21 bytes."""
    return LOG_REQUEST.pack(HandoffKind.LOG, req.channel, req.after, req.limit)


def decode_log_request(body: bytes) -> LogRequest:
    _expect_kind(body, HandoffKind.LOG)
    if len(body) != LOG_REQUEST.size:
        raise ProtocolError(
            f"HANDOFF LOG request of {len(body)} bytes != {LOG_REQUEST.size}"
        )
    _, channel, after, limit = LOG_REQUEST.unpack(body)
    if after >= SEQ_END:
        raise ProtocolError(f"HANDOFF LOG request: after {after} is not below 2**63")
    return LogRequest(channel, after, limit)


def encode_log_reply(section: AppendSection) -> bytes:
    """HANDOFF LOG reply: the kind byte then one APPEND section."""
    parts = [HANDOFF_KIND.pack(HandoffKind.LOG)]
    _add_section(parts, section)
    return b"".join(parts)


def decode_log_reply(body: bytes) -> AppendSection:
    _expect_kind(body, HandoffKind.LOG)
    section, pos = _read_section(body, HANDOFF_KIND.size, "HANDOFF LOG reply")
    if pos != len(body):
        raise ProtocolError("trailing bytes after the HANDOFF LOG reply's section")
    return section


def encode_own(channels: Iterable[int]) -> bytes:
    """HANDOFF OWN: the channels the receiver owns now (none: the ack)."""
    ids = [U64.pack(c) for c in channels]
    return OWN_HEAD.pack(HandoffKind.OWN, len(ids)) + b"".join(ids)


def decode_own(body: bytes) -> tuple[int, ...]:
    _expect_kind(body, HandoffKind.OWN)
    if len(body) < OWN_HEAD.size:
        raise ProtocolError(f"HANDOFF OWN body of {len(body)} bytes has no count")
    _, count = OWN_HEAD.unpack_from(body)
    if len(body) != OWN_HEAD.size + count * U64.size:
        raise ProtocolError(f"HANDOFF OWN body of {len(body)} bytes for count {count}")
    channels = tuple(c for (c,) in U64.iter_unpack(body[OWN_HEAD.size :]))
    if len(set(channels)) != len(channels):
        raise ProtocolError("HANDOFF OWN names a channel twice")
    return channels


# -- HANDOFF PREPARE / PROMISE / ACCEPT / ACCEPTED (JSON) ----------------------


def _encode_kind_json(kind: HandoffKind, obj: Mapping[str, Any]) -> bytes:
    return HANDOFF_KIND.pack(kind) + encode_json(obj)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ProtocolError("a JSON object repeats a key")
    return obj


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Checked access to the JSON object of one HANDOFF body."""

    def __init__(self, body: bytes, kind: HandoffKind, keys: frozenset[str]) -> None:
        _expect_kind(body, kind)
        self.what = f"HANDOFF {kind.name}"
        try:
            obj = json.loads(body[1:].decode(), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ProtocolError(f"{self.what}: bad JSON: {exc}") from None
        except ProtocolError as exc:
            raise ProtocolError(f"{self.what}: {exc}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"{self.what}: JSON body must be an object")
        problems = []
        if missing := keys - obj.keys():
            problems.append(f"missing keys {sorted(missing)}")
        if extra := obj.keys() - keys:
            problems.append(f"unknown keys {sorted(extra)}")
        if problems:
            raise ProtocolError(f"{self.what}: {', '.join(problems)}")
        self.obj: dict[str, Any] = obj

    def fail(self, message: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: {message}")

    def uint(self, name: str, value: object, low: int = 0, end: int = SEQ_END) -> int:
        """*value* as an integer in ``low .. end - 1`` (not a bool): below
        2**63 (a term, a seq) unless *end* says otherwise."""
        if type(value) is not int or not low <= value < end:
            top = "2**64-1" if end == U64_END else "2**63-1"
            wanted = f"an integer in {low} .. {top}"
            raise self.fail(f"{name} must be {wanted}: {_show(value)}")
        return value

    def int_key(self, key: str, low: int = 0) -> int:
        return self.uint(key, self.obj[key], low)

    def channel(self) -> int:
        """The ``channel`` key: a u64 id (all 64 bits)."""
        return self.uint("channel", self.obj["channel"], 0, U64_END)

    def flag(self, key: str) -> bool:
        value = self.obj[key]
        if type(value) is not bool:
            raise self.fail(f"{key} must be true or false: {_show(value)}")
        return value

    def members(self, name: str, value: object) -> tuple[str, ...]:
        """A non-empty list of distinct non-empty strings."""
        if type(value) is not list or not value:
            raise self.fail(f"{name} must be a non-empty list: {_show(value)}")
        for m in value:
            if type(m) is not str or not m:
                raise self.fail(f"{name} must hold non-empty strings: {_show(m)}")
        if len(set(value)) != len(value):
            raise self.fail(f"{name} names a member twice: {_show(value)}")
        return tuple(value)

    def epochs(self, top: int, top_name: str) -> tuple[Epochs, int]:
        """``(epochs, last)``: the epochs of seqs ``1 .. last``, terms <= *top*."""
        value = self.obj["epochs"]
        if type(value) is not list:
            raise self.fail(f"epochs must be a list: {_show(value)}")
        out: list[tuple[int, int]] = []
        for e in value:
            if type(e) is not list or len(e) != 2:
                raise self.fail(f"epochs entries must be [term, first_seq]: {_show(e)}")
            term = self.uint("an epoch's term", e[0])
            first = self.uint("an epoch's first seq", e[1], 1)
            if out and (term <= out[-1][0] or first <= out[-1][1]):
                raise self.fail(f"epochs must strictly increase: {_show(value)}")
            out.append((term, first))
        last = self.int_key("last")
        if not out and last:
            raise self.fail(f"last {last} with no epochs")
        if out and (out[0][1] != 1 or out[-1][1] > last):
            raise self.fail(f"epochs {_show(value)} do not start seqs 1 .. {last}")
        if out and out[-1][0] > top:
            raise self.fail(f"epochs hold term {out[-1][0]} above {top_name} {top}")
        return tuple(out), last

    def answer(self, term: int, ok: bool) -> int:
        """``promised`` of a reply: the term itself when ok, else not below it."""
        promised = self.int_key("promised")
        if ok and promised != term:
            raise self.fail(f"ok with promised {promised} != term {term}")
        if not ok and promised < term:
            raise self.fail(f"refusal with promised {promised} below term {term}")
        return promised


_PREPARE_KEYS: Final = frozenset({"channel", "term", "epochs", "last"})
_PROMISE_KEYS: Final = frozenset(
    {"channel", "term", "ok", "promised", "accepted", "epochs", "last", "commit"}
)
_ACCEPT_KEYS: Final = frozenset({"channel", "term", "members"})
_ACCEPTED_KEYS: Final = frozenset({"channel", "term", "ok", "promised"})
_CONFIG_KEYS: Final = frozenset({"term", "members"})


def _epochs_json(epochs: Epochs) -> list[list[int]]:
    return [[term, first] for term, first in epochs]


def encode_prepare(msg: Prepare) -> bytes:
    return _encode_kind_json(
        HandoffKind.PREPARE,
        {
            "channel": msg.channel,
            "term": msg.term,
            "epochs": _epochs_json(msg.epochs),
            "last": msg.last,
        },
    )


def decode_prepare(body: bytes) -> Prepare:
    f = _Fields(body, HandoffKind.PREPARE, _PREPARE_KEYS)
    term = f.int_key("term", 1)
    epochs, last = f.epochs(term, "term")
    return Prepare(f.channel(), term, epochs, last)


def encode_promise(msg: PromiseMsg) -> bytes:
    acc = msg.accepted
    return _encode_kind_json(
        HandoffKind.PROMISE,
        {
            "channel": msg.channel,
            "term": msg.term,
            "ok": msg.ok,
            "promised": msg.promised,
            "accepted": None
            if acc is None
            else {"term": acc.term, "members": list(acc.members)},
            "epochs": _epochs_json(msg.epochs),
            "last": msg.last,
            "commit": msg.commit,
        },
    )


def decode_promise(body: bytes) -> PromiseMsg:
    f = _Fields(body, HandoffKind.PROMISE, _PROMISE_KEYS)
    term = f.int_key("term", 1)
    ok = f.flag("ok")
    promised = f.answer(term, ok)
    raw = f.obj["accepted"]
    accepted: AcceptedConfig | None = None
    if raw is not None:
        if type(raw) is not dict or raw.keys() != _CONFIG_KEYS:
            raise f.fail(f"accepted must be null or {{term, members}}: {_show(raw)}")
        acc_term = f.uint("accepted term", raw["term"], 1)
        if acc_term > promised:
            raise f.fail(f"accepted term {acc_term} above promised {promised}")
        accepted = AcceptedConfig(
            acc_term, f.members("accepted members", raw["members"])
        )
    epochs, last = f.epochs(promised, "promised")
    commit = f.int_key("commit")
    if commit > last:
        raise f.fail(f"commit {commit} above last {last}")
    return PromiseMsg(f.channel(), term, ok, promised, accepted, epochs, last, commit)


def encode_accept(msg: AcceptMsg) -> bytes:
    return _encode_kind_json(
        HandoffKind.ACCEPT,
        {"channel": msg.channel, "term": msg.term, "members": list(msg.members)},
    )


def decode_accept(body: bytes) -> AcceptMsg:
    f = _Fields(body, HandoffKind.ACCEPT, _ACCEPT_KEYS)
    term = f.int_key("term", 1)
    return AcceptMsg(f.channel(), term, f.members("members", f.obj["members"]))


def encode_accepted(msg: AcceptedMsg) -> bytes:
    return _encode_kind_json(
        HandoffKind.ACCEPTED,
        {
            "channel": msg.channel,
            "term": msg.term,
            "ok": msg.ok,
            "promised": msg.promised,
        },
    )


def decode_accepted(body: bytes) -> AcceptedMsg:
    f = _Fields(body, HandoffKind.ACCEPTED, _ACCEPTED_KEYS)
    term = f.int_key("term", 1)
    ok = f.flag("ok")
    return AcceptedMsg(f.channel(), term, ok, f.answer(term, ok))
