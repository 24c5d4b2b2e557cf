"""Shared fixtures and the suite's rules for skips and leftovers.

* Every kernel test runs against every backend of its family.  A backend
  that is simply absent (numba not installed, Cython extension not built) is
  a listed skip; one that is present but does not load fails its tests.
* Skips are allowed only for the reasons in :data:`SKIP_REASONS`.  The run
  prints the count per reason and fails when any skip's reason is not listed.
* On the lab host (root, Debian 12, the README's machine) a lab dependency
  that cannot be set up fails the test: use the ``skips`` fixture
  (``skips.setup(what, fn)``) rather than catching the error and skipping.
* A Docker engine the suite started is stopped when the run ends; one that
  was already running is left alone.

This file is also shipped alone into the QEMU guests with ``tests/golden``
(``plexilab.providers.qemu.tests_tar``): it must need nothing but pytest and the
installed ``plexichat`` wheel.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn, TypeVar

import pytest

from plexichat import accel

# The hypothesis plugin imports hypothesis at the end of a run that used it
# nowhere, and pytest compiles (ast.parse) what it imports.  On CPython 3.11
# a traceback formatted by a finalizer during that parse (a garbage
# collection runs finalizers anywhere) corrupts the parser's recursion
# counter: "SystemError: AST constructor recursion depth mismatch" after
# every test passed.  Import it now, while nothing else runs.
with contextlib.suppress(ImportError):  # the guests run without it
    import hypothesis  # noqa: F401

T = TypeVar("T")

# The suite's lab runs (VMs, relays) live under their own run root: reaping
# the dead runs it finds there never touches a user's lab on the same host.
SUITE_RUN_ROOT = (
    Path(os.environ.get("PLEXILAB_CACHE") or Path.home() / ".cache" / "plexilab")
    / "run-tests"
)
os.environ["PLEXILAB_RUN_ROOT"] = str(SUITE_RUN_ROOT)

# The one list of reasons a test may skip for (key -> reason text).  A skip's
# reason is the text, optionally followed by ": <detail>".
SKIP_REASONS: dict[str, str] = {
    "not-root": "not root (the lab host set-up installs packages as root)",
    "not-debian-12": "not a Debian 12 host (the lab host set-up uses its apt)",
    "not-x86_64": "not an x86_64 host",
    "not-posix": "POSIX only",
    "reference-is-spec": "the reference is the specification",
    "numba-missing": "numba is not installed",
    "not-built": "Cython extension not built (nox -s compile)",
    # an expected failure (pytest.xfail) of a bug an open issue tracks; the
    # test still fails on anything else, and passes once the bug is gone
    "open-issue": "a known failure of an open issue",
}


def skip_reason(key: str, detail: str = "") -> str:
    """The reason text of a listed skip (``KeyError`` for an unlisted key)."""
    text = SKIP_REASONS[key]
    return f"{text}: {detail}" if detail else text


def listed_reason(reason: str) -> str | None:
    """The key of the listed reason *reason* is (or starts with), else None."""
    for key, text in SKIP_REASONS.items():
        if reason == text or reason.startswith(text + ": "):
            return key
    return None


def lab_host_gap() -> tuple[str, str] | None:
    """Why this is not the lab host (a reason key and detail); None when it is."""
    try:
        release = Path("/etc/os-release").read_text()
    except OSError:
        release = ""
    fields = dict(line.split("=", 1) for line in release.splitlines() if "=" in line)
    distro = fields.get("ID", "").strip('"')
    version = fields.get("VERSION_ID", "").strip('"')
    if (distro, version) != ("debian", "12") or shutil.which("apt-get") is None:
        return "not-debian-12", f"{distro or 'unknown'} {version}".strip()
    if os.geteuid() != 0:
        return "not-root", f"euid {os.geteuid()}"
    return None


class Skips:
    """Skips with a listed reason; lab set-up that fails on the lab host fails."""

    def __init__(self, gap: tuple[str, str] | None) -> None:
        self.gap = gap

    @property
    def lab_host(self) -> bool:
        return self.gap is None

    def as_lab_host(self) -> Skips:
        """The same rules as on the lab host (for tests of these rules)."""
        return Skips(None)

    def skip(self, key: str, detail: str = "") -> NoReturn:
        pytest.skip(skip_reason(key, detail))

    def require_lab_host(self, what: str) -> None:
        """Skip (listed reason) unless this is the lab host."""
        if self.gap is not None:
            key, why = self.gap
            self.skip(key, f"{why}; {what} needs the lab host")

    def setup(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``; if it raises: fail on the lab host, else skip."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if self.gap is None:
                pytest.fail(
                    f"{what} failed on the lab host (root, Debian 12), where the "
                    f"suite must be able to set it up: {type(exc).__name__}: {exc}"
                )
            key, why = self.gap
            self.skip(key, f"{why}; {what}: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="session")
def skips() -> Skips:
    return Skips(lab_host_gap())


# -- kernel backends -------------------------------------------------------------------


def absent_reason(backend: str, module: str) -> str | None:
    """A listed skip reason when *backend* is not there at all, else None."""
    if backend == "numba" and importlib.util.find_spec("numba") is None:
        return skip_reason("numba-missing", module)
    if backend == "cython" and importlib.util.find_spec(module) is None:
        return skip_reason("not-built", module)
    return None


def backend_params(family: str) -> list[object]:
    """``pytest.param`` per backend of *family*.

    An absent backend is a listed skip; a present one that fails to import
    makes its tests fail (``load`` raises), so a broken build is never hidden.
    """
    params: list[object] = []
    for backend, module in accel.FAMILIES[family].modules.items():
        reason = absent_reason(backend, module)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(backend, id=backend, marks=marks))
    return params


def load(family: str, backend: str) -> ModuleType:
    return accel.load_backend(family, backend)  # type: ignore[arg-type]


@pytest.fixture(params=backend_params("wire"))
def wire_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load("wire", request.param)


@pytest.fixture(params=backend_params("routing"))
def routing_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load("routing", request.param)


@pytest.fixture(params=backend_params("cache"))
def cache_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load("cache", request.param)


@pytest.fixture(params=backend_params("stats"))
def stats_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load("stats", request.param)


# -- skip summary ----------------------------------------------------------------------


def _skip_text(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


class SkipLedger:
    """Counts skips and expected failures by reason; the run fails on a reason
    not in SKIP_REASONS."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if hasattr(report, "wasxfail"):  # expected failures need a listed reason too
            if report.skipped:
                self.seen[str(report.wasxfail).removeprefix("reason: ")] += 1
        elif report.skipped:
            self.seen[_skip_text(report)] += 1

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def unlisted(self) -> dict[str, int]:
        return {r: n for r, n in self.seen.items() if listed_reason(r) is None}

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        per_key: Counter[str] = Counter()
        for reason, count in self.seen.items():
            per_key[listed_reason(reason) or ""] += count
        tr = terminalreporter
        tr.section("skips and known failures by reason")
        for key, text in SKIP_REASONS.items():
            tr.write_line(f"{per_key[key]:5d}  {text}")
        for reason, count in sorted(self.unlisted().items()):
            tr.write_line(f"{count:5d}  UNLISTED: {reason}", red=True)
        if per_key[""]:
            tr.write_line(
                "FAILED: skips whose reason is not in SKIP_REASONS (tests/conftest.py)",
                red=True,
                bold=True,
            )

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unlisted() and session.exitstatus in (
            pytest.ExitCode.OK,
            pytest.ExitCode.NO_TESTS_COLLECTED,
        ):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipLedger(), "plexilab-skip-ledger")
    # SIGTERM unwinds like Ctrl-C: the running test's finally blocks and
    # fixtures stop the nodes, VMs and engines it started (the default action
    # would end the process and leave them running)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


# -- session start and finish ----------------------------------------------------------

_engine_was_running = pytest.StashKey[bool | None]()


def _containers() -> ModuleType | None:
    """``plexilab.infra.engine`` where the lab is installed (not in the guests)."""
    try:
        from plexilab.infra import engine as containers
    except ImportError:
        return None
    return containers


def pytest_sessionstart(session: pytest.Session) -> None:
    containers = _containers()
    was = containers.engine_running() if containers is not None else None
    session.config.stash[_engine_was_running] = was


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    was = session.config.stash.get(_engine_was_running, None)
    containers = _containers()
    if containers is not None and was is False and containers.engine_running():
        containers.stop_engine_started_since(was_running=was)


R = TypeVar("R")


def run_bounded(coro: Awaitable[R], timeout: float = 60.0) -> R:
    """Run *coro* in a fresh event loop; a hang fails after *timeout* seconds."""

    async def bounded() -> R:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture(scope="session")
def run() -> Callable[..., Any]:
    """``run(coro, timeout=60)``: one test's scenario in its own event loop."""
    return run_bounded
