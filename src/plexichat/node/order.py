"""One order per channel: a node's view of each channel's log and its terms.

:class:`ChannelMeta` is what a node keeps in memory per channel: the shape
of its stored log (last seq, epoch boundaries), the durable promise/accept
state and its role.  :func:`plan_append` decides what a replica does with one
APPEND section (refuse, report a mismatch, or skip/truncate/append) without
doing it: the node carries the plan out through its store and replies once
the store committed it.  The rules are those of the pure model in
:mod:`plexichat.node.ownership` (Raft's terms and AppendEntries check,
Kafka's leader epochs); ``docs/protocol.md`` specifies the messages.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from plexichat.node import peer_protocol as pp
from plexichat.node import protocol as p
from plexichat.node.ownership import SafetyError, common_prefix
from plexichat.node.store import ChannelLog, ChannelState

Epochs = tuple[tuple[int, int], ...]


class Role(Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"  # taking the channel over (prepare, adopt, install, accept)
    OWNER = "owner"


@dataclass(slots=True)
class ChannelMeta:
    """One channel as this node holds it (see the module docstring)."""

    channel: int
    last: int = 0
    epochs: list[tuple[int, int]] = field(default_factory=list)
    commit: int = 0
    promised: int = 0
    promised_to: str = ""
    accepted_term: int = 0
    accepted_members: tuple[str, ...] = ()
    # volatile
    role: Role = Role.FOLLOWER
    term: int = 0  # the term this node owns (or is taking over) the channel in
    members: tuple[str, ...] = ()  # that term's config, this node first
    seen: int = 0  # highest term heard of: a new candidacy goes above it
    pending: dict[bytes, int] = field(default_factory=dict)  # owner: uncommitted
    carried: int = 0  # owner: the commit its last APPEND to the replicas carried

    @classmethod
    def from_log(cls, channel: int, stored: ChannelLog) -> ChannelMeta:
        s = stored.state
        meta = cls(
            channel,
            last=stored.last,
            epochs=list(stored.epochs),
            commit=min(s.commit, stored.last),
            promised=s.promised,
            promised_to=s.promised_to,
            accepted_term=s.accepted_term,
            accepted_members=tuple(s.accepted_members),
        )
        meta.seen = max(s.promised, meta.last_term())
        return meta

    def state(self) -> ChannelState:
        """The durable part, as the store writes it."""
        return ChannelState(
            self.channel,
            promised=self.promised,
            promised_to=self.promised_to,
            accepted_term=self.accepted_term,
            accepted_members=self.accepted_members,
            commit=self.commit,
        )

    # -- the log's shape -----------------------------------------------------

    def epoch_tuple(self) -> Epochs:
        return tuple(self.epochs)

    def last_term(self) -> int:
        return self.epochs[-1][0] if self.epochs else 0

    def term_at(self, seq: int) -> int:
        """Term of the record at *seq* (0 for seq 0; *seq* must be held)."""
        if seq <= 0:
            return 0
        if seq > self.last:
            raise IndexError(f"channel {self.channel}: seq {seq} > last {self.last}")
        last_epoch = self.epochs[-1]
        if seq >= last_epoch[1]:  # the common case: in the newest term
            return last_epoch[0]
        i = bisect.bisect_right(self.epochs, seq, key=_first_seq)
        return self.epochs[i - 1][0]

    def append_term(self, term: int, seq: int) -> None:
        """The record *seq* of *term* was appended."""
        if seq != self.last + 1:
            raise SafetyError(f"channel {self.channel}: append {seq} after {self.last}")
        if self.epochs and term < self.epochs[-1][0]:
            raise SafetyError(f"channel {self.channel}: term {term} after a higher one")
        if not self.epochs or self.epochs[-1][0] != term:
            self.epochs.append((term, seq))
        self.last = seq

    def truncate(self, after: int) -> None:
        """Drop the records above *after* (never committed ones)."""
        if after < self.commit:
            raise SafetyError(
                f"channel {self.channel}: truncating to {after} below commit "
                f"{self.commit}"
            )
        if after >= self.last:
            return
        while self.epochs and self.epochs[-1][1] > after:
            self.epochs.pop()
        self.last = after
        for msg_id, seq in list(self.pending.items()):
            if seq > after:
                del self.pending[msg_id]

    def common_prefix_with(self, epochs: Epochs, last: int) -> int:
        """Length of the prefix this log shares with another (KIP-101)."""
        return common_prefix(self.epoch_tuple(), self.last, epochs, last)

    # -- terms ---------------------------------------------------------------

    def allows(self, term: int, src: str) -> bool:
        """May *src* act in *term* here (promise it, or it was promised)?"""
        return term > self.promised or (
            term == self.promised and self.promised_to == src
        )

    def observe(self, term: int, src: str) -> bool:
        """A valid message of *term* from *src*: promise it if newer.  Returns
        True if the durable promise changed (it must be stored before any
        reply); a node that was owning or taking over steps down then."""
        self.seen = max(self.seen, term)
        if term > self.promised:
            self.promised, self.promised_to = term, src
            if self.role is not Role.FOLLOWER:
                self.step_down()
            return True
        return False

    def step_down(self) -> None:
        self.role = Role.FOLLOWER
        self.term = 0
        self.members = ()
        self.pending.clear()
        self.carried = 0

    def owns(self, members: Sequence[str]) -> bool:
        """True while this node owns the channel with exactly *members*."""
        return self.role is Role.OWNER and self.members == tuple(members)


@dataclass(slots=True)
class AppendPlan:
    """What a replica does with one APPEND section."""

    status: pp.AppendStatus
    match: int = 0
    truncate_after: int | None = None  # drop records above this first
    records: list[p.Record] = field(default_factory=list)  # then store these
    promise_changed: bool = False
    commit_from: int = 0  # commit before / after: DELIVER (from, to]
    commit_to: int = 0
    reason: str = ""


def plan_append(meta: ChannelMeta, section: pp.AppendSection, src: str) -> AppendPlan:
    """Apply *section* (from *src*) to *meta* and say what to store.

    *meta* is updated at once (the node's later frames see the new shape);
    the store must apply the plan before the reply goes out.
    """
    if not meta.allows(section.term, src):
        return AppendPlan(
            pp.AppendStatus.REFUSED,
            reason=f"promised term {meta.promised} to {meta.promised_to}",
        )
    changed = meta.observe(section.term, src)
    prev = section.prev_seq
    if prev > meta.last or meta.term_at(prev) != section.prev_term:
        return AppendPlan(
            pp.AppendStatus.MISMATCH,
            promise_changed=changed,
            reason=f"no record ({section.prev_term}, {prev}): last {meta.last}",
        )
    records = section.records
    start = 0
    for rec in records:  # skip what is already held (same term: same record)
        if rec.seq <= meta.last and meta.term_at(rec.seq) == rec.term:
            start += 1
        else:
            break
    truncate_after: int | None = None
    if start < len(records) and records[start].seq <= meta.last:
        # a conflicting tail: truncate it, never merge (raises below commit)
        truncate_after = records[start].seq - 1
        meta.truncate(truncate_after)
    fresh = list(records[start:])
    if fresh:
        first, term = fresh[0], fresh[-1].term
        epochs = meta.epochs
        if (
            first.seq == meta.last + 1
            and first.term == term
            and (not epochs or epochs[-1][0] <= term)
        ):  # one term (the common case): the decoder checked the seqs
            if not epochs or epochs[-1][0] != term:
                epochs.append((term, first.seq))
            meta.last = fresh[-1].seq
        else:
            for rec in fresh:
                meta.append_term(rec.term, rec.seq)
    match = prev + len(records)
    before = meta.commit
    meta.commit = max(meta.commit, min(section.commit, match))
    return AppendPlan(
        pp.AppendStatus.OK,
        match=match,
        truncate_after=truncate_after,
        records=fresh,
        promise_changed=changed,
        commit_from=before,
        commit_to=meta.commit,
    )


def _first_seq(epoch: tuple[int, int]) -> int:
    return epoch[1]
