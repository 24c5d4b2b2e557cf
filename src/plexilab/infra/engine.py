"""Docker provider: engine, local base images, the PlexiChat image, cleanup.

Everything goes through the Docker SDK for Python (``docker`` package), never
through shell strings.

* :func:`ensure_engine` returns a client, installing ``docker.io`` when
  ``dockerd`` is missing and spawning ``dockerd`` (own process group, pidfile
  and log under ``<cache>/docker/engine``) when no engine answers.  The engine
  runs with ``--bridge=none``: containers use host networking on 127.0.0.1 or
  no network at all, so nothing talks to a private bridge range.
* No registry is reachable, so :func:`ensure_base` makes the base images
  locally: ``mmdebstrap --format=tar`` of the host's Debian release (mirror =
  the host's apt sources file, see :mod:`plexilab.infra.images`) streamed into
  ``docker import`` (``api.import_image_from_data``).  The image carries the
  hash of its recipe as a label and is rebuilt only when the recipe changes.
* :func:`build_image` fills the offline wheelhouses of the build context
  (``build/docker/wheels/{build,runtime}``) and builds ``Dockerfile``,
  reporting time, size and how many steps came from the layer cache.
* Everything the lab creates carries :data:`OWNER_LABEL` (and a per-run
  :data:`RUN_LABEL`); :func:`cleanup` removes containers, networks and volumes
  by label.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from plexilab import deps, proc
from plexilab.infra import buildsteps, images, setup_host, wheels

REPO = Path(__file__).resolve().parents[3]
CONTEXT_WHEELS = REPO / "build" / "docker" / "wheels"
IMAGE = "plexilab/plexichat:latest"
OWNER_LABEL = "io.plexilab.owner"
OWNER = "plexilab"
RUN_LABEL = "io.plexilab.run"
RECIPE_LABEL = "io.plexilab.recipe"
BASE_FORMAT = 1  # bump when the base build steps (not the package lists) change
SOCKET = Path("/var/run/docker.sock")
ENGINE_PACKAGES = ("docker.io",)
BASE_TOOLS = ("mmdebstrap",)

# Packages of the two local bases (both --variant=essential).
BASE_PACKAGES: dict[str, tuple[str, ...]] = {
    "base": ("python3", "python3-venv", "libstdc++6"),  # numpy wheels need it
    "build": ("python3", "python3-venv", "python3-dev", "gcc", "libc6-dev"),
}


class ContainerError(RuntimeError):
    """The engine, an image build or a container step failed."""


def run_dir() -> Path:
    """``<cache>/docker/engine``: dockerd's pidfile and log."""
    path = buildsteps.cache_root() / "docker" / "engine"
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- engine ----------------------------------------------------------------------------


def _client(timeout: float = 600.0) -> docker.DockerClient:
    return docker.DockerClient(base_url=f"unix://{SOCKET}", timeout=int(timeout))


def engine_running() -> bool:
    """True when an engine answers on the socket."""
    if not SOCKET.exists():
        return False
    try:
        client = _client(5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except DockerException:
        return False


def install_packages(names: tuple[str, ...]) -> list[str]:
    """Install the missing Debian packages of *names* (root only); return actions."""
    missing = setup_host.missing_packages(names)
    if not missing:
        return []
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise setup_host.HostSetupError(
            f"missing {', '.join(missing)}; run as root:\n    sudo {' '.join(install)}"
        )
    proc = setup_host._run(install)
    if proc.returncode != 0:  # stale lists are the usual cause: refresh, retry
        setup_host._check(["apt-get", "update", "-q"])
        setup_host._check(install)
    return [" ".join(install)]


def install_engine() -> list[str]:
    """Install ``docker.io`` with apt when missing (root only); return actions."""
    return install_packages(ENGINE_PACKAGES)


def _engine_pid() -> int | None:
    pidfile = run_dir() / "dockerd.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if proc.signal_process(pid, 0) else None


def start_engine(timeout: float = 60.0) -> int:
    """Spawn ``dockerd`` in its own process group; wait for the socket; its pid."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise ContainerError("dockerd not found after installing docker.io")
    directory = run_dir()
    log_path = directory / "dockerd.log"
    argv = [
        dockerd,
        f"--pidfile={directory / 'dockerd.pid'}",
        f"--host=unix://{SOCKET}",
        "--bridge=none",  # no default bridge: host loopback or no network
        "--iptables=false",
        "--ip-masq=false",
    ]
    with log_path.open("ab") as log:
        engine = proc.spawn(argv, stdout=log, stderr=subprocess.STDOUT)
    answered = proc.wait_until(
        lambda: engine.poll() is not None or engine_running(), timeout, 0.25
    )
    if engine.poll() is not None:
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise ContainerError(
            f"dockerd exited {engine.returncode}; log {log_path}:\n" + "\n".join(tail)
        )
    if answered:
        return engine.pid
    proc.terminate(engine, grace=10.0)
    raise ContainerError(f"dockerd did not answer within {timeout:g}s; see {log_path}")


def stop_engine(timeout: float = 30.0) -> bool:
    """Stop the dockerd this lab started (from its pidfile); False if none."""
    pid = _engine_pid()
    if pid is None:
        return False
    proc.terminate_pid(pid, None, grace=timeout, interval=0.2)
    return True


def stop_engine_started_since(*, was_running: bool) -> bool:
    """Stop the lab's dockerd unless an engine already ran before (*was_running*).

    For a caller that noted :func:`engine_running` when it began (the test
    suite): an engine that was there before is someone else's and stays.
    """
    if was_running:
        return False
    return stop_engine()


def ensure_engine(timeout: float = 600.0) -> docker.DockerClient:
    """A client of a running engine (installing/starting dockerd when needed)."""
    if not engine_running():
        if shutil.which("dockerd") is None:
            install_engine()
        start_engine()
    return _client(timeout)


# -- base images -----------------------------------------------------------------------


def base_tag(kind: str) -> str:
    """``plexilab/debian-base:<suite>`` or ``plexilab/debian-build:<suite>``."""
    return f"plexilab/debian-{kind}:{images.host_suite()}"


def debian_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}[wheels.host_arch()]


def mmdebstrap_argv(kind: str) -> list[str]:
    """mmdebstrap writing a tarball of the *kind* base to stdout."""
    excludes = [
        "/usr/share/man/*",
        "/usr/share/doc/*",
        "/usr/share/info/*",
        "/usr/share/locale/*",
        "/usr/share/lintian/*",
    ]
    return [
        "mmdebstrap",
        "--quiet",
        "--variant=essential",
        f"--arch={debian_arch()}",
        "--mode=root",
        "--format=tar",
        "--include=" + ",".join(BASE_PACKAGES[kind]),
        "--dpkgopt=force-unsafe-io",
        *(f"--dpkgopt=path-exclude={p}" for p in excludes),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        '--aptopt=Acquire::Languages "none"',
        '--customize-hook=rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*',
        images.host_suite(),
        "-",
        str(images.host_sources()),
    ]


def base_key(kind: str) -> str:
    """Hash of the *kind* base recipe (packages, suite, options, arch)."""
    argv = mmdebstrap_argv(kind)[:-1]  # the sources path is not part of the recipe
    parts = [("argv", "\0".join(argv).encode()), ("format", str(BASE_FORMAT).encode())]
    return buildsteps.digest(parts)


def _image_label(client: docker.DockerClient, tag: str, label: str) -> str | None:
    try:
        found = client.images.get(tag)
    except ImageNotFound:
        return None
    labels = found.attrs.get("Config", {}).get("Labels") or {}
    value = labels.get(label)
    return str(value) if value is not None else None


@dataclass
class BaseResult:
    """One base image: reused from the engine or freshly imported."""

    tag: str
    key: str
    built: bool
    seconds: float
    size: int


def ensure_base(
    client: docker.DockerClient, kind: str, *, rebuild: bool = False
) -> BaseResult:
    """The *kind* base image, made with mmdebstrap | docker import when missing."""
    tag = base_tag(kind)
    key = base_key(kind)
    lock = buildsteps.cache_root() / "docker" / f"base-{kind}.lock"
    with buildsteps.locked(lock):
        start = time.monotonic()
        if not rebuild and _image_label(client, tag, RECIPE_LABEL) == key:
            size = int(client.images.get(tag).attrs["Size"])
            return BaseResult(tag, key, False, 0.0, size)
        if os.geteuid() != 0:
            raise PermissionError("mmdebstrap --mode=root needs root: rerun with sudo")
        install_packages(BASE_TOOLS)
        buildsteps.console.log(f"making {tag} ({key}) with mmdebstrap | docker import")
        bootstrap = proc.spawn(
            mmdebstrap_argv(kind),
            stdin=None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert bootstrap.stdout is not None
        assert bootstrap.stderr is not None
        repository, _, version = tag.rpartition(":")
        changes = [
            f"LABEL {RECIPE_LABEL}={key} {OWNER_LABEL}={OWNER}",
            'CMD ["/bin/sh"]',
            "ENV LANG=C.UTF-8",
        ]
        stdout = bootstrap.stdout
        try:
            client.api.import_image_from_data(
                iter(lambda: stdout.read(1 << 20), b""),
                repository=repository,
                tag=version,
                changes=changes,
            )
        except BaseException:
            proc.signal_group(bootstrap.pid, signal.SIGKILL)
            raise
        finally:
            err = bootstrap.stderr.read().decode(errors="replace")
            bootstrap.wait()
        if bootstrap.returncode != 0:
            raise ContainerError(
                f"mmdebstrap exited {bootstrap.returncode}:\n{err[-3000:]}"
            )
        if _image_label(client, tag, RECIPE_LABEL) != key:
            raise ContainerError(f"docker import did not produce {tag}")
        size = int(client.images.get(tag).attrs["Size"])
        seconds = round(time.monotonic() - start, 2)
        buildsteps.console.log(f"{tag}: {buildsteps.mb(size)} in {seconds:.1f} s")
        return BaseResult(tag, key, True, seconds, size)


# -- the plexichat image ---------------------------------------------------------------


def prepare_context() -> dict[str, float]:
    """Fill the offline wheelhouses of the build context (stamp-cached)."""
    arch = wheels.host_arch()
    return {
        "build": wheels.download_wheelhouse(
            arch, CONTEXT_WHEELS / "build", deps.requirements("build")
        ),
        "runtime": wheels.download_wheelhouse(
            arch, CONTEXT_WHEELS / "runtime", deps.requirements("runtime")
        ),
    }


CONTEXT_PATHS = (
    "Dockerfile",
    ".dockerignore",
    "setup.py",
    "pyproject.toml",
    "README.md",
    "src/plexichat",
)


def resolve(commit: str = "HEAD") -> str:
    """The full hash of *commit* (pin it when building more than once)."""
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", commit + "^{commit}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ContainerError(f"unknown commit {commit!r}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def head_context(commit: str = "HEAD") -> io.BytesIO:
    """A build context tar of *commit*'s sources plus the context wheelhouses."""
    proc = subprocess.run(
        ["git", "archive", "--format=tar", commit, "--", *CONTEXT_PATHS],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ContainerError(f"git archive failed: {proc.stderr.decode()[-2000:]}")
    buf = io.BytesIO(proc.stdout)
    with tarfile.open(fileobj=buf, mode="a") as tar:
        for path in sorted(CONTEXT_WHEELS.rglob("*.whl")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(REPO)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    buf.seek(0)
    return buf


@dataclass
class BuildResult:
    """One ``docker build`` of the PlexiChat image."""

    tag: str
    image_id: str
    seconds: float
    size: int
    steps: int
    cached_steps: int
    bases: list[dict[str, Any]] = field(default_factory=list)
    wheelhouse_seconds: dict[str, float] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["log"] = self.log[-200:]
        return doc


STEP_RE = re.compile(r"^Step (\d+)/(\d+) : ")


def build_image(
    client: docker.DockerClient | None = None,
    *,
    tag: str = IMAGE,
    nocache: bool = False,
    rebuild_base: bool = False,
    progress: bool = False,
    source: str = "head",
    commit: str = "HEAD",
) -> BuildResult:
    """Build ``Dockerfile`` offline (no network) into *tag*; time, size, cache hits.

    *source* ``head`` builds the committed sources of *commit* (``git archive``:
    other people's uncommitted edits neither break nor re-key the build);
    ``worktree`` sends the working tree (filtered by ``.dockerignore``).
    """
    client = client or ensure_engine()
    bases = [ensure_base(client, k, rebuild=rebuild_base) for k in ("base", "build")]
    fetched = prepare_context()
    start = time.monotonic()
    lines: list[str] = []
    steps = cached = 0
    image_id = ""
    if source == "head":
        where: dict[str, Any] = {
            "fileobj": head_context(commit),
            "custom_context": True,
        }
    elif source == "worktree":
        where = {"path": str(REPO)}
    else:
        raise ValueError(f"source must be head or worktree, not {source!r}")
    stream = client.api.build(
        **where,
        dockerfile="Dockerfile",
        tag=tag,
        rm=True,
        forcerm=True,
        nocache=nocache,
        network_mode="none",
        buildargs={"BASE": bases[0].tag, "BUILD_BASE": bases[1].tag},
        labels={OWNER_LABEL: OWNER},
        decode=True,
    )
    for chunk in stream:
        if "error" in chunk:
            tail = "\n".join(lines[-30:])
            raise ContainerError(f"docker build failed: {chunk['error']}\n{tail}")
        text = chunk.get("stream", "")
        for line in text.splitlines():
            if not line.strip():
                continue
            lines.append(line)
            if STEP_RE.match(line):
                steps += 1
            if "Using cache" in line:
                cached += 1
            if progress:
                buildsteps.console.log(line)
        aux = chunk.get("aux")
        if isinstance(aux, dict) and "ID" in aux:
            image_id = str(aux["ID"])
    seconds = round(time.monotonic() - start, 2)
    built = client.images.get(tag)
    return BuildResult(
        tag=tag,
        image_id=image_id or str(built.id),
        seconds=seconds,
        size=int(built.attrs["Size"]),
        steps=steps,
        cached_steps=cached,
        bases=[asdict(b) for b in bases],
        wheelhouse_seconds={k: round(v, 2) for k, v in fetched.items()},
        log=lines,
    )


def image_ready(client: docker.DockerClient, tag: str = IMAGE) -> bool:
    try:
        client.images.get(tag)
    except ImageNotFound:
        return False
    return True


# -- labels and cleanup ----------------------------------------------------------------


def new_run_id() -> str:
    return time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]


def labels(run_id: str, **extra: str) -> dict[str, str]:
    """Labels of everything a run creates."""
    return {OWNER_LABEL: OWNER, RUN_LABEL: run_id, **extra}


def _filters(run_id: str | None) -> dict[str, list[str]]:
    wanted = [f"{OWNER_LABEL}={OWNER}"]
    if run_id:
        wanted.append(f"{RUN_LABEL}={run_id}")
    return {"label": wanted}


def cleanup(client: docker.DockerClient, run_id: str | None = None) -> dict[str, int]:
    """Remove the lab's containers, networks and volumes (of one run, or all)."""
    removed = {"containers": 0, "networks": 0, "volumes": 0}
    for container in client.containers.list(all=True, filters=_filters(run_id)):
        with contextlib.suppress(NotFound):
            container.remove(force=True, v=True)
            removed["containers"] += 1
    for network in client.networks.list(filters=_filters(run_id)):
        with contextlib.suppress(NotFound, APIError):
            network.remove()
            removed["networks"] += 1
    for volume in client.volumes.list(filters=_filters(run_id)):
        with contextlib.suppress(NotFound, APIError):
            volume.remove(force=True)
            removed["volumes"] += 1
    return removed


def leftovers(client: docker.DockerClient, run_id: str | None = None) -> int:
    """How many labelled containers, networks and volumes still exist."""
    f = _filters(run_id)
    return (
        len(client.containers.list(all=True, filters=f))
        + len(client.networks.list(filters=f))
        + len(client.volumes.list(filters=f))
    )


@contextlib.contextmanager
def cleaned(client: docker.DockerClient, run_id: str) -> Iterator[dict[str, int]]:
    """Remove everything labelled with *run_id* on exit (success, error, Ctrl-C)."""
    removed: dict[str, int] = {}
    try:
        yield removed
    finally:
        removed.update(cleanup(client, run_id))
