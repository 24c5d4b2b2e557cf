"""Fixtures shared by the node tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

R = TypeVar("R")
Runner = Callable[..., Any]


def run_bounded(coro: Awaitable[R], timeout: float = 60.0) -> R:
    """Run *coro* in a fresh event loop; a hang fails after *timeout* seconds."""

    async def bounded() -> R:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture(scope="session")
def run() -> Runner:
    """``run(coro, timeout=60)``: one test's scenario in its own event loop."""
    return run_bounded
