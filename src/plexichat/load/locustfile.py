"""Locust users of PlexiChat's HTTP API (docs/http-api.md).

Run it headless, configured by the JSON file ``PLEXICHAT_LOCUST_CONFIG``
names (:class:`plexichat.load.httpload.HttpLoadConfig`)::

    PLEXICHAT_LOCUST_CONFIG=load.json locust -f src/plexichat/load/locustfile.py \\
        --headless -u 20 -r 10 -t 30s --host http://127.0.0.1:8080

:class:`ChatUser` posts messages (a client token of its own sender, an
``Idempotency-Key`` per message) back to back and now and then GETs a page of a
channel it posted to; a user whose node does not answer moves on to the
next node.  Every ``201`` is journaled by the process's one
:class:`~plexichat.load.httpload.Recorder`, in the format the checker reads;
at the end of the test the report (the binary generator's keys, Locust's
per-request statistics in ``locust``) is written to the config's ``report``.

Importing it needs Locust but no node; the recorder opens its journal when
the test starts.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from locust import FastHttpUser, constant, events, task
from locust.env import Environment

from plexichat.load import report
from plexichat.load.httpload import (
    GET_NAME,
    POST_NAME,
    HttpLoadConfig,
    Recorder,
    Sender,
)

CONFIG = HttpLoadConfig.from_env()
CREDENTIALS = CONFIG.credentials()
FAIL_OVER_PAUSE = 0.05  # seconds a user waits after a connection error
_state: dict[str, Recorder] = {}  # "recorder": the running test's (one per process)


def recorder() -> Recorder:
    """The running test's recorder (made at test start, or on first use)."""
    found = _state.get("recorder")
    if found is None:
        found = _state["recorder"] = Recorder(CONFIG, len(CONFIG.hosts) or 1)
    return found


@events.test_start.add_listener
def _test_start(environment: Environment, **_kw: Any) -> None:
    recorder()


@events.test_stop.add_listener
def _test_stop(environment: Environment, **_kw: Any) -> None:
    rec = _state.pop("recorder", None)
    if rec is None:
        return
    rec.close()
    users = environment.runner.user_count if environment.runner is not None else 0
    rec.write_report(locust_rows(environment), users)


def locust_rows(environment: Environment) -> list[dict[str, Any]]:
    """Locust's statistics per request name (POST first, then the total), in
    the row layout of :func:`plexichat.load.report.summary`."""
    stats = environment.stats
    entries = sorted(
        stats.entries.values(), key=lambda e: (e.name != POST_NAME, e.name)
    )
    return [_row(e) for e in [*entries, stats.total]]


def _row(entry: Any) -> dict[str, Any]:
    seconds = max(1e-9, (entry.last_request_timestamp or 0) - entry.start_time)
    return {
        "name": entry.name,
        "method": entry.method or "",
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "duration_s": round(seconds, 3),
        "requests_per_s": round(entry.num_requests / seconds, 1),
        "failures_per_s": round(entry.num_failures / seconds, 3),
        "avg_ms": round(entry.avg_response_time, 3),
        "min_ms": round(entry.min_response_time or 0.0, 3),
        "max_ms": round(entry.max_response_time, 3),
        "median_ms": round(float(entry.median_response_time), 3),
        "avg_content_size": round(entry.avg_content_length, 1),
        "percentiles_ms": {
            report.label(q): round(
                float(entry.get_response_time_percentile(q / 100)), 3
            )
            for q in report.PERCENTILES
        },
    }


class ChatUser(FastHttpUser):
    """A chat client: POSTs as its own sender, sometimes reads a page."""

    wait_time = constant(0)
    network_timeout = CONFIG.timeout
    connection_timeout = CONFIG.timeout
    _numbers = itertools.count()

    def __init__(self, environment: Environment) -> None:
        number = next(ChatUser._numbers)
        hosts = CONFIG.hosts
        self.node = number % len(hosts) if hosts else 0
        if hosts:
            self.host = hosts[self.node]
        super().__init__(environment)
        self.sender = Sender(CONFIG, CREDENTIALS)

    @task
    def chat(self) -> None:
        if CONFIG.read_ratio and self.sender.rng.random() < CONFIG.read_ratio:
            self.read()
        else:
            self.post()

    def post(self) -> None:
        rec = recorder()
        post = self.sender.next_post()
        t0 = time.perf_counter_ns()
        with self.client.post(
            post.path,
            data=post.body,
            headers=post.headers,
            name=POST_NAME,
            catch_response=True,
        ) as resp:
            latency = time.perf_counter_ns() - t0
            if resp.status_code != 201:
                resp.failure(f"HTTP {resp.status_code}")
                rec.failed(f"HTTP {resp.status_code}", self.node)
                if resp.status_code == 0:
                    self.fail_over()
                return
            try:
                entry = self.sender.created(post, resp.json())
            except ValueError as exc:
                resp.failure(str(exc))
                rec.failed("bad 201", self.node)
                return
            rec.acked(entry, latency, self.node)
            resp.success()

    def fail_over(self) -> None:
        """The node did not answer (killed, paused, cut off): go on with the
        next one after a short pause (no busy loop of refused connections)."""
        hosts = CONFIG.hosts
        if len(hosts) > 1:
            self.node = (self.node + 1) % len(hosts)
            self.client.base_url = hosts[self.node]
        time.sleep(FAIL_OVER_PAUSE)  # gevent's: the other users go on

    def read(self) -> None:
        path, headers = self.sender.next_read()
        with self.client.get(
            path, headers=headers, name=GET_NAME, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            try:
                Sender.check_page(resp.json())
            except ValueError as exc:
                resp.failure(str(exc))
                return
            recorder().reads += 1
            resp.success()
