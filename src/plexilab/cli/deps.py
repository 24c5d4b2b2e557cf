"""Invoke namespace ``deps``: the lock of every environment the lab creates.

``invoke deps.lock`` regenerates ``constraints.txt`` from the dependency
groups of pyproject.toml (``uv pip compile``, universal, Python 3.11);
``--upgrade`` moves every pin to the newest release that fits.
``invoke deps.check`` fails when a requirement is not pinned or its pin is
outside its range.  ``./lab`` rebuilds ``.venv`` when the lock changes; nox
sessions, wheelhouses and the Docker image pick the new pins up on their next
run.
"""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from plexilab import deps as depslib


@task(help={"upgrade": "move every pin to the newest release that fits"})
def lock(c: Context, upgrade: bool = False) -> None:
    """Regenerate constraints.txt from pyproject.toml's dependency groups."""
    try:
        depslib.lock(upgrade=upgrade)
    except depslib.LockError as exc:
        raise Exit(str(exc), code=1) from None
    check(c)
    print(f"deps: {depslib.LOCK.name}: {len(depslib.pins())} pins")


@task
def check(c: Context) -> None:
    """Fail unless constraints.txt pins every requirement within its range."""
    problems = depslib.check_lock()
    if problems:
        raise Exit("deps: the lock is stale:\n  " + "\n  ".join(problems), code=1)
    print(f"deps: every requirement of {', '.join(depslib.groups())} is pinned")


deps = Collection("deps", lock, check)
