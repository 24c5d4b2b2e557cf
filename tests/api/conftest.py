"""Fixtures of the API tests: a real in-process cluster, the API of one node."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI

from plexichat.api.app import node_app
from plexichat.node.server import Node
from plexichat.node.testing import InProcessCluster

R = TypeVar("R")


def run_bounded(coro: Awaitable[R], timeout: float = 60.0) -> R:
    """Run *coro* in a fresh event loop; a hang fails after *timeout* seconds."""

    async def bounded() -> R:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture(scope="session")
def run() -> Callable[..., Any]:
    """``run(coro, timeout=60)``: one test's scenario in its own event loop."""
    return run_bounded


class Api:
    """A running cluster, the API app of its first node, an httpx client."""

    def __init__(
        self, cluster: InProcessCluster, app: FastAPI, http: httpx.AsyncClient
    ):
        self.cluster = cluster
        self.app = app
        self.http = http

    @property
    def node(self) -> Node:
        return self.cluster.nodes[0]

    def auth(self, sender: int = 7, *, role: str = "client") -> dict[str, str]:
        token = self.cluster.credentials.token(sender, role=role)
        return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def start_api_cluster(
    base: Path,
    size: int = 3,
    replicas: int = 2,
    api: dict[str, Any] | None = None,
    **node_options: Any,
) -> AsyncIterator[Api]:
    """A *size*-node cluster and the API of its first node (httpx over ASGI)."""
    async with InProcessCluster(base, size, replicas=replicas, **node_options) as c:
        app = node_app(c.nodes[0], **(api or {}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api.test", timeout=10
        ) as http:
            try:
                yield Api(c, app, http)
            finally:
                await app.state.gateway.close()


@pytest.fixture
def api_cluster() -> Callable[..., contextlib.AbstractAsyncContextManager[Api]]:
    """``api_cluster(base, size=3, replicas=2, api={...}, **node_options)``."""
    return start_api_cluster
