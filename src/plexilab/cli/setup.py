"""Invoke namespace ``setup``: ``invoke setup`` prepares this host for the QEMU lab.

Installs the missing Debian packages (QEMU for both arches, qemu-img,
mmdebstrap, qemu-user-static + binfmt, the aarch64 cross compiler and
``libpython3.11-dev:arm64``), enables arm64 multiarch and binfmt.  Idempotent
and fast when everything is present; without root it prints the commands.
"""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from plexilab.infra import setup_host


@task(default=True)
def host(c: Context) -> None:
    """Install and enable what the QEMU lab needs on this host."""
    try:
        report = setup_host.ensure()
    except setup_host.HostSetupError as exc:
        raise Exit(str(exc), code=1) from None
    if not report.actions:
        print("setup: host already has everything the QEMU lab needs")


setup = Collection("setup", host)
