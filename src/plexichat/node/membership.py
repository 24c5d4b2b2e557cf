"""SWIM-style membership: probes, indirect probes, suspicion and gossip.

Every ``interval`` seconds a node probes one member (round robin over a
shuffled list) with PING; without a PONG within ``ping_timeout`` it asks
``indirect`` other members to probe the target for it (GOSSIP ``ping-req``).
If nobody reaches the target it becomes *suspect*; a suspect that does not
refute within ``suspect_timeout`` becomes *dead*.  A member refutes a
suspicion about itself by raising its incarnation number.  Updates
``(id, host, port, incarnation, status, weight)`` ride piggyback on every
PING/PONG (each retransmitted ``~3 log2 n`` times); joins and a periodic
anti-entropy exchange carry the full table.

Precedence of updates about one member: a higher incarnation wins; with equal
incarnations ``left > dead > suspect > alive``.  Incarnations start at the
node's start time in milliseconds, so a restarted node overrides its own
tombstone without having to learn it first.

Every member entry that arrives (PING/PONG piggyback, GOSSIP join, sync
and leave) is checked by :func:`check_update` before it is applied: a node
id of 1 .. 64 printable characters, a host that is an IP literal or a
hostname of at most 253 characters, a port in 1 .. 65535, an incarnation in
0 .. 2**63-1, a known status and a finite weight in (0, 1e6].  Invalid
entries are dropped (counted in ``invalid_updates`` and logged, at most one
warning every 10 s), the valid ones of the same message still apply.  A
node keeps at most ``GossipConfig.max_members`` members (itself included):
updates about new members beyond that are dropped (``members_capped``).  A
member dead or left for ``GossipConfig.forget_after`` seconds is removed
from the table (``forgotten``); for as long again, news of it as dead or
left at the same or a lower incarnation is ignored, so that peers that have
not forgotten it yet do not bring it back (news of it alive, or at a higher
incarnation, adds it again).

Suspicion timeouts (and the node's leases and fences) read time from a
:class:`Clock`: the monotonic clock in a real node, a clock that a test moves
by hand in an in-process cluster (so that a stall of the shared event loop
cannot expire a lease or a suspicion the test did not mean to).  Waiting
(probe intervals, ping timeouts) stays on the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, cast

from plexichat.wire import MessageType

Status = Literal["alive", "suspect", "dead", "left"]
RANK: Final[dict[str, int]] = {"alive": 0, "suspect": 1, "dead": 2, "left": 3}
LIVE: Final = frozenset({"alive", "suspect"})
GONE: Final = frozenset({"dead", "left"})

# Valid member entries (docs/protocol.md, "GOSSIP (13), PING (17) -> PONG (18)")
MAX_ID_CHARS: Final = 64  # a node id: 1 .. 64 printable characters
MAX_HOST_CHARS: Final = 253  # a hostname (RFC 1035) or an IP literal
MAX_WEIGHT: Final = 1_000_000.0  # weights are finite, in (0, MAX_WEIGHT]
INCARNATION_END: Final = 1 << 63  # incarnations are in 0 .. 2**63 - 1
_LABEL: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_WARN_EVERY: Final = 10.0  # seconds between warnings about dropped updates

log = logging.getLogger("plexichat.node.membership")


class Clock(Protocol):
    """Where the protocol reads the time (seconds, monotonic)."""

    def now(self) -> float:
        """The current time; only differences between two readings matter."""


class MonotonicClock:
    """The real clock: :func:`time.monotonic`."""

    def now(self) -> float:
        return time.monotonic()


MONOTONIC: Final = MonotonicClock()


class ManualClock:
    """A clock that moves only when told to (:meth:`advance`).

    In-process tests share one between their nodes: a scheduler stall of the
    shared event loop then cannot lapse a lease, end a fence or turn a suspect
    into a dead member; only the test's own :meth:`advance` can.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the time forward by *seconds* (never backwards)."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self._now += seconds


@dataclass
class GossipConfig:
    """Timing of the failure detector (seconds)."""

    interval: float = 0.5
    ping_timeout: float = 0.5
    suspect_timeout: float = 3.0
    indirect: int = 2
    sync_every: int = 10  # rounds between full-table exchanges
    max_piggyback: int = 16
    max_members: int = 256  # members kept (this node included); more are dropped
    forget_after: float = 60.0  # a member dead or left this long is removed


@dataclass
class Member:
    """One row of the membership table."""

    id: str
    host: str
    port: int
    incarnation: int
    status: Status
    weight: float = 1.0
    since: float = 0.0  # clock time of the last status change

    def update(self) -> list[Any]:
        return [
            self.id,
            self.host,
            self.port,
            self.incarnation,
            self.status,
            self.weight,
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": f"{self.host}:{self.port}",
            "incarnation": self.incarnation,
            "status": self.status,
            "weight": self.weight,
        }


class GossipTransport(Protocol):
    """How membership messages reach another node."""

    def gossip_call(
        self, host: str, port: int, type: int, body: dict[str, Any], timeout: float
    ) -> Awaitable[dict[str, Any] | None]:
        """Send PING or GOSSIP; return the reply body, or None on failure."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def valid_host(host: str) -> bool:
    """Is *host* an IP literal or a hostname (dot-separated labels of letters,
    digits, ``-`` and ``_``, 1 .. 63 characters each, no ``-`` at either end)
    of at most 253 characters?"""
    if not 0 < len(host) <= MAX_HOST_CHARS:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return all(_LABEL.match(label) for label in host.split("."))
    return True


def check_update(raw: Any) -> Member | str:
    """A member update ``[id, host, port, incarnation, status, weight]`` as a
    Member, or the reason it is invalid."""
    if not isinstance(raw, list | tuple) or len(raw) != 6:
        return f"not a 6-item list: {_show(raw)}"
    node_id, host, port, inc, status, weight = raw
    if (
        type(node_id) is not str
        or not 0 < len(node_id) <= MAX_ID_CHARS
        or not node_id.isprintable()
    ):
        return f"node id must be 1 .. {MAX_ID_CHARS} printable characters: " + _show(
            node_id
        )
    if type(host) is not str or not valid_host(host):
        return f"member {node_id}: host is not an IP or a hostname: {_show(host)}"
    if type(port) is not int or not 1 <= port <= 65535:
        return f"member {node_id}: port outside 1 .. 65535: {_show(port)}"
    if type(inc) is not int or not 0 <= inc < INCARNATION_END:
        return f"member {node_id}: incarnation outside 0 .. 2**63-1: {_show(inc)}"
    if type(status) is not str or status not in RANK:
        return f"member {node_id}: unknown status {_show(status)}"
    # (NaN and infinities fail the comparison; no float() of a huge int first)
    if type(weight) not in (int, float) or not 0 < weight <= MAX_WEIGHT:
        return f"member {node_id}: weight outside (0, {MAX_WEIGHT:g}]: {_show(weight)}"
    return Member(node_id, host, port, inc, cast("Status", status), float(weight))


def parse_update(raw: Any) -> Member | None:
    """A piggybacked update as a Member, or None when it is invalid
    (:func:`check_update` says why)."""
    member = check_update(raw)
    return member if isinstance(member, Member) else None


class Membership:
    """The membership table of one node and its failure detector."""

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int,
        transport: GossipTransport,
        *,
        weight: float = 1.0,
        config: GossipConfig | None = None,
        on_change: Callable[[], None] | None = None,
        seeds: Sequence[tuple[str, int]] = (),
        clock: Clock = MONOTONIC,
    ) -> None:
        own = check_update([node_id, host, port, 0, "alive", weight])
        if isinstance(own, str):
            raise ValueError(f"this node's own member entry is invalid: {own}")
        self.id = node_id
        self.clock = clock
        self.config = config or GossipConfig()
        self.transport = transport
        self.on_change = on_change
        self.seeds = [s for s in seeds if s != (host, port)]
        now = clock.now()
        self.me = Member(
            node_id, host, port, time.time_ns() // 1_000_000, "alive", weight, now
        )
        self.members: dict[str, Member] = {node_id: self.me}
        # forgotten members: id -> (incarnation, clock time it was forgotten)
        self.forgotten: dict[str, tuple[int, float]] = {}
        self._warned = -math.inf  # time.monotonic() of the last drop warning
        self._gossip: dict[str, tuple[list[Any], int]] = {}
        self._order: list[str] = []
        self._round = 0
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self.counters = {
            "pings": 0,
            "ping_failures": 0,
            "indirect": 0,
            "suspected": 0,
            "declared_dead": 0,
            "held_suspect": 0,
            "refuted": 0,
            "joins": 0,
            "invalid_updates": 0,  # member entries that failed check_update
            "members_capped": 0,  # new members dropped at max_members
            "forgotten": 0,  # dead or left members removed after forget_after
        }
        self._queue(self.me)

    # -- views --------------------------------------------------------------

    def live(self) -> dict[str, float]:
        """``{id: weight}`` of alive and suspect members (the routing set)."""
        return {m.id: m.weight for m in self.members.values() if m.status in LIVE}

    def quorum(self) -> tuple[int, int]:
        """``(live, voters)``: live members and members that have not left.

        A node may own channels only while ``2 * live > voters``: the minority
        side of a partition stops accepting writes instead of forking history.
        """
        voters = [m for m in self.members.values() if m.status != "left"]
        return sum(m.status in LIVE for m in voters), len(voters)

    def _routing_state(self) -> tuple[dict[str, float], tuple[int, int]]:
        return self.live(), self.quorum()

    def has_quorum(self) -> bool:
        live, voters = self.quorum()
        return 2 * live > voters

    def view(self) -> list[dict[str, Any]]:
        return [m.as_dict() for m in sorted(self.members.values(), key=lambda m: m.id)]

    def address(self, node_id: str) -> tuple[str, int] | None:
        member = self.members.get(node_id)
        return (member.host, member.port) if member is not None else None

    def table(self) -> list[list[Any]]:
        return [m.update() for m in self.members.values()]

    # -- merging ------------------------------------------------------------

    def _queue(self, member: Member) -> None:
        self._gossip[member.id] = (member.update(), 0)

    def _retransmit_limit(self) -> int:
        return 3 * math.ceil(math.log2(len(self.members) + 1)) + 2

    def piggyback(self) -> list[list[Any]]:
        """Updates to attach to an outgoing message (fewest transmissions first)."""
        if not self._gossip:
            return []
        limit = self._retransmit_limit()
        chosen = sorted(self._gossip.items(), key=lambda kv: kv[1][1])
        out: list[list[Any]] = []
        for node_id, (update, sent) in chosen[: self.config.max_piggyback]:
            out.append(update)
            if sent + 1 >= limit:
                del self._gossip[node_id]
            else:
                self._gossip[node_id] = (update, sent + 1)
        return out

    def merge(self, updates: Any) -> bool:
        """Apply a list of updates; return True if the routing set changed."""
        if not isinstance(updates, list):
            return False
        before = self._routing_state()
        counters = self.counters
        capped = counters["members_capped"]
        invalid = 0
        reason = ""
        for raw in updates:
            member = check_update(raw)
            if isinstance(member, str):
                invalid += 1
                reason = reason or member
            else:
                self._apply(member)
        capped = counters["members_capped"] - capped
        if invalid or capped:
            counters["invalid_updates"] += invalid
            self._warn_dropped(invalid, reason, capped)
        changed = self._routing_state() != before
        if changed and self.on_change is not None:
            self.on_change()
        return changed

    def _warn_dropped(self, invalid: int, reason: str, capped: int) -> None:
        """Log dropped updates (at most one warning every ``_WARN_EVERY`` s:
        whoever sends them must not flood the log; the counters count all)."""
        now = time.monotonic()
        if now - self._warned < _WARN_EVERY:
            log.debug("dropped %d invalid, %d capped member updates", invalid, capped)
            return
        self._warned = now
        if invalid:
            log.warning(
                "dropped %d invalid member update(s) (first: %s); %d so far",
                invalid,
                reason,
                self.counters["invalid_updates"],
            )
        if capped:
            log.warning(
                "dropped %d new member(s): the table is full (max_members %d); "
                "%d so far",
                capped,
                self.config.max_members,
                self.counters["members_capped"],
            )

    def _apply(self, new: Member) -> None:
        if new.id == self.id:
            me = self.me
            newer = new.incarnation > me.incarnation
            accused = new.incarnation == me.incarnation and new.status != "alive"
            if (newer or accused) and (self._running or new.status != "left"):
                me.incarnation = new.incarnation + 1
                self.counters["refuted"] += 1
                self._queue(me)
            return
        current = self.members.get(new.id)
        if current is None:
            gone = self.forgotten.get(new.id)
            if gone is not None:
                if new.status in GONE and new.incarnation <= gone[0]:
                    return  # a peer that has not forgotten it yet
                del self.forgotten[new.id]
            if len(self.members) >= self.config.max_members:
                self.counters["members_capped"] += 1
                return
            new.since = self.clock.now()
            self.members[new.id] = new
            self._queue(new)
            if new.status in LIVE:
                log.info("member %s joined at %s:%d", new.id, new.host, new.port)
            return
        if new.incarnation < current.incarnation:
            return
        if (
            new.incarnation == current.incarnation
            and RANK[new.status] <= RANK[current.status]
        ):
            return
        if new.status != current.status:
            current.since = self.clock.now()
            log.info("member %s: %s -> %s", new.id, current.status, new.status)
        current.incarnation = new.incarnation
        current.status = new.status
        current.host, current.port, current.weight = new.host, new.port, new.weight
        self._queue(current)

    def _set_status(self, member: Member, status: Status) -> None:
        before = self._routing_state()
        member.status = status
        member.since = self.clock.now()
        self._queue(member)
        log.info(
            "member %s is %s (incarnation %d)", member.id, status, member.incarnation
        )
        if self._routing_state() != before and self.on_change is not None:
            self.on_change()

    # -- handlers (called by the node for incoming frames) --------------------

    def handle_ping(self, body: dict[str, Any]) -> dict[str, Any]:
        self.merge(body.get("updates"))
        return {"from": self.id, "updates": self.piggyback()}

    async def handle_gossip(self, body: dict[str, Any]) -> dict[str, Any]:
        kind = body.get("kind")
        if kind == "join":
            self.counters["joins"] += 1
            self.merge([body.get("member")])
            return {"members": self.table()}
        if kind == "sync":
            self.merge(body.get("members"))
            return {"members": self.table()}
        if kind == "leave":
            self.merge([body.get("member")])
            return {"ok": True}
        if kind == "ping-req":
            target = self.members.get(str(body.get("target")))
            if target is None:
                return {"ok": False}
            reply = await self._ping(target)
            return {"ok": reply}
        raise ValueError(f"unknown gossip kind {kind!r}")

    # -- failure detector -----------------------------------------------------

    async def _ping(self, target: Member) -> bool:
        self.counters["pings"] += 1
        body = {"from": self.id, "updates": self.piggyback()}
        reply = await self.transport.gossip_call(
            target.host, target.port, MessageType.PING, body, self.config.ping_timeout
        )
        if reply is None:
            self.counters["ping_failures"] += 1
            return False
        self.merge(reply.get("updates"))
        return True

    async def ping(self, node_id: str) -> bool:
        """PING one member now (outside the probe rotation); True if it answered."""
        member = self.members.get(node_id)
        if member is None or member.id == self.id:
            return False
        return await self._ping(member)

    def status(self, node_id: str) -> Status | None:
        member = self.members.get(node_id)
        return None if member is None else member.status

    def _next_target(self) -> Member | None:
        while self._order:
            member = self.members.get(self._order.pop())
            if member is not None and member.status in LIVE and member.id != self.id:
                return member
        candidates = [
            m.id for m in self.members.values() if m.status in LIVE and m.id != self.id
        ]
        if not candidates:
            return None
        random.shuffle(candidates)
        self._order = candidates
        return self.members[self._order.pop()]

    async def probe(self, target: Member) -> None:
        """One SWIM probe of *target* (direct, then indirect)."""
        if await self._ping(target):
            return
        helpers = [
            m
            for m in self.members.values()
            if m.status == "alive" and m.id not in (self.id, target.id)
        ]
        random.shuffle(helpers)
        helpers = helpers[: self.config.indirect]
        if helpers:
            self.counters["indirect"] += 1
            body = {"kind": "ping-req", "target": target.id}
            replies = await asyncio.gather(
                *(
                    self.transport.gossip_call(
                        h.host,
                        h.port,
                        MessageType.GOSSIP,
                        body,
                        self.config.ping_timeout * 2,
                    )
                    for h in helpers
                )
            )
            if any(r is not None and r.get("ok") for r in replies):
                return
        if target.status == "alive" and self.members.get(target.id) is target:
            self.counters["suspected"] += 1
            self._set_status(target, "suspect")

    def expire_suspects(self) -> None:
        """Declare dead the suspects that did not refute in time.

        Never below a majority: a node that has lost most of its peers is more
        likely the one cut off, so it keeps them as suspects (its ring stays
        as it was and its lease lapses) instead of declaring the majority dead
        and spreading that after the partition heals.
        """
        now = self.clock.now()
        for member in list(self.members.values()):
            if (
                member.status == "suspect"
                and now - member.since >= self.config.suspect_timeout
            ):
                voters = [m for m in self.members.values() if m.status != "left"]
                alive = sum(m.status == "alive" for m in voters)
                if 2 * alive <= len(voters):  # no majority answers this node
                    # and when one does again, the suspect gets a full
                    # timeout to refute (not the time spent cut off)
                    self.counters["held_suspect"] += 1
                    member.since = now
                    continue
                self.counters["declared_dead"] += 1
                self._set_status(member, "dead")

    def forget_gone(self) -> list[str]:
        """Remove the members dead or left for ``forget_after`` seconds (and
        the tombstones that old); return the ids removed.

        Safe for the majority rule: a dead member was declared dead by a node
        that had a majority (see :meth:`expire_suspects`), and every node
        that forgets it shrinks the same voter set by the same member.
        """
        now = self.clock.now()
        limit = self.config.forget_after
        for node_id, (_inc, at) in list(self.forgotten.items()):
            if now - at >= limit:
                del self.forgotten[node_id]
        gone = [
            m
            for m in self.members.values()
            if m.status in GONE and m.id != self.id and now - m.since >= limit
        ]
        if not gone:
            return []
        before = self._routing_state()
        for member in gone:
            del self.members[member.id]
            self._gossip.pop(member.id, None)
            self.forgotten[member.id] = (member.incarnation, now)
            log.info(
                "forgot member %s (%s for %.0f s)",
                member.id,
                member.status,
                now - member.since,
            )
        while len(self.forgotten) > self.config.max_members:
            del self.forgotten[next(iter(self.forgotten))]  # the oldest
        self.counters["forgotten"] += len(gone)
        if self._routing_state() != before and self.on_change is not None:
            self.on_change()
        return [m.id for m in gone]

    async def join(self) -> bool:
        """Contact seeds (and known members) until one answers with its table."""
        targets = list(self.seeds)
        targets += [(m.host, m.port) for m in self.members.values() if m.id != self.id]
        body = {"kind": "join", "member": self.me.update()}
        joined = False
        for host, port in dict.fromkeys(targets):
            reply = await self.transport.gossip_call(
                host, port, MessageType.GOSSIP, body, self.config.ping_timeout * 3
            )
            if reply is not None:
                self.merge(reply.get("members"))
                joined = True
        return joined

    async def sync(self) -> None:
        """Anti-entropy: exchange full tables with one random live member."""
        peers = [
            m for m in self.members.values() if m.status in LIVE and m.id != self.id
        ]
        if not peers:
            return
        peer = random.choice(peers)
        reply = await self.transport.gossip_call(
            peer.host,
            peer.port,
            MessageType.GOSSIP,
            {"kind": "sync", "members": self.table()},
            self.config.ping_timeout * 3,
        )
        if reply is not None:
            self.merge(reply.get("members"))

    async def _run(self) -> None:
        config = self.config
        while self._running:
            started = time.monotonic()
            try:
                if len(self.live()) <= 1:
                    await self.join()
                else:
                    target = self._next_target()
                    if target is not None:
                        await self.probe(target)
                    self._round += 1
                    if self._round % config.sync_every == 0:
                        await self.sync()
                self.expire_suspects()
                self.forget_gone()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the detector die
                log.exception("membership round failed")
            await asyncio.sleep(
                max(0.0, config.interval - (time.monotonic() - started))
            )

    def start(self) -> None:
        self._running = True
        self._task = asyncio.create_task(self._run(), name=f"swim-{self.id}")

    async def stop(self, *, leave: bool = True, timeout: float = 1.0) -> None:
        """Stop probing; with *leave*, tell every live member that we left."""
        self._running = False
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our caller was cancelled too: do not swallow it
            except Exception as exc:  # a crashed loop: still leave cleanly
                log.warning("the membership loop had failed: %r", exc)
            self._task = None
        if not leave:
            return
        self.me.incarnation += 1
        self.me.status = "left"
        body = {"kind": "leave", "member": self.me.update()}
        peers = [
            m for m in self.members.values() if m.status in LIVE and m.id != self.id
        ]
        await asyncio.gather(
            *(
                self.transport.gossip_call(
                    m.host, m.port, MessageType.GOSSIP, body, timeout
                )
                for m in peers
            )
        )
