"""QMP to a QEMU guest: the asyncio ``qemu.qmp`` client behind a synchronous facade.

``QMP`` runs ``qemu.qmp.QMPClient`` on a private event loop in a daemon
thread; each call submits a coroutine there and waits for the reply, so
callers (:class:`plexilab.infra.machine.Machine`) never see asyncio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class QMP:
    """``qemu.qmp.QMPClient`` on a private event loop thread, used synchronously."""

    def __init__(self, name: str) -> None:
        from qemu.qmp import QMPClient

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self.thread.start()
        self.client = QMPClient(name)

    def _call(self, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"QMP call did not answer within {timeout} s") from None

    def connect(self, path: Path, timeout: float) -> None:
        self._call(self.client.connect(str(path)), timeout)

    def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 10
    ) -> Any:
        return self._call(self.client.execute(cmd, args), timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self.client.disconnect(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()
