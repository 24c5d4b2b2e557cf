"""Stage wheels into a tree laid out for the guests' read-only deps disk.

Usage: ``python3 -I stage_deps.py STAGE GUEST_VENV INSTALLER_WHL WHEEL...``.

Runs on the lab host with ``installer`` imported from its wheel: installs
each WHEEL into STAGE (``site-packages``, ``bin``, ``data``, ``include``),
with scripts pointing at ``GUEST_VENV/bin/python``, byte-compiled here (the
lab host's CPython 3.11 writes the same bytecode as the guests' python3.11).
``plexilab.infra.depsdisk.deps_disk`` runs this file's source with
``python -I -c``: it needs only the standard library and imports nothing
from plexilab.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence


def scheme(stage: str) -> dict[str, str]:
    """Where each kind of wheel file goes under *stage*."""
    return {
        "purelib": f"{stage}/site-packages",
        "platlib": f"{stage}/site-packages",
        "scripts": f"{stage}/bin",
        "data": f"{stage}/data",
        "headers": f"{stage}/include",
    }


def stage_wheels(
    stage: str, guest_venv: str, installer_whl: str, wheels: Sequence[str]
) -> None:
    """Install *wheels* into *stage* for a guest venv at *guest_venv*."""
    sys.path.insert(0, installer_whl)
    install = importlib.import_module("installer").install
    destinations = importlib.import_module("installer.destinations")
    wheel_file = importlib.import_module("installer.sources").WheelFile
    dest = destinations.SchemeDictionaryDestination(
        scheme(stage),
        interpreter=f"{guest_venv}/bin/python",
        script_kind="posix",
        bytecode_optimization_levels=(0,),
    )
    for wheel in wheels:
        with wheel_file.open(wheel) as source:
            install(source, dest, {"INSTALLER": b"plexilab"})


def main(argv: Sequence[str]) -> int:
    """``STAGE GUEST_VENV INSTALLER_WHL WHEEL...``."""
    stage, guest_venv, installer_whl, *wheels = argv
    stage_wheels(stage, guest_venv, installer_whl, wheels)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
