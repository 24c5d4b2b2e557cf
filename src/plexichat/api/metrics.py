"""Prometheus metrics of the API (``GET /metrics``), one registry per app."""

from __future__ import annotations

import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE_LATEST", "ApiMetrics", "MetricsMiddleware"]

BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip


class ApiMetrics:
    """Request counts and latencies per route and status, WebSocket gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "plexichat_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "plexichat_http_request_seconds",
            "HTTP request latency (to the last body byte), by route, method, status",
            ["route", "method", "status"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.ws_open = Gauge(
            "plexichat_ws_connections",
            "WebSocket connections open now",
            registry=self.registry,
        )
        self.ws_sent = Counter(
            "plexichat_ws_messages_sent",
            "messages sent to WebSocket clients",
            registry=self.registry,
        )
        self.ws_closed = Counter(
            "plexichat_ws_closed",
            "WebSocket connections closed, by close code",
            ["code"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by the
    template of the route that served it (``/channels/{channel}/messages``,
    never the raw path: bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = (template, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
