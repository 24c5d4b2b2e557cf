"""The lab side of a run: its tools as subprocesses, STATS of every node.

The load generator, the P2P scenario and the checker run on the lab machine
as subprocesses of the lab's Python (in their own process group: their CPU
use and backend choice are separate from this process) against the nodes'
lab endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from plexilab import proc
from plexilab.host import Endpoint
from plexilab.run.credentials import admin_token


def run_lab(
    argv: Sequence[str], *, timeout: float, env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run a lab tool in its own process group; kill the group on timeout/Ctrl-C."""
    child = proc.spawn(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **env},
    )
    try:
        out, err = child.communicate(timeout=timeout)
    except BaseException:
        proc.signal_group(child.pid, signal.SIGKILL)  # the tool and its children
        child.communicate()
        raise
    return subprocess.CompletedProcess(
        list(argv),
        child.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )


async def _stats(
    endpoints: Sequence[Endpoint], timeout: float, secret: bytes | None
) -> list[tuple[dict[str, Any], dict[str, Any]] | None]:
    from plexichat.load.client import NodeClient  # lab side: plexichat from src

    token = admin_token(secret)

    async def one(ep: Endpoint) -> tuple[dict[str, Any], dict[str, Any]] | None:
        client = NodeClient(ep.host, ep.port, timeout=timeout, token=token)
        try:
            await client.connect()
            info, hists = await client.stats()
            return dict(info), dict(hists)
        except (OSError, TimeoutError, ValueError):
            return None
        finally:
            await client.close()

    return list(await asyncio.gather(*(one(ep) for ep in endpoints)))


def stats_all(
    endpoints: Sequence[Endpoint], timeout: float = 2.0, *, secret: bytes | None
) -> list[dict[str, Any] | None]:
    """STATS of every endpoint (None where the node does not answer), asked
    with an admin token of the cluster whose secret is *secret*."""
    answers = asyncio.run(_stats(endpoints, timeout, secret))
    return [None if a is None else a[0] for a in answers]


def node_histograms(
    endpoints: Sequence[Endpoint], timeout: float = 10.0, *, secret: bytes | None
) -> list[dict[str, Any]]:
    """``{name: Histogram}`` of every node (an empty dict where one does not
    answer), asked with an admin token of the cluster whose secret is *secret*."""
    answers = asyncio.run(_stats(endpoints, timeout, secret))
    return [{} if a is None else a[1] for a in answers]


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` blocks run."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
