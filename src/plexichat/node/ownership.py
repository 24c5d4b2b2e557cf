"""Per-channel ownership terms and log truncation: a pure state machine (issue 11).

This is the specification the node follows (``node/order.py``,
``node/channels.py`` and ``node/writes.py`` implement it with the log in the
store); ``docs/design/channel-order.md`` describes both and
``tests/node/test_ownership_sim.py`` checks this model under simulated faults.

One :class:`ChannelReplica` is one node's view of one channel.  It does no I/O
and reads no clock: every method returns *effects* (messages to send, client
ACKs/refusals, DELIVERs) that the caller carries out, and all retries are
driven by the caller through :meth:`ChannelReplica.tick`.  State in
:class:`Durable` must be on disk before the returned messages are sent.

The model is Raft's terms plus Kafka's leader epochs (KIP-101):

* A term is started by a candidate with a *config* (owner first, then the
  replicas).  PREPARE goes to every cluster member; a majority of the cluster
  must PROMISE (they refuse lower terms from then on), and at least one member
  of the highest config any promiser ACCEPTed must be among them.
* The candidate adopts the longest log (by last ``(term, seq)``) of those
  members, installs it on its own replicas (APPEND, truncating conflicting
  tails) and asks the cluster to ACCEPT the new config; on a majority it is
  the owner and everything it installed is committed.
* The owner APPENDs records ``(term, seq = last + 1, msg_id)``; a record is
  committed once every member of the config stored it (write-all, read-one).
  Only committed records are visible (FETCH, DELIVER) and acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

Epochs = tuple[tuple[int, int], ...]
"""Epoch boundaries of a log: ``(term, first seq of that term)``, increasing."""


class SafetyError(AssertionError):
    """A transition would break an invariant (a bug in the protocol or caller)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One log record: the owner's term when it was appended, its seq, its id."""

    term: int
    seq: int
    msg_id: bytes


@dataclass(frozen=True, slots=True)
class Config:
    """The replica set of a term, owner first."""

    term: int
    members: tuple[str, ...]


# -- messages (node -> node) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prepare:
    """Candidate -> every cluster member: promise *term*; my log is *epochs*."""

    channel: int
    src: str
    dst: str
    term: int
    epochs: Epochs
    last_seq: int


@dataclass(frozen=True, slots=True)
class Promise:
    """Reply to PREPARE.  ``base`` is the length of the common prefix with the
    candidate's log and ``tail`` the replier's records after it."""

    channel: int
    src: str
    dst: str
    term: int
    ok: bool
    promised: int
    accepted: Config | None
    epochs: Epochs
    last_seq: int
    commit: int
    base: int
    tail: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class Append:
    """Owner (or installing candidate) -> replica, like Raft's AppendEntries."""

    channel: int
    src: str
    dst: str
    term: int
    prev_term: int
    prev_seq: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class AppendReply:
    """``ok``: the replica's log matches the owner's up to ``match``.
    ``refused``: the replica promised another term (or another candidate of
    this one).  Otherwise ``epochs``/``last_seq`` locate the divergence."""

    channel: int
    src: str
    dst: str
    term: int
    ok: bool
    refused: bool
    promised: int
    match: int
    epochs: Epochs
    last_seq: int


@dataclass(frozen=True, slots=True)
class Accept:
    """Candidate -> every cluster member: record *config* as the channel's."""

    channel: int
    src: str
    dst: str
    config: Config


@dataclass(frozen=True, slots=True)
class Accepted:
    channel: int
    src: str
    dst: str
    term: int
    ok: bool
    promised: int


Message = Prepare | Promise | Append | AppendReply | Accept | Accepted

# -- local effects -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """Tell the client *msg_id* is committed at *seq*."""

    channel: int
    msg_id: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class Refuse:
    """Tell the client *msg_id* was not acknowledged here (it may retry)."""

    channel: int
    msg_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """Newly committed records, in seq order: push them to subscribers."""

    channel: int
    entries: tuple[Entry, ...]


Effect = Message | Ack | Refuse | Deliver


class Role(Enum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"  # collecting promises
    SYNCING = "syncing"  # installing the adopted log on its replicas
    ACTIVATING = "activating"  # asking the cluster to accept the config
    OWNER = "owner"


@dataclass(slots=True)
class Durable:
    """What a node must keep across restarts, per channel."""

    promised: int = 0
    promised_to: str | None = None
    accepted: Config | None = None
    log: list[Entry] = field(default_factory=list)
    commit: int = 0


# -- log helpers ---------------------------------------------------------------


def epochs_of(log: Sequence[Entry]) -> Epochs:
    """Epoch boundaries of *log* (KIP-101's leader-epoch cache)."""
    out: list[tuple[int, int]] = []
    for e in log:
        if not out or out[-1][0] != e.term:
            out.append((e.term, e.seq))
    return tuple(out)


def _spans(epochs: Epochs, last_seq: int) -> dict[int, int]:
    """term -> last seq of that term."""
    if not epochs:
        return {}
    ends = [start - 1 for _, start in epochs[1:]] + [last_seq]
    return {term: end for (term, _), end in zip(epochs, ends, strict=True)}


def common_prefix(a: Epochs, a_last: int, b: Epochs, b_last: int) -> int:
    """Length of the common prefix of two logs from their epoch boundaries.

    A ``(term, seq)`` names one record cluster-wide (one owner per term, which
    never reuses a seq), so the logs agree up to the end of the last term both
    hold, capped by the shorter of the two (OffsetForLeaderEpoch)."""
    ends_b = _spans(b, b_last)
    best = 0
    for term, end in _spans(a, a_last).items():
        other = ends_b.get(term)
        if other is not None:
            best = max(best, min(end, other))
    return best


# -- the state machine ---------------------------------------------------------


class ChannelReplica:
    """One node's state for one channel (see the module docstring)."""

    def __init__(
        self,
        node: str,
        channel: int,
        cluster: Sequence[str],
        durable: Durable | None = None,
    ) -> None:
        if node not in cluster:
            raise ValueError(f"{node} is not in the cluster {cluster}")
        self.node = node
        self.channel = channel
        self.cluster = tuple(cluster)
        self.d = durable if durable is not None else Durable()
        self.role = Role.FOLLOWER
        self.config: Config | None = None  # the config this node is building/owns
        self.promises: dict[str, Promise] = {}
        self.accepts: set[str] = set()
        self.match: dict[str, int] = {}
        self.waiting: dict[bytes, int] = {}  # msg_id -> seq, not yet acked
        self.seen = self.d.promised  # highest term heard of (next candidacy > it)
        self._index = {e.msg_id: e.seq for e in self.d.log}

    # -- views -------------------------------------------------------------

    @property
    def term(self) -> int:
        return self.d.promised

    @property
    def log(self) -> Sequence[Entry]:
        return self.d.log

    @property
    def commit(self) -> int:
        return self.d.commit

    def visible(self) -> tuple[Entry, ...]:
        """The committed prefix: what FETCH may return."""
        return tuple(self.d.log[: self.d.commit])

    def owner_hint(self) -> str | None:
        """Where to forward a write: this node if it owns, else the last
        accepted config's owner."""
        if self.role is Role.OWNER:
            return self.node
        acc = self.d.accepted
        return acc.members[0] if acc is not None else None

    def _term_at(self, seq: int) -> int:
        return self.d.log[seq - 1].term if seq > 0 else 0

    def _quorum(self) -> int:
        return len(self.cluster) // 2 + 1

    # -- log mutation ------------------------------------------------------

    def _truncate(self, length: int) -> None:
        if length < self.d.commit:
            raise SafetyError(
                f"{self.node}: truncating to {length} below commit {self.d.commit}"
            )
        if length < len(self.d.log):
            del self.d.log[length:]
            self._index = {e.msg_id: e.seq for e in self.d.log}

    def _append(self, e: Entry) -> None:
        if e.seq != len(self.d.log) + 1:
            raise SafetyError(f"{self.node}: append at {e.seq}, log {len(self.d.log)}")
        if self.d.log and e.term < self.d.log[-1].term:
            raise SafetyError(f"{self.node}: term {e.term} after a higher one")
        if e.msg_id in self._index:
            raise SafetyError(f"{self.node}: {e.msg_id!r} already in the log")
        self.d.log.append(e)
        self._index[e.msg_id] = e.seq

    def _set_commit(self, commit: int) -> list[Effect]:
        old = self.d.commit
        commit = min(commit, len(self.d.log))
        if commit <= old:
            return []
        self.d.commit = commit
        out: list[Effect] = [Deliver(self.channel, tuple(self.d.log[old:commit]))]
        for msg_id, seq in list(self.waiting.items()):
            if seq <= commit:
                del self.waiting[msg_id]
                out.append(Ack(self.channel, msg_id, seq))
        return out

    # -- roles -------------------------------------------------------------

    def _step_down(self, reason: str) -> list[Effect]:
        out: list[Effect] = [
            Refuse(self.channel, m, reason) for m in sorted(self.waiting)
        ]
        self.role = Role.FOLLOWER
        self.config = None
        self.promises.clear()
        self.accepts.clear()
        self.match.clear()
        self.waiting.clear()
        return out

    def _observe(self, term: int, src: str) -> list[Effect]:
        """A valid message of *term* from *src*: promise it if it is newer."""
        self.seen = max(self.seen, term)
        if term > self.d.promised:
            self.d.promised, self.d.promised_to = term, src
            if self.role is not Role.FOLLOWER:
                return self._step_down(f"deposed by term {term}")
        return []

    def _allows(self, term: int, src: str) -> bool:
        d = self.d
        return term > d.promised or (term == d.promised and d.promised_to == src)

    def start_term(self, members: Sequence[str]) -> list[Effect]:
        """Become candidate for the next term with *members* (self first)."""
        members = tuple(members)
        if not members or members[0] != self.node or len(set(members)) != len(members):
            raise ValueError(f"bad config {members} for {self.node}")
        if not set(members) <= set(self.cluster):
            raise ValueError(f"config {members} outside the cluster")
        out = self._step_down("ownership is moving")
        term = max(self.d.promised, self.seen) + 1
        self.seen = term
        self.d.promised, self.d.promised_to = term, self.node
        self.role = Role.CANDIDATE
        self.config = Config(term, members)
        last_seq = len(self.d.log)
        self.promises[self.node] = Promise(
            self.channel, self.node, self.node, term, True, term,
            self.d.accepted, epochs_of(self.d.log), last_seq, self.d.commit,
            last_seq, (),
        )  # fmt: skip
        out += self._prepares()
        return out + self._try_adopt()

    def _prepares(self) -> list[Effect]:
        assert self.config is not None
        last_seq = len(self.d.log)
        epochs = epochs_of(self.d.log)
        return [
            Prepare(self.channel, self.node, n, self.config.term, epochs, last_seq)
            for n in self.cluster
            if n not in self.promises
        ]

    def _try_adopt(self) -> list[Effect]:
        """With a majority of promises and one from the last accepted config,
        adopt the best log and start installing it."""
        cfg = self.config
        assert cfg is not None
        assert self.role is Role.CANDIDATE
        if len(self.promises) < self._quorum():
            return []
        accepted = [p.accepted for p in self.promises.values() if p.accepted]
        latest = max(accepted, key=lambda c: c.term, default=None)
        if latest is None:
            pool = list(self.promises.values())  # nothing was ever committed
        else:
            pool = [p for p in self.promises.values() if p.src in latest.members]
        if not pool:
            return []  # wait for a member of the last config (tick re-asks)
        best = max(pool, key=lambda p: (p.epochs[-1][0] if p.epochs else 0, p.last_seq))
        commit = max(p.commit for p in self.promises.values())
        if best.src != self.node:
            self._truncate(best.base)
            for e in best.tail:
                self._append(e)
        if commit > len(self.d.log):
            raise SafetyError(f"{self.node}: adopted log shorter than commit {commit}")
        out = self._set_commit(commit)
        self.role = Role.SYNCING
        end = len(self.d.log)
        epochs = epochs_of(self.d.log)
        self.match = {m: 0 for m in cfg.members[1:]}
        for m in cfg.members[1:]:
            p = self.promises.get(m)
            start = (
                common_prefix(p.epochs, p.last_seq, epochs, end)
                if p is not None
                else self.d.commit
            )
            out.append(self._append_to(m, start))
        return out + self._try_activate()

    def _append_to(self, dst: str, start: int) -> Append:
        assert self.config is not None
        start = min(start, len(self.d.log))
        return Append(
            self.channel, self.node, dst, self.config.term, self._term_at(start),
            start, tuple(self.d.log[start:]), self.d.commit,
        )  # fmt: skip

    def _try_activate(self) -> list[Effect]:
        assert self.config is not None
        assert self.role is Role.SYNCING
        end = len(self.d.log)
        if any(v < end for v in self.match.values()):
            return []
        self.role = Role.ACTIVATING
        self.d.accepted = self.config
        self.accepts = {self.node}
        return self._accepts() + self._try_own()

    def _accepts(self) -> list[Effect]:
        assert self.config is not None
        return [
            Accept(self.channel, self.node, n, self.config)
            for n in self.cluster
            if n not in self.accepts
        ]

    def _try_own(self) -> list[Effect]:
        if len(self.accepts) < self._quorum():
            return []
        self.role = Role.OWNER
        # every member stores the whole log and the config is accepted by a
        # majority: any later owner adopts all of it, so it is committed
        out = self._set_commit(len(self.d.log))
        return out + self._heartbeats()

    def _heartbeats(self) -> list[Effect]:
        return [self._append_to(m, v) for m, v in sorted(self.match.items())]

    # -- writes ------------------------------------------------------------

    def submit(self, msg_id: bytes) -> list[Effect]:
        """A client write.  Retries of a stored *msg_id* wait for (or return)
        its one seq; a non-owner refuses (the caller forwards or errors)."""
        if self.role is not Role.OWNER:
            return [Refuse(self.channel, msg_id, f"not the owner ({self.role.value})")]
        cfg = self.config
        assert cfg is not None
        seq = self._index.get(msg_id)
        if seq is not None:
            if seq <= self.d.commit:
                return [Ack(self.channel, msg_id, seq)]
            self.waiting[msg_id] = seq
            return []
        prev = len(self.d.log)
        entry = Entry(cfg.term, prev + 1, msg_id)
        self._append(entry)
        self.waiting[msg_id] = entry.seq
        out: list[Effect] = [
            Append(self.channel, self.node, m, cfg.term, self._term_at(prev), prev,
                   (entry,), self.d.commit)
            for m in cfg.members[1:]
        ]  # fmt: skip
        return out + self._advance()

    def _advance(self) -> list[Effect]:
        """Owner: commit what every member stored; tell them the new commit."""
        end = len(self.d.log)
        done = min([end, *self.match.values()])
        out = self._set_commit(done)
        if out:
            out += self._heartbeats()
        return out

    # -- receiving -----------------------------------------------------------

    def receive(self, msg: Message) -> list[Effect]:
        if msg.dst != self.node or msg.channel != self.channel:
            raise ValueError(f"{msg} is not for {self.node}/{self.channel}")
        if isinstance(msg, Prepare):
            return self._on_prepare(msg)
        if isinstance(msg, Promise):
            return self._on_promise(msg)
        if isinstance(msg, Append):
            return self._on_append(msg)
        if isinstance(msg, AppendReply):
            return self._on_append_reply(msg)
        if isinstance(msg, Accept):
            return self._on_accept(msg)
        return self._on_accepted(msg)

    def _on_prepare(self, m: Prepare) -> list[Effect]:
        d = self.d
        last_seq = len(d.log)
        epochs = epochs_of(d.log)
        if not self._allows(m.term, m.src):
            return [
                Promise(self.channel, self.node, m.src, m.term, False, d.promised,
                        d.accepted, epochs, last_seq, d.commit, 0, ())
            ]  # fmt: skip
        out = self._observe(m.term, m.src)
        base = common_prefix(m.epochs, m.last_seq, epochs, last_seq)
        out.append(
            Promise(self.channel, self.node, m.src, m.term, True, d.promised,
                    d.accepted, epochs, last_seq, d.commit, base,
                    tuple(d.log[base:]))
        )  # fmt: skip
        return out

    def _on_promise(self, m: Promise) -> list[Effect]:
        cfg = self.config
        if cfg is None or m.term != cfg.term:
            return []  # a reply to an older candidacy
        if not m.ok:
            self.seen = max(self.seen, m.promised)
            return self._step_down(f"term {m.term} refused by {m.src}")
        if self.role is not Role.CANDIDATE or m.src in self.promises:
            return []
        self.promises[m.src] = m
        return self._try_adopt()

    def _on_append(self, m: Append) -> list[Effect]:
        d = self.d
        if not self._allows(m.term, m.src):
            return [self._reply(m, False, 0, refused=True)]
        out = self._observe(m.term, m.src)
        if m.prev_seq > len(d.log) or self._term_at(m.prev_seq) != m.prev_term:
            return [*out, self._reply(m, False, 0)]
        for i, e in enumerate(m.entries):
            if e.seq != m.prev_seq + 1 + i or e.term > m.term:
                raise SafetyError(f"malformed append {m}")
            if e.seq <= len(d.log):
                mine = d.log[e.seq - 1]
                if mine.term == e.term:
                    if mine.msg_id != e.msg_id:
                        raise SafetyError(f"log matching broken at {e} vs {mine}")
                    continue
                self._truncate(e.seq - 1)  # conflicting tail: truncate, never merge
            self._append(e)
        match = m.prev_seq + len(m.entries)
        out += self._set_commit(min(m.commit, match))
        out.append(self._reply(m, True, match))
        return out

    def _reply(
        self, m: Append, ok: bool, match: int, *, refused: bool = False
    ) -> AppendReply:
        return AppendReply(
            self.channel, self.node, m.src, m.term, ok, refused, self.d.promised, match,
            epochs_of(self.d.log), len(self.d.log),
        )  # fmt: skip

    def _on_append_reply(self, m: AppendReply) -> list[Effect]:
        cfg = self.config
        if cfg is None or m.term != cfg.term or m.src not in self.match:
            return []
        if self.role not in (Role.SYNCING, Role.ACTIVATING, Role.OWNER):
            return []
        if m.refused:
            self.seen = max(self.seen, m.promised)
            return self._step_down(f"append refused by {m.src}")
        if not m.ok:
            start = common_prefix(
                m.epochs, m.last_seq, epochs_of(self.d.log), len(self.d.log)
            )
            return [self._append_to(m.src, max(start, self.match[m.src]))]
        if m.match <= self.match[m.src]:
            return []
        self.match[m.src] = m.match
        if self.role is Role.SYNCING:
            return self._try_activate()
        if self.role is Role.OWNER:
            return self._advance()
        return []

    def _on_accept(self, m: Accept) -> list[Effect]:
        d = self.d
        term = m.config.term
        if not self._allows(term, m.src):
            return [Accepted(self.channel, self.node, m.src, term, False, d.promised)]
        out = self._observe(term, m.src)
        d.accepted = m.config
        out.append(Accepted(self.channel, self.node, m.src, term, True, d.promised))
        return out

    def _on_accepted(self, m: Accepted) -> list[Effect]:
        cfg = self.config
        if cfg is None or m.term != cfg.term or self.role is not Role.ACTIVATING:
            return []
        if not m.ok:
            self.seen = max(self.seen, m.promised)
            return self._step_down(f"config refused by {m.src}")
        self.accepts.add(m.src)
        return self._try_own()

    # -- retries -----------------------------------------------------------

    def tick(self) -> list[Effect]:
        """Re-send whatever is outstanding (the caller's timer)."""
        if self.role is Role.CANDIDATE:
            return self._prepares()
        if self.role is Role.SYNCING:
            end = len(self.d.log)
            return [self._append_to(n, v) for n, v in self.match.items() if v < end]
        if self.role is Role.ACTIVATING:
            return self._accepts()
        if self.role is Role.OWNER:
            return self._heartbeats()
        return []
