"""Install every wheel of a directory into a venv, offline, on a guest or host.

Usage: ``VENV/bin/python install.py VENV WHEELHOUSE DEPS|- [ALWAYS...]``.

Wheels are installed with ``installer`` (pure Python, imported from its own
wheel in WHEELHOUSE, or from DEPS when the wheelhouse has none), without
bytecode compilation.  A distribution already installed at the same version
is skipped, unless its name is one of ALWAYS (the lab passes ``plexichat``,
which is always reinstalled).  DEPS names a directory whose
``site-packages`` already holds the dependencies (the guests' deps disk,
``-`` for none): it is put on the venv's path with a ``.pth`` file and what
it provides is not installed again.

The lab pipes this file to the host over SSH
(``plexilab.infra.ssh.SSHHost.install``): it runs with the standard library
of the host's Python 3.11 only and imports nothing from plexilab.
"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Sequence
from typing import Any

PTH_NAME = "_plexilab_deps.pth"


def norm(name: str) -> str:
    """A distribution name for comparison: ``Foo.Bar-baz`` -> ``foo_bar_baz``."""
    return name.replace("-", "_").replace(".", "_").lower()


def infos(where: str) -> dict[str, list[str]]:
    """``*.dist-info`` directories under *where* -> [name, version]."""
    return {
        d: os.path.basename(d).removesuffix(".dist-info").split("-", 1)
        for d in glob.glob(os.path.join(where, "*.dist-info"))
    }


def remove(dist_info: str, site: str, venv: str) -> None:
    """Uninstall the distribution of *dist_info*: its RECORD's files inside *venv*."""
    record = os.path.join(dist_info, "RECORD")
    if os.path.exists(record):
        with open(record) as fh:
            for line in fh:
                path = os.path.normpath(os.path.join(site, line.rsplit(",", 2)[0]))
                if path.startswith(venv) and os.path.isfile(path):
                    os.unlink(path)
    shutil.rmtree(dist_info, ignore_errors=True)


def destination(paths: dict[str, str], venv: str) -> Any:
    """An ``installer`` destination for the venv's scheme (no bytecode)."""
    destinations = importlib.import_module("installer.destinations")
    scheme = {k: paths[k] for k in ("purelib", "platlib", "scripts", "data")}
    scheme["headers"] = os.path.join(paths["include"], "site")
    return destinations.SchemeDictionaryDestination(
        scheme,
        interpreter=os.path.join(venv, "bin", "python"),
        script_kind="posix",
        bytecode_optimization_levels=(),
    )


def install_wheels(
    venv: str, house: str, deps: str, always: Sequence[str]
) -> list[str]:
    """Install the wheels of *house* into *venv*; ``name-version`` of each installed."""
    paths = sysconfig.get_paths("venv", vars={"base": venv, "platbase": venv})
    site = paths["purelib"]
    deps_site = os.path.join(deps, "site-packages") if deps != "-" else ""
    if deps_site and os.path.isdir(deps_site):
        with open(os.path.join(site, PTH_NAME), "w") as fh:
            fh.write(deps_site + "\n")
    found = glob.glob(os.path.join(house, "installer-*.whl"))
    sys.path.insert(0, found[0] if found else deps_site)
    install = importlib.import_module("installer").install
    wheel_file = importlib.import_module("installer.sources").WheelFile
    dest = destination(paths, venv)
    provided = {norm(n): v for n, v in infos(deps_site).values()} if deps_site else {}
    done = []
    for wheel in sorted(glob.glob(os.path.join(house, "*.whl"))):
        name, version = os.path.basename(wheel).split("-")[:2]
        if norm(name) not in always and provided.get(norm(name)) == version:
            continue
        mine = infos(site)
        existing = [d for d, (n, _v) in mine.items() if norm(n) == norm(name)]
        if norm(name) not in always and any(mine[d][1] == version for d in existing):
            continue
        for d in existing:
            remove(d, site, venv)
        with wheel_file.open(wheel) as source:
            install(source, dest, {"INSTALLER": b"plexilab"})
        done.append(f"{name}-{version}")
    return done


def main(argv: Sequence[str]) -> int:
    """``VENV WHEELHOUSE DEPS|- [ALWAYS...]``: install and print a summary line."""
    venv, house, deps, *always = argv
    start = time.monotonic()
    done = install_wheels(venv, house, deps, always)
    took = time.monotonic() - start
    print(f"installed {len(done)} in {took:.2f} s: {' '.join(done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
