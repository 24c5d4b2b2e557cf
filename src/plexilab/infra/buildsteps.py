"""The lab's cache and the plumbing of its builds (images, deps disks, bases).

* :func:`cache_root`: ``$PLEXILAB_CACHE`` or ``~/.cache/plexilab``;
* :func:`digest`: a short content hash of named parts (cache keys);
* :func:`locked`: an exclusive lock file, one builder per cache entry;
* :class:`Step`: times and logs one build step; :func:`run` runs a build
  command and raises with its output; :func:`du` / :func:`mb` for sizes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True, highlight=False)


def cache_root() -> Path:
    """``$PLEXILAB_CACHE`` or ``~/.cache/plexilab``."""
    env = os.environ.get("PLEXILAB_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "plexilab"
    root.mkdir(parents=True, exist_ok=True)
    return root


def digest(parts: Sequence[tuple[str, bytes]]) -> str:
    """A 16-hex-digit sha256 of (name, data) parts, each length-prefixed."""
    h = hashlib.sha256()
    for name, data in parts:
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()[:16]


class Step:
    """Times one build step and logs it."""

    def __init__(self, name: str, timings: dict[str, float]) -> None:
        self.name = name
        self.timings = timings
        self.note = ""

    def __enter__(self) -> Step:
        self.start = time.monotonic()
        self._status: Any = None
        if threading.current_thread() is threading.main_thread():
            self._status = console.status(f"[bold]{self.name}[/]...")
            self._status.__enter__()
        else:
            console.log(f"{self.name}...")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)
        seconds = time.monotonic() - self.start
        self.timings[self.name] = round(seconds, 2)
        ok = "[green]done[/]" if exc[0] is None else "[red]failed[/]"
        note = f" ({self.note})" if self.note else ""
        console.log(f"{self.name}: {ok} in {seconds:.1f} s{note}")


def run(argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a build command; raise with its output on failure."""
    proc = subprocess.run(
        list(argv),
        text=True,
        capture_output=True,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout[-3000:]}"
            f"\n{proc.stderr[-3000:]}"
        )
    return proc  # type: ignore[no-any-return]


def du(path: Path) -> int:
    """Bytes used by a file or tree (allocated blocks)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock file: one builder per cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
