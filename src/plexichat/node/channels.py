"""Channel ownership between nodes: takeovers (terms) and the replica side.

:class:`ChannelOrder` keeps every channel's :class:`~plexichat.node.order.ChannelMeta`
and speaks the peer messages of ``docs/protocol.md`` ("Channel order between
peers"): a node that the ring makes a channel's owner *takes it over*
(PREPARE to every cluster member, adopt the best log of the last accepted
config, install it on its replicas with APPEND, ACCEPT by a cluster majority)
before it numbers any write, and replicas apply APPENDs with the term and
prev checks, truncating conflicting tails instead of merging them.  The
owner's write path (batching SENDs into APPENDs) is
:mod:`plexichat.node.writes`; :class:`~plexichat.node.server.Node`
composes both.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any

from plexichat import wire
from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p
from plexichat.node.counters import NodeCounters
from plexichat.node.order import AppendPlan, ChannelMeta, Role, plan_append
from plexichat.node.ownership import SafetyError
from plexichat.node.peers import PeerLinks
from plexichat.node.store import ChannelLog, ChannelState, MessageStore
from plexichat.node.transport import FrameConnection
from plexichat.stats import Histogram

log = logging.getLogger("plexichat.node")

T = wire.MessageType
StoreResult = tuple[int, dict[int, int], BaseException | None]
Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]
OnCommit = Callable[[int, int, int], None]  # channel, old commit, new commit


class TakeoverFailed(Exception):
    """A takeover did not make this node the owner (the reason says why)."""


class ChannelOrder:
    """Every channel's order state on node *node_id* (see the module docstring).

    *voters* lists the cluster members that count for majorities (every
    member that has not left, this node included); *on_commit* is told when
    a channel's commit advances on this node (for DELIVER).
    """

    def __init__(
        self,
        node_id: str,
        *,
        storage: MessageStore,
        peers: PeerLinks,
        voters: Callable[[], list[str]],
        counters: NodeCounters,
        hist: dict[str, Histogram],
        spawn: Spawn,
        on_commit: OnCommit,
        on_stored: Callable[[Iterable[p.Record]], None],
        call_timeout: float,
        data_timeout: float,
        batch: int,
        section_bytes: int = 512 * 1024,
    ) -> None:
        self.id = node_id
        self.storage = storage
        self.peers = peers
        self.voters = voters
        self.counters = counters
        self.hist = hist
        self.spawn = spawn
        self.on_commit = on_commit
        self.on_stored = on_stored
        self.call_timeout = call_timeout
        self.data_timeout = data_timeout
        self.batch = batch
        # payload bytes of one log pull or install section (a frame holds it)
        self.section_bytes = section_bytes
        self.metas: dict[int, ChannelMeta] = {}
        self.takeovers: dict[int, asyncio.Task[None]] = {}
        self._dirty: set[int] = set()  # channels whose commit is not stored yet
        self._notices: set[int] = set()  # channels whose replicas lag our commit
        self._notice_handle: asyncio.Handle | None = None

    # -- state ---------------------------------------------------------------

    def load(self, logs: Mapping[int, ChannelLog]) -> None:
        """The channels as stored (at start-up)."""
        for channel, stored in logs.items():
            self.metas[channel] = ChannelMeta.from_log(channel, stored)

    def meta(self, channel: int) -> ChannelMeta:
        meta = self.metas.get(channel)
        if meta is None:
            meta = self.metas[channel] = ChannelMeta(channel)
        return meta

    def store(
        self,
        records: Sequence[p.Record] = (),
        *,
        truncate: Mapping[int, int] | None = None,
        states: Sequence[ChannelState] = (),
    ) -> asyncio.Future[StoreResult]:
        """Queue one store operation; the future resolves once it committed."""
        future: asyncio.Future[StoreResult] = asyncio.get_running_loop().create_future()

        def done(
            inserted: int, corrections: dict[int, int], error: BaseException | None
        ) -> None:
            if not future.done():
                future.set_result((inserted, corrections, error))

        self.storage.insert(records, done, truncate=truncate, states=states)
        return future

    async def _persist(self, meta: ChannelMeta) -> None:
        await self._stored(self.store(states=[meta.state()]))

    def mark_committed(self, meta: ChannelMeta) -> None:
        """*meta*'s commit moved: store it at the next flush."""
        self._dirty.add(meta.channel)

    async def flush_commits(self) -> None:
        """Store the commit of every channel whose commit moved."""
        dirty, self._dirty = self._dirty, set()
        if dirty:
            states = [self.metas[c].state() for c in sorted(dirty)]
            error = (await self.store(states=states))[2]
            if error is not None:
                self._dirty |= dirty

    # -- calls -------------------------------------------------------------------

    async def call(
        self, node: str, ftype: int, body: bytes, timeout: float
    ) -> wire.Frame | None:
        """One request to *node*: its reply frame, or None (no answer in time)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[wire.Frame | None] = loop.create_future()

        def done(frame: wire.Frame | None, error: BaseException | None) -> None:
            if not future.done():
                future.set_result(frame)

        self.peers.request(node, ftype, body, done)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None

    # -- takeover ------------------------------------------------------------------

    def take_over(
        self, channel: int, members: tuple[str, ...]
    ) -> asyncio.Task[str | None]:
        """Start (or join) the takeover of *channel* with config *members*.
        The task's result is None once this node owns it, else the reason."""
        task = self.takeovers.get(channel)
        if task is not None and not task.done():
            return task
        task = self.spawn(self._take_over(channel, members), "takeover")
        self.takeovers[channel] = task
        task.add_done_callback(lambda _t: self._takeover_done(channel, task))
        return task

    def _takeover_done(self, channel: int, task: asyncio.Task[str | None]) -> None:
        if self.takeovers.get(channel) is task:
            del self.takeovers[channel]

    async def _take_over(
        self, channel: int, members: tuple[str, ...], attempts: int = 3
    ) -> str | None:
        """Up to *attempts* candidacies: a refusal that names a higher term
        (a node that never heard of the channel's terms starts at 1) is
        retried above it after a short random back-off."""
        meta = self.meta(channel)
        reason = ""
        for attempt in range(attempts):
            if attempt:
                # duelling candidates: back off a little before trying again
                await asyncio.sleep(random.uniform(0.0, self.call_timeout / 8))
            seen = meta.seen
            reason = await self._candidacy(meta, members)
            if not reason or meta.seen == seen:
                break
        return reason or None

    async def _candidacy(self, meta: ChannelMeta, members: tuple[str, ...]) -> str:
        channel = meta.channel
        self.counters["takeovers"] += 1
        term = max(meta.promised, meta.seen) + 1
        meta.step_down()
        meta.role, meta.term, meta.members = Role.CANDIDATE, term, members
        meta.promised, meta.promised_to, meta.seen = term, self.id, term
        try:
            await self._persist(meta)
            await self._run_takeover(meta, term, members)
            return ""
        except (TakeoverFailed, SafetyError) as exc:
            self.counters["takeover_failed"] += 1
            if meta.role is not Role.FOLLOWER and meta.term == term:
                meta.step_down()
            if isinstance(exc, SafetyError):
                log.error("takeover of %d would break the order: %s", channel, exc)
            else:
                log.info(
                    "takeover of %d failed: %s",
                    channel,
                    exc,
                    extra={"event": "takeover_failed", "channel": channel},
                )
            return str(exc) or type(exc).__name__

    def _check(self, meta: ChannelMeta, term: int) -> None:
        if meta.role is not Role.CANDIDATE or meta.term != term:
            raise TakeoverFailed(f"deposed (promised term {meta.promised})")

    async def _run_takeover(
        self, meta: ChannelMeta, term: int, members: tuple[str, ...]
    ) -> None:
        channel = meta.channel
        voters = self.voters()
        quorum = len(voters) // 2 + 1
        others = [v for v in voters if v != self.id]
        self._check(meta, term)
        body = pp.encode_prepare(
            pp.Prepare(channel, term, meta.epoch_tuple(), meta.last)
        )
        frames = await asyncio.gather(
            *(self.call(n, T.HANDOFF, body, self.call_timeout) for n in others)
        )
        self._check(meta, term)
        promises: dict[str, pp.PromiseMsg] = {
            self.id: pp.PromiseMsg(
                channel, term, True, term, self._accepted(meta),
                meta.epoch_tuple(), meta.last, meta.commit,
            )
        }  # fmt: skip
        for node, frame in zip(others, frames, strict=True):
            msg = _decode(frame, p.HandoffKind.PROMISE, pp.decode_promise)
            if msg is None or msg.term != term or msg.channel != channel:
                continue
            if not msg.ok:
                meta.seen = max(meta.seen, msg.promised)
                raise TakeoverFailed(f"{node} promised term {msg.promised}")
            promises[node] = msg
        if len(promises) < quorum:
            raise TakeoverFailed(f"promises from {len(promises)} of {len(voters)}")
        silent = [m for m in members if m not in promises]
        if silent:
            raise TakeoverFailed(f"no promise from replica {', '.join(silent)}")
        latest = max(
            (m.accepted for m in promises.values() if m.accepted is not None),
            key=lambda a: a.term,
            default=None,
        )
        pool = [
            (node, m)
            for node, m in promises.items()
            if latest is None or node in latest.members
        ]
        if not pool:
            raise TakeoverFailed("no member of the last config answered")
        best_node, best = max(
            pool,
            key=lambda nm: (nm[1].epochs[-1][0] if nm[1].epochs else 0, nm[1].last),
        )
        if best_node != self.id:
            await self._adopt(meta, term, best_node, best)
        elif meta.last > best.last:  # pragma: no cover - best is this node's log
            raise SafetyError("own log changed during the takeover")
        commit = max(m.commit for m in promises.values())
        if commit > meta.last:
            raise SafetyError(
                f"channel {channel}: adopted log {meta.last} < commit {commit}"
            )
        self._advance_commit(meta, commit)
        await asyncio.gather(
            *(self._install(meta, term, r, promises[r]) for r in members[1:])
        )
        self._check(meta, term)
        meta.accepted_term, meta.accepted_members = term, members
        await self._persist(meta)
        body = pp.encode_accept(pp.AcceptMsg(channel, term, members))
        frames = await asyncio.gather(
            *(self.call(n, T.HANDOFF, body, self.call_timeout) for n in others)
        )
        self._check(meta, term)
        accepts = 1
        for node, frame in zip(others, frames, strict=True):
            reply = _decode(frame, p.HandoffKind.ACCEPTED, pp.decode_accepted)
            if reply is None or reply.term != term:
                continue
            if not reply.ok:
                meta.seen = max(meta.seen, reply.promised)
                raise TakeoverFailed(
                    f"{node} refused the config: term {reply.promised}"
                )
            accepts += 1
        if accepts < quorum:
            raise TakeoverFailed(f"config accepted by {accepts} of {len(voters)}")
        meta.role = Role.OWNER
        self._advance_commit(meta, meta.last)  # everything installed is committed
        self.notify_commit(meta)
        log.debug(
            "owner of %d",
            channel,
            extra={"event": "owner", "channel": channel, "term": term},
        )

    @staticmethod
    def _accepted(meta: ChannelMeta) -> pp.AcceptedConfig | None:
        if not meta.accepted_term:
            return None
        return pp.AcceptedConfig(meta.accepted_term, meta.accepted_members)

    async def _adopt(
        self, meta: ChannelMeta, term: int, source: str, best: pp.PromiseMsg
    ) -> None:
        """Make this node's log *source*'s (whose shape *best* describes):
        truncate the conflicting tail, pull the missing records."""
        channel = meta.channel
        base = meta.common_prefix_with(best.epochs, best.last)
        if meta.last > base:
            meta.truncate(base)
            await self._stored(self.store(truncate={channel: base}))
        after = base
        while after < best.last:
            body = pp.encode_log_request(pp.LogRequest(channel, after, self.batch))
            frame = await self.call(source, T.HANDOFF, body, self.data_timeout)
            section = _decode(frame, p.HandoffKind.LOG, pp.decode_log_reply)
            self._check(meta, term)
            if section is None or not section.records:
                raise TakeoverFailed(f"log pull from {source} after {after} failed")
            if section.prev_seq != after or meta.last != after:
                raise TakeoverFailed(f"log pull from {source}: out of step")
            records = [r for r in section.records if r.seq <= best.last]
            for rec in records:
                meta.append_term(rec.term, rec.seq)
            self.on_stored(records)
            await self._stored(self.store(records))
            self.counters["log_pulled"] += len(records)
            after = meta.last

    async def _stored(self, future: asyncio.Future[StoreResult]) -> None:
        _inserted, _corrections, error = await future
        if error is not None:
            raise TakeoverFailed(f"storage: {error}")

    async def _install(
        self, meta: ChannelMeta, term: int, replica: str, promise: pp.PromiseMsg
    ) -> None:
        """APPEND this node's log to *replica* from the common prefix on."""
        channel = meta.channel
        after = meta.common_prefix_with(promise.epochs, promise.last)
        while True:
            self._check(meta, term)
            records: list[p.Record] = []
            if after < meta.last:
                rows = await self.storage.fetch(
                    channel, after, self.batch, self.section_bytes
                )
                records = [r for r in rows if r.seq <= meta.last]
                if not records or records[0].seq != after + 1:
                    raise TakeoverFailed(f"own log of {channel} unreadable at {after}")
                records = _contiguous(records, after)
            section = pp.AppendSection(
                channel, term, meta.term_at(after), after, meta.commit, tuple(records)
            )
            frame = await self.call(
                replica, T.REPLICATE, pp.encode_append([section]), self.data_timeout
            )
            result = _decode_results(frame, channel)
            if result is None or result.status is not pp.AppendStatus.OK:
                status = "no answer" if result is None else result.status.name
                if result is not None and result.status is pp.AppendStatus.REFUSED:
                    meta.seen = max(meta.seen, result.promised)
                raise TakeoverFailed(f"install on {replica}: {status}")
            self.counters["log_installed"] += len(records)
            after += len(records)
            if after >= meta.last:
                return

    def _advance_commit(self, meta: ChannelMeta, commit: int) -> None:
        old = meta.commit
        if commit > old:
            meta.commit = commit
            self.mark_committed(meta)
            self.on_commit(meta.channel, old, commit)

    # -- commit notices (owner -> replicas) ----------------------------------------

    def notify_commit(self, meta: ChannelMeta) -> None:
        """Tell *meta*'s replicas its commit soon, unless an APPEND carried it
        (coalesced: one notice per channel and replica every 20 ms at most)."""
        if meta.commit > meta.carried and meta.role is Role.OWNER:
            self._notices.add(meta.channel)
            if self._notice_handle is None:
                loop = asyncio.get_running_loop()
                self._notice_handle = loop.call_later(0.02, self._send_notices)

    def _send_notices(self) -> None:
        self._notice_handle = None
        channels, self._notices = self._notices, set()
        metas = self.metas
        batches: dict[str, list[pp.AppendSection]] = {}
        for channel in sorted(channels):
            meta = metas[channel]
            commit = meta.commit
            if meta.role is not Role.OWNER or commit <= meta.carried:
                continue  # deposed, or a later APPEND carried it
            meta.carried = commit
            notice = pp.AppendSection(
                channel, meta.term, meta.term_at(commit), commit, commit, ()
            )
            for replica in meta.members[1:]:
                batches.setdefault(replica, []).append(notice)
        for replica, batch in batches.items():
            self.peers.request(
                replica,
                T.REPLICATE,
                pp.encode_append(batch),
                functools.partial(self._noticed, batch),
            )

    def _noticed(
        self,
        sections: list[pp.AppendSection],
        frame: wire.Frame | None,
        error: BaseException | None,
    ) -> None:
        if frame is None or frame.type != T.REPLICATE_ACK:
            return  # the next write or notice tells it again
        try:
            results = pp.decode_append_results(frame.payload)
        except p.ProtocolError:
            return
        terms = {s.channel: s.term for s in sections}
        for result in results:
            meta = self.metas.get(result.channel)
            if meta is None or meta.term != terms.get(result.channel):
                continue
            if result.status is pp.AppendStatus.REFUSED:
                meta.seen = max(meta.seen, result.promised)
                meta.step_down()

    # -- receiving -------------------------------------------------------------------

    def on_handoff(self, conn: FrameConnection, rid: int, payload: bytes) -> bool:
        """Answer a channel-order HANDOFF (False: not one of its kinds)."""
        kind = pp.handoff_kind(payload)
        if kind is p.HandoffKind.PREPARE:
            self._on_prepare(conn, rid, pp.decode_prepare(payload))
        elif kind is p.HandoffKind.ACCEPT:
            self._on_accept(conn, rid, pp.decode_accept(payload))
        elif kind is p.HandoffKind.LOG:
            request = pp.decode_log_request(payload)
            self.spawn(self._on_log(conn, rid, request), "log")
        elif kind in (p.HandoffKind.PROMISE, p.HandoffKind.ACCEPTED):
            raise p.ProtocolError(f"HANDOFF {kind.name} is a reply, not a request")
        else:
            return False
        return True

    def _on_prepare(self, conn: FrameConnection, rid: int, msg: pp.Prepare) -> None:
        src = conn.peer_id
        meta = self.meta(msg.channel)
        if not src or not meta.allows(msg.term, src):
            self.counters["prepares_refused"] += 1
            conn.send(
                T.HANDOFF, rid, pp.encode_promise(self._promise(meta, msg, False))
            )
            return
        meta.observe(msg.term, src)
        reply = pp.encode_promise(self._promise(meta, msg, True))
        self._after_store(conn, rid, T.HANDOFF, reply, states=[meta.state()])

    def _promise(self, meta: ChannelMeta, msg: pp.Prepare, ok: bool) -> pp.PromiseMsg:
        return pp.PromiseMsg(
            msg.channel, msg.term, ok, meta.promised, self._accepted(meta),
            meta.epoch_tuple(), meta.last, meta.commit,
        )  # fmt: skip

    def _on_accept(self, conn: FrameConnection, rid: int, msg: pp.AcceptMsg) -> None:
        src = conn.peer_id
        meta = self.meta(msg.channel)
        if not src or not meta.allows(msg.term, src):
            conn.send(
                T.HANDOFF,
                rid,
                pp.encode_accepted(
                    pp.AcceptedMsg(msg.channel, msg.term, False, meta.promised)
                ),
            )
            return
        meta.observe(msg.term, src)
        meta.accepted_term, meta.accepted_members = msg.term, tuple(msg.members)
        reply = pp.encode_accepted(
            pp.AcceptedMsg(msg.channel, msg.term, True, meta.promised)
        )
        self._after_store(conn, rid, T.HANDOFF, reply, states=[meta.state()])

    def _after_store(
        self,
        conn: FrameConnection,
        rid: int,
        ftype: int,
        reply: bytes,
        *,
        states: Sequence[ChannelState],
    ) -> None:
        def done(
            inserted: int, corrections: dict[int, int], error: BaseException | None
        ) -> None:
            if error is not None:
                conn.send_error(rid, p.ErrorCode.INTERNAL, f"storage: {error}")
            else:
                conn.send(ftype, rid, reply)

        self.storage.insert((), done, states=states)

    async def _on_log(
        self, conn: FrameConnection, rid: int, request: pp.LogRequest
    ) -> None:
        meta = self.meta(request.channel)
        limit = max(1, min(request.limit, self.batch))
        after = request.after
        if after > meta.last:
            records: list[p.Record] = []
        else:
            rows = await self.storage.fetch(
                request.channel, after, limit, self.section_bytes
            )
            records = _contiguous([r for r in rows if r.seq <= meta.last], after)
        if after > meta.last:
            after, prev_term = meta.last, meta.term_at(meta.last)
        else:
            prev_term = meta.term_at(after)
        section = pp.AppendSection(
            request.channel, meta.promised, prev_term, after, meta.commit,
            tuple(records),
        )  # fmt: skip
        conn.send(T.HANDOFF, rid, pp.encode_log_reply(section))

    def on_append(self, conn: FrameConnection, rid: int, payload: bytes) -> None:
        """A REPLICATE (APPEND sections) from an owner or candidate."""
        src = conn.peer_id
        if not src:
            conn.send_error(rid, p.ErrorCode.NOT_OWNER, "REPLICATE needs a peer HELLO")
            return
        t0 = time.perf_counter_ns()
        sections = pp.decode_append(payload)
        ok = pp.AppendStatus.OK
        results: list[pp.AppendResult] = []
        commits: list[tuple[ChannelMeta, int, int]] = []  # meta, from, to
        ops: list[tuple[list[p.Record], dict[int, int]]] = [([], {})]
        states: dict[int, ChannelState] = {}
        metas = self.metas
        stored: list[p.Record] = []  # every record this APPEND stores
        for section in sections:
            channel, term, prev_term, prev_seq, commit, recs = section
            meta = metas.get(channel)
            if meta is None:
                meta = self.meta(channel)
            epochs = meta.epochs
            if (
                recs
                and term == meta.promised
                and prev_seq == meta.last
                and prev_seq
                and epochs[-1][0] == prev_term
                and recs[0].term == recs[-1].term
                and meta.promised_to == src
            ):
                # the common case (what plan_append does for it): the owner
                # this node promised appends right after its last record, in
                # one term (the decoder checked the seqs and term order)
                rec_term = recs[0].term
                if epochs[-1][0] != rec_term:
                    epochs.append((rec_term, prev_seq + 1))
                match = meta.last = recs[-1].seq
                before = meta.commit
                if commit > before:
                    meta.commit = min(commit, match)
                    commits.append((meta, before, meta.commit))
                ops[-1][0].extend(recs)
                stored.extend(recs)
                results.append(_new_tuple(pp.AppendResult, (channel, ok, term, match)))
                continue
            if (
                not recs
                and term == meta.promised
                and prev_seq <= meta.last
                and meta.promised_to == src
                and meta.term_at(prev_seq) == prev_term
            ):
                # a commit notice from the promised owner (plan_append's rules)
                before = meta.commit
                if commit > before and prev_seq > before:
                    meta.commit = min(commit, prev_seq)
                    commits.append((meta, before, meta.commit))
                results.append(
                    _new_tuple(pp.AppendResult, (channel, ok, term, prev_seq))
                )
                continue
            try:
                plan = plan_append(meta, section, src)
            except SafetyError as exc:
                log.error("refused an APPEND: %s", exc)
                plan = AppendPlan(pp.AppendStatus.FAILED, reason=str(exc))
            if plan.status is pp.AppendStatus.REFUSED:
                self.counters["append_refused"] += 1
            elif plan.status is pp.AppendStatus.MISMATCH:
                self.counters["append_mismatch"] += 1
            records, truncate = ops[-1]
            if plan.truncate_after is not None:
                if any(r.channel == channel for r in records):
                    ops.append(([], {}))
                    records, truncate = ops[-1]
                truncate[channel] = plan.truncate_after
                self.counters["truncated"] += 1
            records += plan.records
            stored += plan.records
            if plan.promise_changed:
                states[channel] = meta.state()
            if plan.commit_to > plan.commit_from:
                commits.append((meta, plan.commit_from, plan.commit_to))
            result = (channel, plan.status, meta.promised, plan.match)
            results.append(_new_tuple(pp.AppendResult, result))
        if stored:
            self.on_stored(stored)
        if not states and not any(recs or cut for recs, cut in ops):
            # nothing to store (a commit notice, records already held): the
            # records the commit covers were stored by earlier APPENDs
            ops = []
        left = max(1, len(ops))
        failed: list[BaseException] = []

        def done(
            inserted: int, corrections: dict[int, int], error: BaseException | None
        ) -> None:
            nonlocal left
            left -= 1
            if error is not None:
                failed.append(error)
            if left:
                return
            if failed:
                log.error("storage failed under an APPEND: %s", failed[0])
                for i, res in enumerate(results):
                    if res.status is pp.AppendStatus.OK:
                        results[i] = pp.AppendResult(
                            res.channel, pp.AppendStatus.FAILED, res.promised, 0
                        )
            else:
                self.counters["replicated"] += len(stored)
            conn.send(T.REPLICATE_ACK, rid, pp.encode_append_results(results))
            self.hist["replicate"].record(max(1, (time.perf_counter_ns() - t0) // 1000))
            if not failed:
                for meta, before, after in commits:
                    self.mark_committed(meta)
                    self.on_commit(meta.channel, before, after)

        for i, (records, truncate) in enumerate(ops):
            self.storage.insert(
                records,
                done,
                truncate=truncate or None,
                states=list(states.values()) if i == 0 else (),
            )
        if not ops:
            done(0, {}, None)


_new_tuple = tuple.__new__


def _contiguous(records: Iterable[p.Record], after: int) -> list[p.Record]:
    """The records that continue seq *after* without a gap."""
    out: list[p.Record] = []
    for rec in records:
        if rec.seq != after + 1 + len(out):
            break
        out.append(rec)
    return out


def _decode(
    frame: wire.Frame | None, kind: p.HandoffKind, decode: Callable[[bytes], Any]
) -> Any:
    if frame is None or frame.type != T.HANDOFF:
        return None
    try:
        if pp.handoff_kind(frame.payload) is not kind:
            return None
        return decode(frame.payload)
    except p.ProtocolError:
        return None


def _decode_results(frame: wire.Frame | None, channel: int) -> pp.AppendResult | None:
    if frame is None or frame.type != T.REPLICATE_ACK:
        return None
    try:
        results = pp.decode_append_results(frame.payload)
    except p.ProtocolError:
        return None
    return next((r for r in results if r.channel == channel), None)
