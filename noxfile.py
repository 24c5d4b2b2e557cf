"""Nox sessions: compile, build, lint, mypy, tests, benchmark and wheels."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from plexilab import deps  # noqa: E402  (stdlib only: groups and the lock)

LOCK = str(deps.LOCK)
REQUIRE_EXT = {"PLEXICHAT_REQUIRE_EXTENSIONS": "1"}
# pip's isolated build environments (python -m build, pip wheel) take the pins too
PINNED_BUILDS = {"PIP_CONSTRAINT": LOCK}

nox.options.sessions = ["lint", "mypy", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True


def install(session: nox.Session, *groups: str) -> None:
    """Install the dependency *groups* of pyproject.toml at the locked versions."""
    session.install("-c", LOCK, *deps.requirements(*groups))


def install_project(session: nox.Session) -> None:
    """This checkout, editable, built with the session's (pinned) build tools."""
    session.install(
        "--no-deps", "--no-build-isolation", "-e", ".", env=REQUIRE_EXT
    )  # fmt: skip


def build_in_place(session: nox.Session) -> None:
    """Compile every Cython extension into src/ (a no-op when up to date)."""
    install(session, "build", "runtime")
    session.run("python", "setup.py", "-q", "build_ext", "--inplace", env=REQUIRE_EXT)


@nox.session
def compile(session: nox.Session) -> None:
    """Build the Cython extensions in place and show the backend of each kernel."""
    build_in_place(session)
    install(session, "numba")
    session.run(
        "python",
        "-m",
        "plexichat.accel",
        "--require-compiled",
        *session.posargs,
        env={"PYTHONPATH": str(SRC)},
    )


@nox.session
def build(session: nox.Session) -> None:
    """Build sdist and wheel, then import the compiled modules from the wheel."""
    dist = ROOT / "dist" / "build"  # dist/<arch>/ holds the guests' artifacts
    shutil.rmtree(dist, ignore_errors=True)
    install(session, "lab")
    session.run(
        "python", "-m", "build", "--outdir", str(dist),
        env={**REQUIRE_EXT, **PINNED_BUILDS},
    )  # fmt: skip
    wheels = sorted(dist.glob("plexichat-*.whl"))
    sdists = sorted(dist.glob("plexichat-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        session.error(
            f"expected one wheel and one sdist in {dist}, got {wheels + sdists}"
        )
    check = session.create_tmp()
    venv = Path(check) / "wheel-venv"
    session.run("python", "-m", "venv", "--clear", str(venv))
    python = str(venv / "bin" / "python")
    session.run(
        python, "-m", "pip", "install", "-q", "-c", LOCK, str(wheels[0]),
        external=True,
    )  # fmt: skip
    # Import from outside the source tree so the installed wheel is what runs.
    with session.chdir(check):
        session.run(
            python, "-m", "plexichat.accel", "--require-compiled", external=True
        )
    session.log(f"built {wheels[0].name} and {sdists[0].name}")


@nox.session
def lint(session: nox.Session) -> None:
    """Run ruff (lint and format check) and the import-layer contracts."""
    install(session, "lint")
    targets = session.posargs or [
        "src",
        "tests",
        "benchmarks",
        "noxfile.py",
        "tasks.py",
    ]
    session.run("ruff", "check", *targets)
    session.run("ruff", "format", "--check", *targets)
    # the layer contracts of pyproject.toml's [tool.importlinter]
    session.run("lint-imports", "--no-cache", env={"PYTHONPATH": "src"})


@nox.session
def mypy(session: nox.Session) -> None:
    """Type-check src/ with mypy --strict (stubs cover the compiled modules)."""
    install(session, "typecheck", "runtime", "api", "numba", "lab")
    session.run("mypy", *(session.posargs or ["src"]))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the suite on the compiled backends, then on PLEXICHAT_BACKEND=python."""
    build_in_place(session)
    install(session, "test", "bench", "numba", "lab", "api", "locust")
    install_project(session)
    session.run("python", "-m", "plexichat.accel", "--require-compiled")
    coverage_file = {"COVERAGE_FILE": str(ROOT / ".coverage")}
    session.run("coverage", "erase", env=coverage_file)
    pytest_args = session.posargs or ["tests"]
    # long end-to-end runs (marker "nightly") only when given arguments
    nightly = [] if session.posargs else ["-m", "not nightly"]
    session.run(
        "pytest",
        "--cov",
        "--cov-report=",
        *nightly,
        *pytest_args,
        env={**coverage_file, "PLEXICHAT_BACKEND": "auto"},
    )
    # The reference backends must carry the node and load paths on their own.
    session.run(
        "pytest",
        "--cov",
        "--cov-append",
        "--cov-report=term:skip-covered",
        # the 80% gate is for the whole suite; a subset (posargs) only reports
        *([] if session.posargs else ["--cov-fail-under=80"]),
        "-m",
        "not qemu and not docker",
        *pytest_args,
        env={**coverage_file, "PLEXICHAT_BACKEND": "python"},
    )


@nox.session
def benchmark(session: nox.Session) -> None:
    """Run asv on the working tree (compiled vs interpreted) and print a speedup table.

    ``nox -s benchmark -- continuous BASE HEAD [FACTOR]`` compares two commits
    instead and fails when any benchmark got slower by more than FACTOR.
    """
    build_in_place(session)
    install(session, "bench", "numba", "lab")
    install_project(session)
    session.run("asv", "machine", "--yes", "--machine", "lab")
    if session.posargs[:1] == ["continuous"]:
        base, head, *rest = session.posargs[1:] or ["HEAD~1", "HEAD"]
        factor = rest[0] if rest else "1.1"
        session.run(
            "asv", "continuous", "--machine", "lab", "--factor", factor,
            "--split", "--show-stderr", base, head,
        )  # fmt: skip
        return
    commit = session.run("git", "rev-parse", "HEAD", silent=True, external=True)
    assert isinstance(commit, str)
    session.run(
        "asv", "run", "--machine", "lab", "--python=same", "--show-stderr",
        "--set-commit-hash", commit.strip(), *session.posargs,
    )  # fmt: skip
    session.run(
        "python", "-m", "plexilab.results.asvreport", "--machine", "lab",
        env={"PYTHONPATH": str(SRC)},
    )  # fmt: skip


@nox.session
def wheels(session: nox.Session) -> None:
    """Build the wheel and a runtime wheelhouse per arch (-- --arch aarch64)."""
    install(session, "build", "lab")
    session.run(
        "python",
        "-m",
        "plexilab.infra.wheels",
        *session.posargs,
        env={"PYTHONPATH": str(SRC), **REQUIRE_EXT},
    )
