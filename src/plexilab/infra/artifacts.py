"""The per-arch wheel and wheelhouse the guests install, built when stale."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from plexilab.infra import wheels

REPO = wheels.REPO
DIST = REPO / "dist"


def newest_source() -> float:
    """mtime of the newest file that goes into the wheel."""
    paths = [REPO / "setup.py", REPO / "pyproject.toml"]
    paths += [p for p in (REPO / "src" / "plexichat").rglob("*") if p.is_file()]
    return max(
        p.stat().st_mtime for p in paths if p.suffix not in {".so", ".c", ".html"}
    )


def ensure_artifacts(
    arch: str,
    *,
    rebuild: bool = False,
    numba: bool = False,
    progress: Callable[[str], None] = print,
) -> tuple[Path, Path]:
    """(wheel, wheelhouse) of *arch* in dist/; rebuilt when older than the sources."""
    found = wheels.artifacts(arch, DIST)
    has_numba = bool(found and any(found[1].glob("numba-*.whl")))
    fresh = found and found[0].stat().st_mtime >= newest_source()
    if found and fresh and not rebuild and has_numba == numba:
        return found
    start = time.monotonic()
    result = wheels.build(arch, DIST, numba=numba)
    progress(
        f"built {result.wheel.name} in {time.monotonic() - start:.1f} s "
        f"{result.seconds}"
    )
    return result.wheel, result.wheelhouse
