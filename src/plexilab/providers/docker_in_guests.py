"""Containers in QEMU guests: the guests' Docker engines, driven over SSH.

``invoke qemu.cluster --runtime=docker`` boots the ``docker`` variant of the
guest image (:mod:`plexilab.infra.images`: Debian's ``docker.io``, the ``overlay``
module and ``/usr/local/sbin/plexilab-dockerd``) and then, per guest:

* :func:`start_dockerd` runs ``plexilab-dockerd`` over SSH: it mounts cgroup2,
  starts ``dockerd --bridge=none --iptables=false`` and waits until it answers;
* :func:`engine_client` is a Docker SDK client of the guest's engine at an
  ``ssh://`` base URL.  The SDK's own paramiko adapter reads ``~/.ssh/config``
  and the user's known hosts; :class:`LabSSHAdapter` replaces it with one that
  uses the lab key and the guest's pinned host key only (``RejectPolicy``),
  and never touches ``~/.ssh``;
* :func:`saved_image` is ``docker save`` of the PlexiChat image on the lab
  host's engine (SDK ``image.save()`` stream), gzip-compressed once and cached
  per image id; :func:`load_image` streams it into the guest's engine
  (``POST /images/load`` through the SSH adapter) and measures MB/s;
* :class:`GuestContainerHost` is a :class:`~plexilab.providers.container.ContainerHost`
  on a guest's engine whose endpoints are the guest's: node containers use the
  guest's host network and listen on the same guest ports as the process
  runtime, so QEMU's forwards and guestfwd relays carry them unchanged.

:class:`DockerGuests` does all of it for a set of booted guests and removes
every container and volume it made (success, failure or Ctrl-C).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound
from docker.transport import SSHHTTPAdapter

from plexilab.host import Endpoint, Host, HostError
from plexilab.infra import buildsteps
from plexilab.infra import engine as containers
from plexilab.infra.engine import IMAGE, cleanup, leftovers, new_run_id
from plexilab.infra.ssh import SSHHost
from plexilab.infra.sshclient import SSHClient, wait_for_banner
from plexilab.providers.base import (
    Capabilities,
    Phases,
    ProviderReport,
    ProviderUnavailable,
    register,
)
from plexilab.providers.container import ContainerHost
from plexilab.providers.guests import GuestPlan, QemuProvider
from plexilab.providers.qemu import QemuHost, RelayNetwork

VARIANT = "docker"
DOCKERD = "/usr/local/sbin/plexilab-dockerd"
API_VERSION = "1.41"  # Debian bookworm's docker.io 20.10 (re-read from the engine)
SSH_BASE = "http+docker://ssh"
CHUNK = 1 << 20
Progress = Callable[[str], None]


class GuestDockerError(HostError):
    """The guest's engine did not start, or the image did not load."""


# -- the SDK over SSH ------------------------------------------------------------------


def base_url(ssh: SSHClient) -> str:
    """``ssh://user@host:port`` of *ssh*'s target."""
    return f"ssh://{ssh.user}@{ssh.host}:{ssh.port}"


class LabSSHAdapter(SSHHTTPAdapter):  # type: ignore[misc]
    """The Docker SDK's paramiko adapter with the lab's SSH identity.

    ``SSHHTTPAdapter._create_paramiko_client`` parses ``~/.ssh/config`` and
    loads the user's known hosts; this override takes a fresh paramiko client
    from *ssh* instead (the guest's pinned host key only, ``RejectPolicy``) and
    connects with the lab key (no agent, no key files).  ``_connect`` (also
    used by the SDK to reconnect) waits for the SSH banner first, like
    :meth:`plexilab.infra.ssh.SSHClient.connect`.
    """

    def __init__(
        self,
        ssh: SSHClient,
        *,
        timeout: int = 600,
        pool_connections: int = 9,
        max_pool_size: int = 10,
    ) -> None:
        self.lab_ssh = ssh
        super().__init__(
            base_url(ssh),
            timeout,
            pool_connections=pool_connections,
            max_pool_size=max_pool_size,
            shell_out=False,
        )

    def _create_paramiko_client(self, base_url: str) -> None:
        self.ssh_client = self.lab_ssh.new_paramiko_client()
        self.ssh_params = self.lab_ssh.connect_kwargs()

    def _connect(self) -> None:
        if self.ssh_client is None:
            return
        sock = wait_for_banner(self.lab_ssh.host, self.lab_ssh.port, 30.0)
        try:
            self.ssh_client.connect(sock=sock, **self.ssh_params)
        except BaseException:
            sock.close()
            raise


def engine_client(ssh: SSHClient, *, timeout: int = 600) -> docker.DockerClient:
    """A Docker SDK client of the engine behind *ssh* (``ssh://`` base URL).

    The client is created with the SDK's shell-out transport (which connects
    lazily and so never runs ``ssh``), then the :class:`LabSSHAdapter` is
    mounted in its place before the first request.
    """
    client = docker.DockerClient(
        base_url=base_url(ssh),
        version=API_VERSION,
        timeout=timeout,
        use_ssh_client=True,
    )
    api = client.api
    shell_out = api._custom_adapter
    adapter = LabSSHAdapter(ssh, timeout=timeout)
    api.mount(SSH_BASE, adapter)
    api._custom_adapter = adapter
    shell_out.close()
    try:
        api._version = api._retrieve_server_version()
    except DockerException:
        client.close()
        raise
    return client


# -- the guest's engine ----------------------------------------------------------------


@dataclass(frozen=True)
class DockerdReady:
    """``plexilab-dockerd`` over SSH: its wall time, the guest uptime at the end."""

    seconds: float
    uptime_s: float


def start_dockerd(host: SSHHost, timeout: float = 240.0) -> DockerdReady:
    """Start the guest's engine (cgroup2 + dockerd) and wait until it answers."""
    start = time.monotonic()
    res = host.ssh.run([DOCKERD, str(int(timeout))], timeout=timeout + 30, check=False)
    if res.returncode != 0:
        raise GuestDockerError(
            f"{host.name}: {DOCKERD} exited {res.returncode}: "
            f"{(res.stderr or res.stdout)[-2000:]}"
        )
    try:
        uptime = float(res.stdout.split()[-1])
    except (IndexError, ValueError):
        uptime = float("nan")
    return DockerdReady(round(time.monotonic() - start, 2), uptime)


# -- moving the image ------------------------------------------------------------------


@dataclass(frozen=True)
class SavedImage:
    """``docker save`` of an image, gzip-compressed, in the lab cache."""

    tag: str
    image_id: str
    path: Path
    raw_bytes: int
    bytes: int
    seconds: float  # 0 when it came from the cache


def saved_image(
    local: docker.DockerClient, tag: str = IMAGE, *, level: int = 1
) -> SavedImage:
    """*tag* saved from the lab host's engine (``image.save()``), gzip *level*.

    Cached per image id under ``<cache>/docker/save``: every guest of a run
    (and later runs of the same image) stream the same file.
    """
    image = local.images.get(tag)
    image_id = str(image.id).split(":")[-1]
    directory = buildsteps.cache_root() / "docker" / "save"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{image_id[:16]}-gz{level}.tar.gz"
    raw_file = path.with_suffix(".raw")
    with buildsteps.locked(path.with_suffix(".lock")):
        if path.is_file() and raw_file.is_file():
            raw = int(raw_file.read_text())
            return SavedImage(tag, image_id, path, raw, path.stat().st_size, 0.0)
        start = time.monotonic()
        tmp = path.with_suffix(".tmp")
        raw = 0
        gz = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        with tmp.open("wb") as fh:
            for chunk in image.save(chunk_size=CHUNK, named=True):
                raw += len(chunk)
                fh.write(gz.compress(chunk))
            fh.write(gz.flush())
        tmp.replace(path)
        raw_file.write_text(str(raw))
        return SavedImage(
            tag,
            image_id,
            path,
            raw,
            path.stat().st_size,
            round(time.monotonic() - start, 2),
        )


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def load_image(client: docker.DockerClient, saved: SavedImage) -> dict[str, Any]:
    """Stream *saved* into the engine of *client* (``docker load``); timings."""
    start = time.monotonic()
    messages: list[str] = []
    try:
        for item in client.api.load_image(_chunks(saved.path)):
            if "error" in item:
                raise GuestDockerError(f"docker load: {item['error']}")
            if "stream" in item:
                messages.append(str(item["stream"]).strip())
    except (APIError, DockerException) as exc:
        raise GuestDockerError(f"docker load: {exc}") from exc
    seconds = time.monotonic() - start
    try:
        loaded = client.images.get(saved.tag)
    except ImageNotFound:
        raise GuestDockerError(f"docker load did not produce {saved.tag}") from None
    if str(loaded.id).split(":")[-1] != saved.image_id:
        raise GuestDockerError(f"{saved.tag} in the guest is not the saved image")
    return {
        "seconds": round(seconds, 2),
        "bytes": saved.bytes,
        "raw_bytes": saved.raw_bytes,
        "mb_per_s": round(saved.bytes / 1e6 / seconds, 2),
        "raw_mb_per_s": round(saved.raw_bytes / 1e6 / seconds, 2),
        "messages": messages[-5:],
    }


# -- hosts -----------------------------------------------------------------------------


class GuestContainerHost(ContainerHost):
    """Containers on a guest's engine, reached at the guest's endpoints.

    Node containers run on the guest's host network and listen on the guest
    ports the process runtime would use, so the lab reaches them through the
    guest's ``hostfwd`` ports and other guests through its guestfwd relays.
    """

    def __init__(
        self,
        client: docker.DockerClient,
        guest: QemuHost,
        run_id: str,
        *,
        image: str = IMAGE,
    ) -> None:
        self.guest = guest
        super().__init__(
            client, guest.name, run_id, image=image, ports=0, arch=guest.arch
        )

    @staticmethod
    def _guest_of(host: Host) -> Host:
        return host.guest if isinstance(host, GuestContainerHost) else host

    def listen_endpoint(self, index: int) -> Endpoint:
        return self.guest.listen_endpoint(index)

    def lab_endpoint(self, index: int) -> Endpoint:
        return self.guest.lab_endpoint(index)

    def peer_endpoint(self, index: int, from_host: Host) -> Endpoint:
        return self.guest.peer_endpoint(index, self._guest_of(from_host))

    def network_for(self, nodes: Sequence[tuple[Host, int]]) -> RelayNetwork:
        """Partitions through the guests' relays (as for the process runtime)."""
        return RelayNetwork([(self._guest_of(h), i) for h, i in nodes])


# containers on the guests' engines: signals, docker pause, the guests' relays
DOCKER_IN_GUESTS = Capabilities(
    fault_kinds=frozenset({"kill", "pause", "partition", "split"})
)
register(GuestContainerHost, "qemu", DOCKER_IN_GUESTS)


@dataclass
class GuestEngine:
    """One guest's engine as used by a run."""

    guest: QemuHost
    dockerd: DockerdReady | None = None
    client: docker.DockerClient | None = None
    load: dict[str, Any] = field(default_factory=dict)
    host: GuestContainerHost | None = None
    removed: dict[str, int] = field(default_factory=dict)
    leftovers: int = -1

    def report(self) -> dict[str, Any]:
        return {
            "dockerd_s": self.dockerd.seconds if self.dockerd else None,
            "uptime_at_dockerd_ready_s": self.dockerd.uptime_s
            if self.dockerd
            else None,
            "load": self.load,
            "removed": self.removed,
            "leftovers": self.leftovers,
        }


class DockerGuests:
    """Engines, the image and one :class:`GuestContainerHost` per booted guest."""

    def __init__(
        self,
        guests: Sequence[QemuHost],
        saved: SavedImage,
        *,
        run_id: str | None = None,
        dockerd_timeout: float = 240.0,
    ) -> None:
        self.saved = saved
        self.run_id = run_id or new_run_id()
        self.dockerd_timeout = dockerd_timeout
        self.engines = [GuestEngine(g) for g in guests]

    @property
    def hosts(self) -> list[GuestContainerHost]:
        return [e.host for e in self.engines if e.host is not None]

    def _prepare(self, engine: GuestEngine) -> None:
        engine.dockerd = start_dockerd(engine.guest, self.dockerd_timeout)
        engine.client = engine_client(engine.guest.ssh)
        engine.load = load_image(engine.client, self.saved)
        engine.host = GuestContainerHost(
            engine.client, engine.guest, self.run_id, image=self.saved.tag
        )

    def start(self, progress: Progress = lambda _msg: None) -> list[GuestContainerHost]:
        """Start every engine, load the image, make the hosts (guests in parallel)."""
        progress(
            f"dockerd + docker load ({self.saved.bytes / 1e6:.0f} MB gzip of "
            f"{self.saved.raw_bytes / 1e6:.0f} MB) in {len(self.engines)} guests"
        )
        try:
            with concurrent.futures.ThreadPoolExecutor(len(self.engines)) as pool:
                list(pool.map(self._prepare, self.engines))
        except BaseException:
            self.close()
            raise
        return self.hosts

    def _close_one(self, engine: GuestEngine) -> None:
        if engine.host is not None:
            with contextlib.suppress(Exception):
                engine.host.close()
        if engine.client is not None:
            try:
                engine.removed = cleanup(engine.client, self.run_id)
                engine.leftovers = leftovers(engine.client, self.run_id)
            except (DockerException, OSError) as exc:
                engine.removed = {"error": 1}
                buildsteps.console.log(f"{engine.guest.name}: cleanup failed: {exc!r}")
            finally:
                with contextlib.suppress(Exception):
                    engine.client.close()
                engine.client = None

    def close(self) -> None:
        """Remove this run's containers and volumes in every guest (idempotent)."""
        engines = [e for e in self.engines if e.client is not None or e.host]
        if not engines:
            return
        with concurrent.futures.ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(self._close_one, engines))

    def report(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "image": self.saved.tag,
            "image_id": self.saved.image_id,
            "save": {
                "bytes": self.saved.bytes,
                "raw_bytes": self.saved.raw_bytes,
                "seconds": self.saved.seconds,
            },
            "guests": {e.guest.name: e.report() for e in self.engines},
        }

    def __enter__(self) -> DockerGuests:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the provider ----------------------------------------------------------------------


def docker_artifacts(progress: Progress) -> tuple[SavedImage, dict[str, Any]]:
    """The PlexiChat image on the lab host's engine (built from HEAD, layer
    cache), saved and gzip-compressed for the guests (cached per image id)."""
    try:
        client = containers.ensure_engine()
    except (containers.ContainerError, DockerException, PermissionError) as exc:
        raise ProviderUnavailable(f"no Docker engine on the lab host: {exc}") from exc
    try:
        progress(f"docker build {containers.IMAGE} (HEAD, layer cache)")
        built = containers.build_image(client, source="head")
        saved = saved_image(client, containers.IMAGE)
    finally:
        client.close()
    return saved, {
        "seconds": built.seconds,
        "size": built.size,
        "steps": built.steps,
        "cached_steps": built.cached_steps,
        "save_s": saved.seconds,
    }


class DockerInGuestsProvider(QemuProvider):
    """QEMU guests of the ``docker`` image variant whose engines run the nodes
    as containers of the lab host's PlexiChat image (``--runtime=docker``)."""

    capabilities = DOCKER_IN_GUESTS

    def __init__(self, plan: GuestPlan, **kwargs: Any) -> None:
        plan.variant = VARIANT
        super().__init__(plan, **kwargs)
        self.saved: SavedImage | None = None
        self.build: dict[str, Any] = {}
        self.engines: DockerGuests | None = None

    def artifacts(self, phases: Phases, progress: Progress) -> None:
        self.saved, self.build = docker_artifacts(progress)
        self.check_images()

    def provision(self, nodes: int, phases: Phases, progress: Progress) -> list[Host]:
        super().provision(nodes, phases, progress)  # the guests
        assert self.saved is not None
        assert self.lab is not None
        self.engines = DockerGuests(self.lab.hosts, self.saved)
        with phases("docker"):
            hosts = self.engines.start(progress)
        progress(
            "engines ready: "
            + ", ".join(
                f"{n} dockerd {g['dockerd_s']:.1f}s, "
                f"load {g['load']['seconds']:.1f}s "
                f"({g['load']['mb_per_s']:.2f} MB/s)"
                for n, g in self.engines.report()["guests"].items()
            )
        )
        return list(hosts)

    def teardown(self) -> None:
        try:
            if self.engines is not None:
                self.engines.close()  # containers and volumes first, then the guests
        finally:
            super().teardown()

    def report(self) -> ProviderReport:
        report = super().report()
        report.runtime = "docker"
        if self.engines is not None:
            report.docker = {**self.engines.report(), "build": self.build}
        return report
