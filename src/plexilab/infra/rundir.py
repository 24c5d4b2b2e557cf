"""Lab run directories, their pidfiles and the reaper; the launcher thread.

No process of a lab run outlives it, even when the lab is SIGKILLed:

* Every process the lab starts (QEMU, guestfwd relays, local nodes) is
  recorded as a pidfile (:func:`plexilab.proc.write_pidfile`: pid, process
  group, start time) in a run directory owned by this process
  (:func:`current_run_dir`, ``<run root>/<pid>-<start time>``).
* :func:`reap` (``invoke qemu.reap``; also run when a lab process first
  makes its run directory) kills the recorded processes of run directories
  whose owner is gone -- by pid and process group, after checking the start
  time, never by name.
* Children that must die with the lab are forked from one process-lifetime
  launcher thread (:func:`in_launcher`) with ``PR_SET_PDEATHSIG=SIGKILL``
  (:func:`parent_death_setup`): the signal follows the forking *thread*.
* :func:`install_signal_handlers` turns SIGTERM/SIGHUP into ``SystemExit``
  so ``finally`` blocks and ``atexit`` hooks shut guests down.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from plexilab import proc
from plexilab.infra import buildsteps

PR_SET_PDEATHSIG = 1


def run_root() -> Path:
    """Where lab runs keep their directories: ``$PLEXILAB_RUN_ROOT`` or the
    cache's ``run/`` (the test suite uses its own, so it reaps only its own
    dead runs and never a user's lab)."""
    env = os.environ.get("PLEXILAB_RUN_ROOT")
    root = Path(env) if env else buildsteps.cache_root() / "run"
    root.mkdir(parents=True, exist_ok=True)
    return root


_run_dir: Path | None = None
_run_lock = threading.Lock()


def current_run_dir() -> Path:
    """This process's run directory (created on first use, owner recorded)."""
    global _run_dir
    with _run_lock:
        if _run_dir is None:
            me = os.getpid()
            path = run_root() / f"{me}-{proc.proc_starttime(me)}"
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            proc.write_pidfile(path / "owner.json", me, "owner")
            _run_dir = path
        else:
            return _run_dir
    # A lab run that was SIGKILLed could not clean up: do it now (logs stay).
    with contextlib.suppress(OSError):
        reap(keep_logs=True)
    return path


def reap(
    *, everything: bool = False, root: Path | None = None, keep_logs: bool = False
) -> list[str]:
    """Kill leftovers of lab runs whose owner process is gone (or all of them).

    Returns a description of each process killed.  Run directories of dead
    owners are removed afterwards; with *keep_logs* only their ``*.log``
    files stay (disk overlays and seeds -- the node secrets -- go).
    """
    killed: list[str] = []
    root = root or run_root()
    me = _run_dir
    for rundir in sorted(p for p in root.iterdir() if p.is_dir()):
        owner = proc.read_pidfile(rundir / "owner.json")
        owner_alive = owner is not None and owner.alive()
        if owner_alive and not everything:
            continue
        if rundir == me and not everything:
            continue
        for pidfile in sorted(rundir.rglob("*.pid")):
            what = proc.kill_recorded(pidfile)
            if what:
                killed.append(f"{what} ({pidfile.relative_to(root)})")
            pidfile.unlink(missing_ok=True)
        if owner_alive:
            continue
        if not keep_logs:
            shutil.rmtree(rundir, ignore_errors=True)
            continue
        for path in rundir.rglob("*"):
            if path.is_file() and path.suffix != ".log" and path.name != "owner.json":
                path.unlink(missing_ok=True)
    return killed


def running_guests(arch: str | None = None) -> list[dict[str, Any]]:
    """State of guests that other (live) lab processes hold, e.g. ``invoke qemu.up``.

    Each is the ``guest.json`` a :class:`plexilab.infra.machine.Machine`
    writes into its directory of a run directory.
    """
    out = []
    for state_file in sorted(run_root().glob("*/*/guest.json")):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if proc.alive(int(state["pid"]), state.get("starttime")) and (
            arch is None or state["arch"] == arch
        ):
            out.append(state)
    return out


# --------------------------------------------------------------------------
# Launcher thread (PDEATHSIG follows the thread that forked) and signals
# --------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_launch_queue: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
    queue.Queue()
)
_launcher: threading.Thread | None = None


def _launcher_loop() -> None:
    while True:
        fn, fut = _launch_queue.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)


def in_launcher(fn: Callable[[], Any]) -> Any:
    """Run *fn* in the process-lifetime launcher thread and return its result."""
    global _launcher
    with _run_lock:
        if _launcher is None:
            _launcher = threading.Thread(
                target=_launcher_loop, name="plexilab-launcher", daemon=True
            )
            _launcher.start()
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    _launch_queue.put((fn, fut))
    return fut.result()


def child_setup() -> None:
    """In the forked child: die with the parent (SIGKILL)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def parent_death_setup() -> Callable[[], None]:
    """A ``preexec_fn`` (made in the forking thread): SIGKILL the child when
    that thread ends, and end it at once if this process died before the
    ``prctl`` took hold.  Fork from :func:`in_launcher` so "that thread" is
    the process-lifetime launcher."""
    parent = os.getpid()

    def setup() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup


_handlers_installed = False


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks shut guests down."""
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_signal)
    _handlers_installed = True
