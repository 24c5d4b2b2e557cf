"""The owner's write path: SEND batches -> numbered records -> APPEND -> commit.

SENDs that reach a channel's owner in one event-loop turn form a batch.  Each
message id is looked up first (the recent-ACK cache, the owner's uncommitted
records, then the store): a stored one is answered with its one seq, never
numbered twice.  New ones get ``seq = last + 1`` in the owner's term, go to
the local store and, as one APPEND frame per replica (sections per channel
with the prev ``(term, seq)`` and the owner's commit), to the replicas.
A channel's records are committed, ACKed and DELIVERed once the local store
and every replica stored them; any other outcome fails them (not ACKed: the
client may retry and gets the same seq once a later takeover commits them)
and the owner steps down, so its next write takes the channel over again.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from plexichat import wire
from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p
from plexichat.node.order import ChannelMeta, Role
from plexichat.node.transport import FrameConnection

if TYPE_CHECKING:
    from plexichat.node.server import Node, SendItem

T = wire.MessageType
CHUNK_BYTES: Final = 512 * 1024
Waiter = tuple[FrameConnection, int, int]  # connection, request id, t0 (ns)


def micros_since(now_ns: int, waiters: list[Waiter]) -> np.ndarray[Any, Any]:
    """Microseconds (at least 1) from each waiter's t0 to *now_ns*."""
    arr = np.array([w[2] for w in waiters], dtype=np.int64)
    np.subtract(now_ns, arr, out=arr)
    arr //= 1000
    np.maximum(arr, 1, out=arr)
    return arr


class WriteGroup:
    """One owner batch for one replica set: waits for its local commit and
    every replica's APPEND results (per channel)."""

    __slots__ = (
        "error",
        "failed",
        "finished",
        "parts",
        "records",
        "terms",
        "waiters",
        "writes",
    )

    def __init__(
        self,
        writes: WritePath,
        records: list[p.Record],
        waiters: list[Waiter],
        terms: dict[int, tuple[int, int]],
        parts: int,
    ) -> None:
        self.writes = writes
        self.records = records
        self.waiters = waiters
        self.terms = terms  # channel -> (term its records were numbered in, top seq)
        self.parts = parts
        self.error: tuple[int, str] | None = None  # fails every channel
        self.failed: dict[int, tuple[int, str]] = {}  # channel -> (code, reason)
        self.finished = False

    def local_done(
        self, inserted: int, corrections: dict[int, int], error: BaseException | None
    ) -> None:
        if error is not None:
            self.error = (p.ErrorCode.INTERNAL, f"storage: {error}")
        elif inserted != len(self.records) or corrections:
            # a seq or message id was taken: the in-memory log is wrong
            self.error = (p.ErrorCode.INTERNAL, "storage refused a numbered record")
        self._part_done()

    def replica_done(
        self,
        channels: list[int],
        frame: wire.Frame | None,
        error: BaseException | None,
    ) -> None:
        if frame is None or frame.type != T.REPLICATE_ACK:
            reason = f"replica: {error}" if frame is None else _error_text(frame)
            for channel in channels:
                self.failed.setdefault(channel, (p.ErrorCode.UNAVAILABLE, reason))
        else:
            try:
                results = pp.decode_append_results(frame.payload)
            except p.ProtocolError as exc:
                results = []
                reason = f"replica answered badly: {exc}"
                for channel in channels:
                    self.failed.setdefault(channel, (p.ErrorCode.UNAVAILABLE, reason))
            metas = self.writes.node.order.metas
            answered: set[int] = set()
            for result in results:
                if result.status is pp.AppendStatus.OK:
                    answered.add(result.channel)
                    continue
                self.failed.setdefault(
                    result.channel,
                    (
                        p.ErrorCode.UNAVAILABLE,
                        f"replica did not store it: {result.status.name}",
                    ),
                )
                meta = metas.get(result.channel)
                if meta is not None and result.status is pp.AppendStatus.REFUSED:
                    meta.seen = max(meta.seen, result.promised)
            if not answered.issuperset(channels):
                for channel in channels:  # no OK for it: not stored there
                    if channel not in answered:
                        self.failed.setdefault(
                            channel, (p.ErrorCode.UNAVAILABLE, "replica left it out")
                        )
        self._part_done()

    def _part_done(self) -> None:
        self.parts -= 1
        if self.parts == 0 and not self.finished:
            self.finish()

    def expire(self) -> None:
        if not self.finished:
            self.error = (p.ErrorCode.TIMEOUT, "replication timed out")
            self.finish()

    def finish(self) -> None:
        self.finished = True
        self.writes.group_done(self)
        self.records, self.waiters = [], []  # the deadline queue may keep it a while


class WritePath:
    """Numbering and replication of an owner's writes (see the module docstring)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # open groups by deadline (one timeout for all: creation order is
        # deadline order), swept by one timer instead of a timer per group
        self._deadlines: collections.deque[tuple[float, WriteGroup]] = (
            collections.deque()
        )
        self._sweep_handle: asyncio.TimerHandle | None = None

    def _watch(self, group: WriteGroup) -> None:
        loop = self.node.loop
        assert loop is not None
        deadline = loop.time() + self.node.config.replicate_timeout
        self._deadlines.append((deadline, group))
        if self._sweep_handle is None:
            self._sweep_handle = loop.call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        """Expire the groups past their deadline; wake at the next one."""
        self._sweep_handle = None
        loop = self.node.loop
        assert loop is not None
        now = loop.time()
        deadlines = self._deadlines
        while deadlines and (deadlines[0][1].finished or deadlines[0][0] <= now):
            _deadline, group = deadlines.popleft()
            group.expire()  # a finished one stays as it is
        if deadlines:
            self._sweep_handle = loop.call_at(deadlines[0][0], self._sweep)

    # -- batch -> records ----------------------------------------------------------

    def flush(self, batch: list[SendItem]) -> None:
        """Route a batch of SENDs this node owns (the ring said so)."""
        node = self.node
        order = node.order
        gates = node.gates
        recent_get = node.recent.get
        ack_pack = p.ACK_BODY.pack
        counters = node.counters
        counters["sends"] += len(batch)
        lookup: list[SendItem] = []
        maybe = False  # some id may be stored already: ask the store
        may_hold = node.ids.may_hold
        looking = node.looking
        for item in batch:
            conn, rid, channel, msg_id, _sender, _payload, _t0, owners = item
            hit = recent_get(msg_id)
            if hit is not None and hit[0] == channel:
                counters["dedup_hits"] += 1
                conn.send(T.ACK, rid, ack_pack(hit[0], hit[1]))
                continue
            if channel in gates:
                node.gate(channel, [item])
                continue
            meta = order.meta(channel)
            if not meta.owns(owners):
                node.gate(channel, [item], take_over=owners)
                continue
            if msg_id in meta.pending:
                self._busy(conn, rid)
                continue
            lookup.append(item)
            maybe = maybe or channel in looking or may_hold(channel, msg_id)
        if not lookup:
            return
        if not maybe:  # certainly new, and nothing older of theirs in flight
            self._number_owned(lookup)
            return
        for item in lookup:
            looking[item[2]] = looking.get(item[2], 0) + 1
        node.spawn(self._number(lookup), "number")

    def _busy(self, conn: FrameConnection, rid: int) -> None:
        self.node.counters["send_failed"] += 1
        conn.send_error(
            rid, p.ErrorCode.UNAVAILABLE, "this message is being replicated: retry"
        )

    async def _number(self, items: list[SendItem]) -> None:
        node = self.node
        may_hold = node.ids.may_hold
        keys = [(item[2], item[3]) for item in items if may_hold(item[2], item[3])]
        try:
            stored = await node.storage.lookup(keys)
        except Exception as exc:
            stored = None
            for conn, rid, *_ in items:
                conn.send_error(rid, p.ErrorCode.INTERNAL, f"lookup: {exc}")
        finally:
            looking = node.looking
            for item in items:
                left = looking[item[2]] - 1
                if left:
                    looking[item[2]] = left
                else:
                    del looking[item[2]]
        if stored is not None:
            self.number(items, stored)
        for channel in {item[2] for item in items} & node.gates.keys():
            node.release_if_clear(channel)

    def number(
        self, items: list[SendItem], stored: dict[tuple[int, bytes], tuple[int, int]]
    ) -> None:
        """Number the new messages of *items* (after a store lookup: *stored*
        holds the ones found) and replicate them."""
        node = self.node
        order = node.order
        ack_pack = p.ACK_BODY.pack
        owned: list[SendItem] = []
        reroute: dict[int, list[SendItem]] = {}  # channel -> SENDs, in order
        for item in items:
            conn, rid, channel, msg_id, sender, payload, t0, _owners = item
            if channel in reroute:  # an older one of the channel goes again
                reroute[channel].append(item)
                continue
            meta = order.meta(channel)
            found = stored.get((channel, msg_id))
            if found is not None:
                seq = found[0]
                if seq <= meta.commit:
                    node.counters["dedup_hits"] += 1
                    conn.send(T.ACK, rid, ack_pack(channel, seq))
                    node.recent.put(msg_id, (channel, seq))
                else:
                    self._busy(conn, rid)
                continue
            current = node.owners(channel)  # the ring may have moved since
            if (
                current is None
                or current[0] != node.id
                or channel in node.gates
                or not meta.owns(current)
            ):
                reroute[channel] = [item]
                continue
            owned.append((conn, rid, channel, msg_id, sender, payload, t0, current))
        self._number_owned(owned)
        for channel, again in reroute.items():
            current = node.owners(channel)
            mine = current is not None and current[0] == node.id
            node.gate(channel, again, take_over=current if mine else None)

    def _number_owned(self, items: list[SendItem]) -> None:
        """Number *items*: new messages of channels this node owns with the
        replica set each item names (checked in this loop turn)."""
        if not items:
            return
        node = self.node
        metas = node.order.metas
        make = p.make_record
        head = p.SEND_HEAD.size
        ts = time.time_ns() // 1000
        # replica set -> channel -> (records, prev term), and the waiters
        sets: dict[
            tuple[str, ...],
            tuple[dict[int, tuple[list[p.Record], int]], list[p.Record], list[Waiter]],
        ] = {}
        for item in items:
            conn, rid, channel, msg_id, sender, payload, t0, owners = item
            meta = metas[channel]
            pending = meta.pending
            if msg_id in pending:  # the same id twice in one batch
                self._busy(conn, rid)
                continue
            entry = sets.get(owners)
            if entry is None:
                entry = sets[owners] = ({}, [], [])
            by_channel, records, waiters = entry
            prev = meta.last
            seq = prev + 1
            section = by_channel.get(channel)
            if section is None:
                by_channel[channel] = section = ([], meta.term_at(prev))
            epochs = meta.epochs
            if epochs and epochs[-1][0] == meta.term:
                meta.last = seq  # seq == last + 1: numbered right here
            else:
                meta.append_term(meta.term, seq)
            pending[msg_id] = seq
            rec = make((channel, seq, msg_id, sender, ts, payload[head:], meta.term))
            section[0].append(rec)
            records.append(rec)
            waiters.append((conn, rid, t0))
        groups = [
            self._replicate(owners, by_channel, records, waiters)
            for owners, (by_channel, records, waiters) in sets.items()
        ]
        if len(groups) == 1:
            node.ids.add_records(groups[0].records)
            node.storage.insert(groups[0].records, groups[0].local_done)
        elif groups:  # one store operation for the whole batch
            every = [rec for group in groups for rec in group.records]
            node.ids.add_records(every)
            node.storage.insert(every, functools.partial(_local_done_all, groups))

    def _replicate(
        self,
        owners: tuple[str, ...],
        by_channel: dict[int, tuple[list[p.Record], int]],
        records: list[p.Record],
        waiters: list[Waiter],
    ) -> WriteGroup:
        """Send one replica set's records; the group waits for them (the
        caller queues the local store operation)."""
        node = self.node
        metas = node.order.metas
        add = pp.add_append_section
        frames: list[tuple[bytes, list[int]]] = []
        parts: list[bytes] = [b""]
        channels: list[int] = []  # of the frame being built
        size = 0
        terms: dict[int, tuple[int, int]] = {}
        for channel, (recs, prev_term) in by_channel.items():
            meta = metas[channel]
            term = meta.term
            terms[channel] = (term, recs[-1].seq)
            meta.carried = commit = meta.commit
            for piece, piece_prev_term in _pieces(recs, prev_term):
                prev_seq = piece[0].seq - 1
                size += add(
                    parts, channel, term, piece_prev_term, prev_seq, commit, piece
                )
                channels.append(channel)
                if size >= CHUNK_BYTES:
                    frames.append((pp.join_append(parts, len(channels)), channels))
                    parts, channels, size = [b""], [], 0
        if channels:
            frames.append((pp.join_append(parts, len(channels)), channels))
        replicas = owners[1:]
        group = WriteGroup(
            self, records, waiters, terms, 1 + len(replicas) * len(frames)
        )
        self._watch(group)
        request = node.peers.request
        for replica in replicas:
            for body, frame_channels in frames:
                request(
                    replica,
                    T.REPLICATE,
                    body,
                    functools.partial(group.replica_done, frame_channels),
                )
        node.counters["replicate_frames"] += len(replicas) * len(frames)
        return group

    # -- commit ----------------------------------------------------------------------

    def group_done(self, group: WriteGroup) -> None:
        node = self.node
        metas = node.order.metas
        ok: dict[int, ChannelMeta] = {}
        failed = group.failed
        owner = Role.OWNER
        for channel, (term, top) in group.terms.items():
            meta = metas[channel]
            current = meta.role is owner and meta.term == term
            if group.error is None and channel not in failed and current:
                if top > meta.commit:
                    meta.commit = top
                    node.order.mark_committed(meta)
                ok[channel] = meta
            elif current:
                node.counters["step_downs"] += 1
                meta.step_down()  # the next write takes the channel over again
        now = time.perf_counter_ns()
        records, waiters = group.records, group.waiters
        ack = T.ACK
        ack_pack = p.ACK_BODY.pack
        recent_put = node.recent.put
        if len(ok) == len(group.terms):  # every channel committed all of its own
            for (conn, rid, _t0), rec in zip(waiters, records, strict=True):
                channel, seq, msg_id = rec[0], rec[1], rec[2]
                ok[channel].pending.pop(msg_id, None)
                conn.send(ack, rid, ack_pack(channel, seq))
                recent_put(msg_id, (channel, seq))
            acked, committed = waiters, records
        else:
            acked, committed = [], []
            for waiter, rec in zip(waiters, records, strict=True):
                conn, rid, _t0 = waiter
                owned = ok.get(rec.channel)
                if owned is not None:
                    owned.pending.pop(rec.msg_id, None)
                    conn.send(ack, rid, ack_pack(rec.channel, rec.seq))
                    recent_put(rec.msg_id, (rec.channel, rec.seq))
                    acked.append(waiter)
                    committed.append(rec)
                else:
                    code, reason = group.error or failed.get(
                        rec.channel,
                        (p.ErrorCode.UNAVAILABLE, "ownership moved before the commit"),
                    )
                    conn.send_error(rid, code, reason)
                    node.counters["send_failed"] += 1
        node.counters["acked"] += len(acked)
        if acked:
            node.hist["send"].record_many(micros_since(now, acked))
        for meta in ok.values():
            node.order.notify_commit(meta)
        if committed and node.subscribers:
            node.deliver(committed)


def _local_done_all(
    groups: list[WriteGroup],
    inserted: int,
    corrections: dict[int, int],
    error: BaseException | None,
) -> None:
    """The one store operation of several groups finished: tell each."""
    whole = error is None and not corrections
    whole = whole and inserted == sum(len(g.records) for g in groups)
    for group in groups:  # a partial insert fails every group of the batch
        group.local_done(len(group.records) if whole else -1, {}, error)


def _pieces(
    records: list[p.Record], prev_term: int
) -> Iterator[tuple[list[p.Record], int]]:
    """*records* (one channel's, in seq order) cut into runs that close a
    frame (CHUNK_BYTES or more, but the last), each with the term of the
    record before it: a frame holds one section per channel."""
    if len(records) == 1 or sum(len(r.payload) for r in records) < CHUNK_BYTES // 2:
        yield records, prev_term
        return
    start = size = 0
    for i, rec in enumerate(records):
        size += pp.LOG_RECORD.size + len(rec.payload)
        if size >= CHUNK_BYTES or i == len(records) - 1:
            yield records[start : i + 1], prev_term
            prev_term, start, size = rec.term, i + 1, 0


def _error_text(frame: wire.Frame) -> str:
    try:
        return f"replica refused the write: {p.decode_error(frame.payload)[1]}"
    except p.ProtocolError:
        return f"replica answered with frame type {frame.type}"
