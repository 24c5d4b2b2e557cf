"""Making plexichat runnable for a run: the wheel, the lab's venv, the hosts.

Local hosts (``local_python``) use this checkout (``dev``: ``PYTHONPATH``) or a
cached venv with the wheel (``wheel``); other hosts are installed by their
provider (:meth:`plexilab.providers.base.Provider.install`) and checked here
(:func:`check_hosts`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from plexilab import deps
from plexilab.host import Host
from plexilab.infra import artifacts, wheels
from plexilab.providers.base import (
    Capabilities,
    LocalPython,
    capabilities_of,
)
from plexilab.run.config import ClusterError, InstallMode

log = logging.getLogger("plexilab.run.install")
LOCAL = Capabilities(local_python=True)

ROOT = Path(__file__).resolve().parents[3]
SRC = ROOT / "src"
CACHE = ROOT / ".cache" / "local"


class InstallError(ClusterError):
    """The wheel, the lab's venv or a host's install failed."""


def source_key() -> str:
    """Content key of everything that goes into the wheel
    (:func:`plexilab.infra.artifacts.source_key`)."""
    return artifacts.source_key()


def build_wheel(timeout: float = 1200.0) -> Path:
    """The wheel of this machine's arch, from the lab's one content-hashed
    artifact cache (:func:`plexilab.infra.artifacts.wheel`: built once per
    source state, shared with the QEMU artifacts)."""
    try:
        return artifacts.wheel(wheels.host_arch(), timeout=timeout)
    except RuntimeError as exc:
        raise InstallError(str(exc)) from exc


def prune(directory: Path, keep: int = 3) -> None:
    """Remove all but the *keep* most recent entries of a cache directory."""
    if not directory.is_dir():
        return
    entries = sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def local_venv(
    wheel: Path,
    timeout: float = 600.0,
    cache: Path = CACHE,
    extras: Sequence[str] = (),
) -> str:
    """A venv under .cache/ with *wheel* and its locked runtime dependencies.

    Hermetic: the venv does not see the system site-packages, and the
    dependencies are installed offline from a wheelhouse of the host's arch
    downloaded at the versions of ``constraints.txt`` (made once per wheel and
    lock).  The lab's load generator and checker run from it, and local nodes in
    ``wheel`` mode.  The venv is named by the wheel's artifact key (the name
    of its store directory, ``<arch>-<content key>``, see
    :func:`plexilab.infra.artifacts.wheel_key`).  *extras* (optional
    dependency groups, e.g. ``api`` for the nodes' HTTP API) are installed
    too, in a venv and wheelhouse of their own (named ``...+<extras>``).
    """
    arch = wheels.host_arch()
    tag = "".join(f"+{e}" for e in extras)
    house = cache / "wheelhouse" / f"{arch}{tag}"
    wheels.download_wheelhouse(arch, house, deps.requirements("runtime", *extras))
    venv = cache / "venvs" / f"{wheel.parent.name}{tag}"
    target = f"{wheel}[{','.join(extras)}]" if extras else str(wheel)
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    want = f"{wheel.name} {artifacts.lock_digest()}"
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return str(python)
    subprocess.run(
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        check=True,
        timeout=timeout,
        capture_output=True,
    )
    proc = subprocess.run(
        [
            str(python), "-I", "-m", "pip", "install", "-q",
            "--disable-pip-version-check", "--no-index", "--find-links", str(house),
            target,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise InstallError(f"pip install of {wheel.name} failed: {proc.stderr[-2000:]}")
    stamp.write_text(want)
    prune(cache / "venvs")
    # wheels were cached here before the artifact store had them: gone for good
    shutil.rmtree(cache / "wheels", ignore_errors=True)
    return str(python)


@dataclass
class Runtime:
    """How to run plexichat on the lab machine and on the hosts.

    ``local_env`` goes to processes on local hosts only (in dev mode it points
    ``PYTHONPATH`` at this checkout); remote hosts run their own install.
    ``local_python`` (wheel mode) is the cached venv local hosts run nodes from.
    """

    lab_python: str
    lab_env: dict[str, str]
    local_env: dict[str, str]
    local_python: str | None = None

    def env_for(self, host: Host) -> dict[str, str]:
        return dict(self.local_env) if is_local(host) else {}


Installer = Callable[[Host], None]


def is_local(host: Host) -> bool:
    """A host whose processes run on this machine (declared by its provider)."""
    return capabilities_of(host).local_python


def lab_runtime(mode: InstallMode, extras: Sequence[str] = ()) -> Runtime:
    """plexichat for the lab's tools (and local hosts): this checkout (``dev``)
    or the wheel in a cached venv (``wheel``, with the optional dependency
    groups *extras*)."""
    if mode == "dev":
        paths = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {"PYTHONPATH": os.pathsep.join(paths)}
        return Runtime(sys.executable, env, env)
    python = local_venv(build_wheel(), extras=extras)
    return Runtime(python, {}, {}, local_python=python)


def use_runtime(
    hosts: Sequence[Host], runtime: Runtime, capabilities: Capabilities
) -> None:
    """Local hosts run their nodes from the runtime's venv (wheel mode)."""
    if runtime.local_python is None or not capabilities.local_python:
        return
    for host in hosts:
        cast(LocalPython, host).set_python(runtime.local_python)


def prepare(
    hosts: Sequence[Host], mode: InstallMode, install: Installer | None = None
) -> Runtime:
    """Make plexichat runnable on the lab side and on every host.

    Local hosts use this checkout (``dev``) or a cached venv with the wheel
    (``wheel``).  Other hosts are installed by *install*; without one they
    must have plexichat already (``check_hosts`` verifies it).  (The run
    pipeline does this through its provider; this is for code that drives a
    :class:`~plexilab.run.nodes.Cluster` by hand.)
    """
    for host in hosts:
        if not is_local(host) and install is not None:
            install(host)
    runtime = lab_runtime(mode)
    use_runtime([h for h in hosts if is_local(h)], runtime, LOCAL)
    return runtime


def check_hosts(
    hosts: Sequence[Host], runtime: Runtime, backend_env: Mapping[str, str]
) -> dict[str, str]:
    """``plexichat.accel.summary()`` on every host (fails if plexichat is missing),
    read from ``python -m plexichat.accel --json``."""
    out = {}
    for host in hosts:
        env = {**runtime.env_for(host), **backend_env}
        result = host.run(
            [host.python(), "-m", "plexichat.accel", "--json"], timeout=120, env=env
        )
        try:
            out[host.name] = str(json.loads(result.stdout)["summary"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InstallError(
                f"{host.name}: plexichat.accel --json said {result.stdout[-500:]!r}"
            ) from exc
    return out
