"""Garbage-collector pauses of this process (reported in STATS)."""

from __future__ import annotations

import gc
import time
from typing import Any


class GCPauses:
    """Count collections per generation and time their pauses."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.total_s = 0.0
        self.max_s = 0.0
        self._start = 0.0
        self.installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        pause = time.perf_counter() - self._start
        self.collections[int(info.get("generation", 0))] += 1
        self.total_s += pause
        self.max_s = max(self.max_s, pause)

    def install(self) -> None:
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "collections": list(self.collections),
            "total_ms": round(self.total_s * 1000, 3),
            "max_ms": round(self.max_s * 1000, 3),
            "thresholds": list(gc.get_threshold()),
        }
