"""Fixtures of the API tests: a real in-process cluster, the API of one node."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from plexichat.api.app import node_app
from plexichat.node.server import Node
from plexichat.node.testing import InProcessCluster


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
