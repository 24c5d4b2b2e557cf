"""Invoke namespace ``nightly`` (work in progress: the orchestration lands next)."""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task


@task(default=True)
def run(c: Context) -> None:
    """Run the nightly (not implemented yet)."""
    raise Exit("nightly: not implemented yet", code=2)


nightly = Collection("nightly", run)
