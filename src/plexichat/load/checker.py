"""``plexichat-check``: verify that every acknowledged message is stored exactly once.

Reads the load generator's journal, fetches every journalled channel back
from its owner (FETCH, paginated; optionally from the replicas too) and
reports:

* ``lost``: acknowledged messages that the owner does not have;
* ``duplicated``: acknowledged messages stored more than once on the owner;
* ``reordered``: pairs of consecutive messages of one sender in one channel
  whose stored sequence numbers do not increase with the sender's counter;
* ``seq_mismatch``: messages stored under another sequence number than the
  one in their ACK;
* ``shared_seq``: acknowledged messages whose sequence number the owner also
  stores for another message (two messages at one position);
* ``gaps``: sequence numbers below a channel's highest that its owner holds
  no message at (a reader waits for them forever);
* ``replica_missing``: with ``--replicas``, acknowledged messages missing on
  a replica of their channel;
* ``divergence``: with ``--replicas``, positions (channel, seq) at which a
  replica's history differs from the owner's (another message, or a message
  on one side only).

Every count above is a violation: the verdict (``ok``) holds only when all
are 0.  A chat user would call each of them wrong.

Exit status: 0 when every count is 0, 1 otherwise, 2 on usage or connection
errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from plexichat.load import journal as jr
from plexichat.load.client import NodeClient, cluster_view, connect_all
from plexichat.node import auth
from plexichat.node.auth import Credentials
from plexichat.node.server import parse_address
from plexichat.routing import Ring

# channel -> list of (seq, msg_id) stored on one node
Stored = Mapping[int, Sequence[tuple[int, bytes]]]


@dataclass
class CheckResult:
    acked: int = 0
    present: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    seq_mismatch: int = 0
    shared_seq: int = 0
    channels: int = 0
    gaps: int = 0
    replica_missing: int = 0
    divergence: int = 0
    replicas_checked: bool = False
    examples: dict[str, list[str]] = field(default_factory=dict)

    def violations(self) -> dict[str, int]:
        """The non-zero violation counts (empty when the run is correct)."""
        return {k: getattr(self, k) for k in VIOLATIONS if getattr(self, k)}

    @property
    def ok(self) -> bool:
        return not self.violations()

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        doc["violations"] = self.violations()
        return doc


# Every count a correct run has at 0 (the verdict and the lab's reports use it).
VIOLATIONS: Final = (
    "lost",
    "duplicated",
    "reordered",
    "seq_mismatch",
    "shared_seq",
    "gaps",
    "replica_missing",
    "divergence",
)


def _example(result: CheckResult, kind: str, text: str, limit: int = 5) -> None:
    bucket = result.examples.setdefault(kind, [])
    if len(bucket) < limit:
        bucket.append(text)


def check(
    entries: Iterable[jr.Entry],
    owner_rows: Stored,
    replica_rows: Sequence[Stored] = (),
) -> CheckResult:
    """Compare journal *entries* with what the owners (and replicas) store."""
    result = CheckResult(replicas_checked=bool(replica_rows))
    by_channel: dict[int, list[jr.Entry]] = defaultdict(list)
    for entry in entries:
        by_channel[entry.channel].append(entry)
        result.acked += 1
    result.channels = len(by_channel)
    for channel, acked in by_channel.items():
        occurrences: dict[bytes, list[int]] = defaultdict(list)
        holders: dict[int, int] = defaultdict(int)
        for seq, msg_id in owner_rows.get(channel, ()):
            occurrences[msg_id].append(seq)
            holders[seq] += 1
        if holders:
            missing = max(holders) - len(holders)
            if missing:
                result.gaps += missing
                _example(
                    result,
                    "gaps",
                    f"channel {channel}: {missing} of seqs 1..{max(holders)} empty",
                )
        stored_seq: dict[bytes, int] = {}
        for entry in acked:
            seqs = occurrences.get(entry.msg_id)
            if not seqs:
                result.lost += 1
                _example(
                    result,
                    "lost",
                    f"{entry.msg_id.hex()} channel {channel} seq {entry.seq}",
                )
                continue
            result.present += 1
            if len(seqs) > 1:
                result.duplicated += 1
                _example(
                    result, "duplicated", f"{entry.msg_id.hex()} at seqs {sorted(seqs)}"
                )
            stored_seq[entry.msg_id] = min(seqs)
            if holders[min(seqs)] > 1:
                result.shared_seq += 1
                _example(
                    result,
                    "shared_seq",
                    f"{entry.msg_id.hex()} shares seq {min(seqs)} in channel {channel}",
                )
            if entry.seq not in seqs:
                result.seq_mismatch += 1
                _example(
                    result,
                    "seq_mismatch",
                    f"{entry.msg_id.hex()} acked at {entry.seq}, stored at {seqs}",
                )
        by_sender: dict[int, list[jr.Entry]] = defaultdict(list)
        for entry in acked:
            if entry.msg_id in stored_seq:
                by_sender[entry.sender].append(entry)
        for sender, sent in by_sender.items():
            sent.sort(key=lambda e: e.counter)
            previous = -1
            for entry in sent:
                seq = stored_seq[entry.msg_id]
                if seq <= previous:
                    result.reordered += 1
                    _example(
                        result,
                        "reordered",
                        f"sender {sender:x} counter {entry.counter}: "
                        f"seq {seq} <= {previous}",
                    )
                previous = seq
        owner_history = _positions(owner_rows.get(channel, ())) if replica_rows else {}
        for rows in replica_rows:
            if channel not in rows:
                continue  # this replica does not hold the channel
            copy = rows[channel]
            have = {msg_id for _, msg_id in copy}
            result.replica_missing += sum(1 for e in acked if e.msg_id not in have)
            replica_history = _positions(copy)
            differ = sorted(
                seq
                for seq in owner_history.keys() | replica_history.keys()
                if owner_history.get(seq) != replica_history.get(seq)
            )
            if differ:
                result.divergence += len(differ)
                _example(
                    result,
                    "divergence",
                    f"channel {channel}: a replica differs at seqs {differ[:5]}",
                )
    return result


def _positions(rows: Iterable[tuple[int, bytes]]) -> dict[int, frozenset[bytes]]:
    """seq -> the message ids stored there (one, in a correct history)."""
    out: dict[int, set[bytes]] = defaultdict(set)
    for seq, msg_id in rows:
        out[seq].add(msg_id)
    return {seq: frozenset(ids) for seq, ids in out.items()}


async def _fetch_channels(
    client: NodeClient, channels: Iterable[int], concurrency: int = 32
) -> dict[int, list[tuple[int, bytes]]]:
    out: dict[int, list[tuple[int, bytes]]] = {}
    queue = list(channels)

    async def worker() -> None:
        while queue:
            channel = queue.pop()
            records = await client.fetch_all(channel)
            out[channel] = [(r.seq, r.msg_id) for r in records]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def _wait_for_lagging_replicas(
    pairs: list[tuple[NodeClient, list[int]]],
    replica_rows: list[dict[int, list[tuple[int, bytes]]]],
    owner_rows: Stored,
    timeout: float = 5.0,
) -> None:
    """Read again, for up to *timeout* seconds, the replica histories that are
    a strict prefix of the owner's: a replica learns the owner's commit with
    its next APPEND, so right after the load it may show a shorter committed
    history.  Histories that differ otherwise are left as read (they count)."""
    deadline = time.monotonic() + timeout
    while True:
        lagging = [
            (i, channel)
            for i, rows in enumerate(replica_rows)
            for channel, history in rows.items()
            if len(history) < len(owner_rows.get(channel, ()))
            and owner_rows[channel][: len(history)] == history
        ]
        if not lagging or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.1)
        again = await asyncio.gather(
            *(_fetch_channels(pairs[i][0], [c], concurrency=1) for i, c in lagging)
        )
        for (i, channel), part in zip(lagging, again, strict=True):
            replica_rows[i][channel] = part[channel]


async def run_check(
    nodes: list[tuple[str, int]],
    journal_path: Path,
    *,
    replicas: bool = False,
    credentials: Credentials | None = None,
) -> CheckResult:
    """Fetch what the journal needs from the cluster and check it (reading as
    a client of the cluster whose *credentials* are given)."""
    entries = list(jr.read(journal_path))
    channels = sorted({e.channel for e in entries})
    token = None if credentials is None else credentials.token(1)
    clients = await connect_all(nodes, token=token)
    try:
        live, r, by_id = await cluster_view(clients)
        ring = Ring(live)
        r = min(r, len(live))
        wanted: dict[str, list[int]] = defaultdict(list)  # owner -> channels
        wanted_replicas: dict[str, list[int]] = defaultdict(list)
        for channel in channels:
            owners = ring.owners(channel, r)
            wanted[owners[0]].append(channel)
            for replica in owners[1:]:
                wanted_replicas[replica].append(channel)
        missing = [n for n in wanted if n not in by_id]
        if missing:
            raise RuntimeError(
                f"owners {missing} are not among the given node addresses"
            )
        owner_rows: dict[int, list[tuple[int, bytes]]] = {}
        fetched = await asyncio.gather(
            *(_fetch_channels(by_id[n], ch) for n, ch in wanted.items())
        )
        for part in fetched:
            owner_rows.update(part)
        replica_rows: list[dict[int, list[tuple[int, bytes]]]] = []
        if replicas:
            pairs = [(by_id[n], ch) for n, ch in wanted_replicas.items() if n in by_id]
            parts = await asyncio.gather(*(_fetch_channels(c, ch) for c, ch in pairs))
            replica_rows = list(parts)  # one history per replica node
            await _wait_for_lagging_replicas(pairs, replica_rows, owner_rows)
        return check(entries, owner_rows, replica_rows)
    finally:
        for c in clients:
            await c.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plexichat-check",
        description="Check a load journal against the cluster: lost, duplicated, "
        "reordered or misplaced messages, gaps and (with --replicas) replicas that "
        "disagree with their owner.  Exits 1 on any of them.",
    )
    parser.add_argument(
        "--nodes", required=True, help="comma-separated HOST:PORT of the nodes"
    )
    parser.add_argument(
        "--journal", required=True, type=Path, help="journal written by plexichat-load"
    )
    parser.add_argument(
        "--replicas",
        action="store_true",
        help="also read every replica and compare its history with the owner's",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write the result as JSON here"
    )
    parser.add_argument(
        "--secret-file", type=Path, default=None, help=auth.SECRET_FILE_HELP
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        nodes = [parse_address(n) for n in args.nodes.split(",") if n.strip()]
        creds = auth.credentials_from(args.secret_file)
        result = asyncio.run(
            run_check(nodes, args.journal, replicas=args.replicas, credentials=creds)
        )
    except (OSError, ValueError, RuntimeError, TimeoutError) as exc:
        print(f"plexichat-check: {exc}", file=sys.stderr)
        return 2
    doc = result.as_dict()
    text = json.dumps(doc, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
