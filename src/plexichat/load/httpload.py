"""The HTTP chat load's bookkeeping, without Locust (``plexichat.load.locustfile``
runs it in Locust's users; this module imports neither Locust nor gevent).

* :class:`HttpLoadConfig`: the run's configuration, a JSON object in the file
  that ``PLEXICHAT_LOCUST_CONFIG`` names (no argv of its own: Locust owns the
  command line);
* :class:`Sender`: one simulated client, its own sender id and client token
  (from the cluster secret file, like ``plexichat-load --secret-file``), its
  message counter and the ``POST`` it sends next (``Idempotency-Key`` made of
  sender and counter, so the ``msg_id`` is known before the answer);
* :class:`Recorder`: the one writer of the run's journal (every ``201`` is an
  entry in the format of :mod:`plexichat.load.journal`, so the unchanged
  checker proves nothing acknowledged was lost, duplicated or reordered),
  the latency histogram, the per-second timeline and the report, with the
  keys of the binary generator's (``acked``, ``latency_ms``, ``timeline`` ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final, NamedTuple

from plexichat.load import journal as jr
from plexichat.load import report
from plexichat.node import auth
from plexichat.node.auth import Credentials
from plexichat.routing import key_of
from plexichat.stats import Histogram


def message_id(sender: int, key: str) -> bytes:
    """The msg_id the API stores a POST with *key* under (docs/http-api.md
    "Idempotency"; ``plexichat.api.app.message_id``, without importing FastAPI)."""
    return sender.to_bytes(8, "big") + hashlib.sha256(key.encode()).digest()[:8]


CONFIG_VAR: Final = "PLEXICHAT_LOCUST_CONFIG"
POST_NAME: Final = "/channels/[channel]/messages"
GET_NAME: Final = "/channels/[channel]/messages?after"


@dataclass
class HttpLoadConfig:
    """One HTTP load run (the JSON object of ``PLEXICHAT_LOCUST_CONFIG``)."""

    # base URLs of the nodes' APIs; user i talks to hosts[i % n] (the node
    # forwards to the channel's owner).  Empty: Locust's --host.
    hosts: list[str] = field(default_factory=list)
    secret_file: Path | None = None  # None: no token (an --insecure cluster)
    journal: Path | None = None  # every 201 is journaled here
    report: Path | None = None  # the run's report (JSON), written at the end
    channels: int = 256
    channel_prefix: str = "load"  # channel i is "<prefix>-<i>" (as plexichat-load)
    payload: int = 64  # bytes of text per message
    read_ratio: float = 0.05  # share of tasks that GET a page instead of POST
    page: int = 20  # limit of a GET
    timeout: float = 10.0  # seconds per request
    timeline_interval: float = 1.0
    seed: int | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> HttpLoadConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown HTTP load option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        values = dict(data)
        for name in ("secret_file", "journal", "report"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
        config = cls(**values)
        if config.channels < 1 or config.payload < 1 or config.page < 1:
            raise ValueError("channels, payload and page must be positive")
        if not 0.0 <= config.read_ratio <= 1.0:
            raise ValueError("read_ratio must be within 0 .. 1")
        return config

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HttpLoadConfig:
        """The configuration in the file ``PLEXICHAT_LOCUST_CONFIG`` names
        (the defaults without it)."""
        env = os.environ if environ is None else environ
        path = env.get(CONFIG_VAR)
        if not path:
            return cls()
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the HTTP load config must be a JSON object")
        return cls.from_mapping(data)

    def to_json(self) -> str:
        doc = {
            f.name: str(v) if isinstance(v := getattr(self, f.name), Path) else v
            for f in fields(self)
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    def credentials(self) -> Credentials | None:
        return auth.credentials_from(self.secret_file)


class Post(NamedTuple):
    """One POST a sender is about to make."""

    path: str
    body: bytes
    headers: dict[str, str]
    channel: int  # routing key of the channel name
    slot: int  # channel index
    counter: int
    msg_id: bytes  # what the node will store it under


class Sender:
    """One simulated client: its sender id, token, counter and last seqs."""

    def __init__(
        self,
        config: HttpLoadConfig,
        credentials: Credentials | None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.sender = self.rng.getrandbits(63) or 1
        self.token = (
            None if credentials is None else credentials.token(self.sender)
        )  # a client token: the node takes the sender from it
        self.counter = 0
        self.last_seq: dict[int, int] = {}  # channel index -> highest seq seen
        self.names = [f"{config.channel_prefix}-{i}" for i in range(config.channels)]
        self.keys = [key_of(n) for n in self.names]
        self.text = ("x" * config.payload).encode()

    def _headers(self) -> dict[str, str]:
        if self.token is None:
            return {}
        return {"Authorization": f"Bearer {self.token}"}

    def next_post(self) -> Post:
        self.counter += 1
        index = self.rng.randrange(self.config.channels)
        key = f"{self.sender:x}-{self.counter}"
        body = b'{"text":"%s","sender":%d}' % (self.text, self.sender)
        headers = {
            **self._headers(),
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        }
        return Post(
            f"/channels/{self.names[index]}/messages",
            body,
            headers,
            self.keys[index],
            index,
            self.counter,
            message_id(self.sender, key),
        )

    def created(self, post: Post, answer: Any) -> jr.Entry:
        """The journal entry of a ``201`` to *post* (ValueError: a wrong answer)."""
        if not isinstance(answer, dict):
            raise ValueError(f"201 without a JSON object: {answer!r}")
        seq = answer.get("seq")
        if not isinstance(seq, int) or seq < 1:
            raise ValueError(f"201 without a seq: {answer!r}")
        if answer.get("msg_id") != post.msg_id.hex():
            raise ValueError(
                f"201 for msg_id {answer.get('msg_id')}, sent {post.msg_id.hex()}"
            )
        if answer.get("sender") != self.sender:
            raise ValueError(f"201 as sender {answer.get('sender')}, not {self.sender}")
        self.last_seq[post.slot] = max(seq, self.last_seq.get(post.slot, 0))
        return jr.Entry(post.msg_id, post.channel, self.sender, post.counter, seq)

    def next_read(self) -> tuple[str, dict[str, str]]:
        """A GET of a page of a channel this sender posted to (or any)."""
        if self.last_seq:
            index = self.rng.choice(list(self.last_seq))
            after = max(0, self.last_seq[index] - self.config.page)
        else:
            index, after = self.rng.randrange(self.config.channels), 0
        path = f"/channels/{self.names[index]}/messages?after={after}"
        return f"{path}&limit={self.config.page}", self._headers()

    @staticmethod
    def check_page(answer: Any) -> None:
        """ValueError unless *answer* is a page in increasing seq order."""
        if not isinstance(answer, dict) or not isinstance(answer.get("messages"), list):
            raise ValueError(f"not a page: {str(answer)[:200]}")
        seqs = [m.get("seq") for m in answer["messages"]]
        if any(not isinstance(s, int) for s in seqs) or seqs != sorted(set(seqs)):
            raise ValueError(f"page out of order: {seqs[:20]}")


class Recorder:
    """The run's one journal writer, latency histogram and timeline.

    Locust's users (greenlets) call :meth:`acked` and :meth:`failed`; a lock
    keeps every journal record whole (gevent makes it a cooperative lock)."""

    def __init__(self, config: HttpLoadConfig, nodes: int = 1) -> None:
        self.config = config
        self.nodes = max(1, nodes)
        self.journal = (
            None if config.journal is None else jr.JournalWriter(config.journal)
        )
        self.hist = Histogram()
        self.lock = threading.Lock()
        self.sent = 0
        self.acked_count = 0
        self.failures = 0
        self.reads = 0
        self.errors: dict[str, int] = {}
        self.tl_acked: list[int] = []
        self.tl_failed: list[int] = []
        self.tl_node: list[list[list[int]]] = []
        self._tl_ns = max(1, int(config.timeline_interval * 1e9))
        self.started_ns = time.perf_counter_ns()
        self.started_unix = time.time()
        self.last_ack_ns = 0

    def _bucket(self, now_ns: int) -> int:
        i = max(0, (now_ns - self.started_ns) // self._tl_ns)
        while len(self.tl_acked) <= i:
            self.tl_acked.append(0)
            self.tl_failed.append(0)
            self.tl_node.append([[0, 0] for _ in range(self.nodes)])
        return i

    def acked(self, entry: jr.Entry, latency_ns: int, node: int = 0) -> None:
        now = time.perf_counter_ns()
        with self.lock:
            if self.journal is not None:
                self.journal.add(*entry)
            self.sent += 1
            self.acked_count += 1
            self.last_ack_ns = now
            self.hist.record(max(1, latency_ns // 1000))
            i = self._bucket(now)
            self.tl_acked[i] += 1
            self.tl_node[i][node % self.nodes][0] += 1

    def failed(self, reason: str, node: int = 0) -> None:
        with self.lock:
            self.sent += 1
            self.failures += 1
            self.errors[reason] = self.errors.get(reason, 0) + 1
            i = self._bucket(time.perf_counter_ns())
            self.tl_failed[i] += 1
            self.tl_node[i][node % self.nodes][1] += 1

    def close(self) -> None:
        with self.lock:
            if self.journal is not None:
                self.journal.close()

    def result(self, locust_rows: list[dict[str, Any]], users: int) -> dict[str, Any]:
        """The report, with the keys of the binary generator's."""
        end = self.last_ack_ns or time.perf_counter_ns()
        seconds = max(1e-9, (end - self.started_ns) / 1e9)
        pct = report.percentiles_ms(self.hist)
        step = self.config.timeline_interval
        timeline = [
            {"t_s": round((i + 1) * step, 3), "acked": a, "failed": f, "by_node": n}
            for i, (a, f, n) in enumerate(
                zip(self.tl_acked, self.tl_failed, self.tl_node, strict=True)
            )
        ]
        return {
            "scenario": "chat",
            "engine": "locust",
            "mode": "closed",
            "route": "any",
            "clients": users,
            "nodes": self.nodes,
            "sent": self.sent,
            "acked": self.acked_count,
            "failures": self.failures,
            "errors": dict(self.errors),
            "duration_s": round(seconds, 3),
            "throughput_msgs_per_s": round(self.acked_count / seconds, 1),
            "latency_ms": {"p50": pct["50%"], "p99": pct["99%"], "p99.9": pct["99.9%"]},
            "locust": locust_rows,
            "journal": str(self.config.journal) if self.config.journal else None,
            "reconnects": 0,
            "started_unix": round(self.started_unix, 6),
            "timeline_interval_s": step,
            "timeline": timeline,
        }

    def write_report(self, locust_rows: list[dict[str, Any]], users: int) -> None:
        if self.config.report is None:
            return
        path = self.config.report
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.result(locust_rows, users), indent=2) + "\n")
