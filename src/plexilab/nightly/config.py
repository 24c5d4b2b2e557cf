"""What a nightly was asked to do (``invoke nightly`` flags as one dataclass)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
STEPS: tuple[str, ...] = (
    "compile",
    "tests",
    "benchmark",
    "compare",
    "wheels-x86_64",
    "wheels-aarch64",
    "cluster",
)
QUICK_MARKERS = "not qemu and not docker"
DEFAULT_FAULTS = "default"
STEP_TIMEOUT = 3 * 3600.0


class NightlyError(RuntimeError):
    """The nightly could not start (bad options, another run holds the lock)."""


@dataclass
class NightlyOptions:
    """What ``invoke nightly`` was asked to do."""

    quick: bool = False
    reports: Path = REPO / "reports"
    factor: float = 1.1
    skip: frozenset[str] = frozenset()
    nodes: int = 3
    duration: float = 0.0  # 0: 40 s quick, 120 s full
    faults: str = DEFAULT_FAULTS
    fault_interval: float = 0.0  # 0: 9 s quick, 15 s full (4 / 8 faults)
    asv_results: Path = REPO / ".asv" / "results"
    machine: str = "lab"
    repo: Path = REPO
    python: str = sys.executable
    timeout: float = STEP_TIMEOUT

    @property
    def cluster_duration(self) -> float:
        return self.duration or (40.0 if self.quick else 120.0)

    @property
    def cluster_fault_interval(self) -> float:
        return self.fault_interval or (9.0 if self.quick else 15.0)


def expand_skip(values: Sequence[str]) -> frozenset[str]:
    """``--skip`` values (repeatable or comma-separated; ``wheels`` = both arches)."""
    out: set[str] = set()
    for value in values:
        for name in filter(None, (v.strip() for v in value.split(","))):
            matched = [s for s in STEPS if s == name or s.startswith(f"{name}-")]
            if not matched:
                raise NightlyError(
                    f"unknown step {name!r} in --skip (steps: {', '.join(STEPS)}, "
                    "wheels)"
                )
            out.update(matched)
    return frozenset(out)
