"""uvicorn inside the node's event loop (``plexichat-node --http-listen``).

:class:`HttpServer` runs a uvicorn :class:`uvicorn.Server` as a task of the
running loop, next to the node's binary listener: no thread, no second
process.  uvicorn's own signal handling is off (the node's handlers stop
both); :meth:`HttpServer.stop` ends it (open WebSockets are closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("plexichat.api")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the node owns SIGTERM/SIGINT


class HttpServer:
    """*app* served on *host*:*port* (0: a free port) in the running loop."""

    def __init__(
        self, app: FastAPI, host: str, port: int, *, stop_timeout: float = 5.0
    ) -> None:
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            ws="websockets-sansio",
            timeout_graceful_shutdown=max(1, round(stop_timeout)),
        )
        self.server = _Server(self.config)
        self.stop_timeout = stop_timeout
        self.task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, timeout: float = 10.0) -> int:
        """Start serving; the port it listens on."""
        self.task = asyncio.create_task(self.server.serve(), name="http-api")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            if loop.time() > deadline:
                await self.stop()
                raise TimeoutError(f"HTTP server not listening within {timeout}s")
            await asyncio.sleep(0.01)
        sockets = self.server.servers[0].sockets
        self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop serving (graceful within *stop_timeout*, then forced)."""
        task = self.task
        if task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), self.stop_timeout + 2)
        except TimeoutError:
            self.server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:
            log.exception("HTTP server failed", extra={"event": "http-failed"})
        self.task = None
