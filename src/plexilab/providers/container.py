"""Container host provider: each host is a set of Docker containers of one image.

A :class:`ContainerHost` owns a labelled volume (its workdir, shared by all its
containers) and a small idle *helper* container (no network) that serves
:meth:`~ContainerHost.run` (``exec``) and :meth:`~ContainerHost.put` /
:meth:`~ContainerHost.get` (``put_archive`` / ``get_archive``).
:meth:`~ContainerHost.spawn` starts the process as its own container -- the
node container -- on the host network, listening on a free 127.0.0.1 port;
the image's HEALTHCHECK pings it.  Signals, exit codes and waits map to
``container.kill``/``wait``.  Everything carries the run's labels, so
:func:`plexilab.infra.engine.cleanup` removes it whatever happens.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import signal
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import docker
import requests
from docker.errors import APIError, NotFound
from docker.models.containers import Container

from plexilab.host import CommandResult, Host, HostError, Process
from plexilab.infra.engine import IMAGE, cleanup, labels, leftovers, new_run_id
from plexilab.proc import wait_until
from plexilab.providers.base import (
    Capabilities,
    Phases,
    Progress,
    Provider,
    ProviderReport,
    Sampler,
    register,
)
from plexilab.providers.local import LoopbackHost, free_ports

WORKDIR = "/var/lib/plexichat"
PYTHON = "/opt/plexichat/bin/python"
USER = "10001:10001"
# The node container's entrypoint: append the process's output to its log on
# the shared volume, then become the process (PID 1 gets the signals).
_LOGGED = 'mkdir -p "$(dirname "$PLEXILAB_LOG")" && exec "$@" >>"$PLEXILAB_LOG" 2>&1'


class ContainerProcess(Process):
    """A process that is a container: pid, signals and exit code from the engine."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self._pid = 0
        self._code: int | None = None

    @property
    def name(self) -> str:
        return str(self.container.name)

    @property
    def pid(self) -> int:
        if not self._pid:
            with contextlib.suppress(NotFound):
                self.container.reload()
                self._pid = int(self.container.attrs["State"]["Pid"])
        return self._pid

    def state(self) -> dict[str, Any]:
        """``State`` of the container (Status, ExitCode, Health...)."""
        try:
            self.container.reload()
        except NotFound:
            return {"Status": "removed", "ExitCode": self._code}
        state: dict[str, Any] = self.container.attrs["State"]
        return state

    def health(self) -> str:
        """``healthy``, ``unhealthy``, ``starting`` or ``none``."""
        return str(self.state().get("Health", {}).get("Status", "none"))

    def alive(self) -> bool:
        status = self.state().get("Status")
        return status in ("created", "running", "restarting", "paused")

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(NotFound, APIError):
            self.container.kill(signal=signal.Signals(signum).name)

    def wait(self, timeout: float) -> int | None:
        state = self.state()
        if state.get("Status") in ("exited", "dead", "removed"):
            code = state.get("ExitCode")
            self._code = int(code) if code is not None else self._code
            return self._code
        if timeout <= 0:
            return None
        try:
            result = self.container.wait(timeout=max(1, round(timeout)))
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            return None
        except NotFound:
            return self._code
        self._code = int(result["StatusCode"])
        return self._code


class ContainerHost(LoopbackHost):
    """A host made of containers of *image* sharing one labelled volume."""

    def __init__(
        self,
        client: docker.DockerClient,
        name: str,
        run_id: str,
        *,
        image: str = IMAGE,
        ports: int = 4,
        arch: str = "",
    ) -> None:
        self.client = client
        self.name = name
        self.run_id = run_id
        self.image = image
        self.prefix = f"plexilab-{run_id}-{name}"
        self._ports = free_ports(ports)
        self.processes: list[ContainerProcess] = []
        self.volume = client.volumes.create(
            name=self.prefix, labels=labels(run_id, **{"io.plexilab.host": name})
        )
        self.helper: Container = client.containers.run(
            image,
            entrypoint=["sleep", "infinity"],
            command=[],
            name=f"{self.prefix}-helper",
            detach=True,
            network_mode="none",
            user=USER,
            volumes={self.volume.name: {"bind": WORKDIR, "mode": "rw"}},
            labels=labels(run_id, **{"io.plexilab.host": name}),
            healthcheck={"test": ["NONE"]},
        )
        self.arch = arch or self._uname()

    def _uname(self) -> str:
        return self.run(["uname", "-m"], timeout=30).stdout.strip()

    # -- commands ------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> CommandResult:
        start = time.monotonic()
        bounded = ["timeout", "-s", "KILL", f"{max(1.0, timeout):g}", *argv]
        try:
            code, (out, err) = self.helper.exec_run(
                bounded, environment=dict(env or {}), demux=True, workdir=WORKDIR
            )
        except (APIError, requests.exceptions.RequestException) as exc:
            raise HostError(f"exec {' '.join(argv)} in {self.name}: {exc}") from exc
        if code == 137 and time.monotonic() - start >= timeout:
            raise HostError(f"{' '.join(argv)} timed out after {timeout}s")
        result = CommandResult(
            tuple(argv),
            int(code),
            (out or b"").decode(errors="replace"),
            (err or b"").decode(errors="replace"),
            time.monotonic() - start,
        )
        return result.check() if check else result

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: str,
        env: Mapping[str, str] | None = None,
    ) -> ContainerProcess:
        environment = {**(env or {}), "PLEXILAB_LOG": log_path}
        args = list(argv)
        if "--listen" in args:  # the image's HEALTHCHECK pings this address
            environment["PLEXICHAT_HEALTH"] = args[args.index("--listen") + 1]
        index = len(self.processes)
        try:
            container = self.client.containers.run(
                self.image,
                entrypoint=["/bin/sh", "-c", _LOGGED, "sh"],
                command=args,
                name=f"{self.prefix}-p{index}",
                detach=True,
                network_mode="host",
                user=USER,
                environment=environment,
                volumes={self.volume.name: {"bind": WORKDIR, "mode": "rw"}},
                labels=labels(
                    self.run_id,
                    **{"io.plexilab.host": self.name, "io.plexilab.role": "node"},
                ),
            )
        except APIError as exc:
            raise HostError(f"cannot start {argv[0]} in {self.name}: {exc}") from exc
        process = ContainerProcess(container)
        self.processes.append(process)
        return process

    # -- files ---------------------------------------------------------------------

    def put(self, local: Path, remote: str) -> None:
        directory = posixpath.dirname(remote) or "/"
        self.run(["mkdir", "-p", directory], timeout=30)
        buf = io.BytesIO()
        data = local.read_bytes()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(posixpath.basename(remote))
            info.size = len(data)
            info.mode = 0o644
            info.uid = info.gid = 10001
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        try:
            ok = self.helper.put_archive(directory, buf.getvalue())
        except (APIError, NotFound) as exc:
            raise HostError(f"cannot put {remote} on {self.name}: {exc}") from exc
        if not ok:
            raise HostError(f"cannot put {remote} on {self.name}")

    def get(self, remote: str, local: Path) -> None:
        try:
            chunks, _stat = self.helper.get_archive(remote)
            data = b"".join(chunks)
        except (APIError, NotFound) as exc:
            raise HostError(f"cannot get {remote} from {self.name}: {exc}") from exc
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next((m for m in tar.getmembers() if m.isfile()), None)
            fh = tar.extractfile(member) if member is not None else None
            if fh is None:
                raise HostError(f"{remote} on {self.name} is not a file")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(fh.read())

    # -- layout --------------------------------------------------------------------

    def python(self) -> str:
        return PYTHON

    def workdir(self) -> str:
        return f"{WORKDIR}/work"

    def pause(self, process: Process) -> None:
        """Freeze a node container (cgroup freezer: ``docker pause``)."""
        if isinstance(process, ContainerProcess):
            with contextlib.suppress(NotFound, APIError):
                process.container.pause()
        else:
            super().pause(process)

    def resume(self, process: Process) -> None:
        """Undo :meth:`pause` (harmless on a container that runs)."""
        if isinstance(process, ContainerProcess):
            with contextlib.suppress(NotFound, APIError):
                process.container.unpause()
        else:
            super().resume(process)

    def close(self) -> None:
        """Stop and remove this host's containers and its volume."""
        for process in self.processes:
            with contextlib.suppress(NotFound, APIError):
                process.stop(timeout=5.0)
                process.container.remove(force=True)
        self.processes.clear()
        with contextlib.suppress(NotFound, APIError):
            self.helper.remove(force=True)
        with contextlib.suppress(NotFound, APIError):
            self.volume.remove(force=True)


def wait_healthy(
    processes: Sequence[ContainerProcess], timeout: float = 30.0
) -> dict[str, str]:
    """Poll the containers' HEALTHCHECK until all are healthy (or *timeout*)."""
    status: dict[str, str] = {}

    def settled() -> bool:
        status.update({p.name: p.health() for p in processes})
        return all(s in ("healthy", "unhealthy", "none") for s in status.values())

    wait_until(settled, timeout, interval=0.5)
    return status


# containers of the lab host's engine: signals and docker pause
CONTAINERS = Capabilities()
register(ContainerHost, "container", CONTAINERS)


class _Health:
    """Sampler: every node container's HEALTHCHECK once the cluster converged."""

    def __init__(self, hosts: Sequence[ContainerHost]) -> None:
        self.hosts = hosts
        self.status: dict[str, str] = {}

    def on_step(self, step: str) -> None:
        if step == "converged":
            procs = [p for h in self.hosts for p in h.processes]
            self.status.update(wait_healthy(procs))

    def stop(self) -> None:
        pass


class ContainerProvider(Provider):
    """One container host per node (or *hosts*) on the lab host's engine.

    Everything carries the run's labels: teardown closes the hosts, then
    removes whatever still carries them (success, failure and Ctrl-C) and
    counts what is left (``containers`` in the result).
    """

    name = "container"
    capabilities = CONTAINERS

    def __init__(
        self, client: docker.DockerClient, *, image: str = IMAGE, hosts: int = 0
    ) -> None:
        self.client = client
        self.image = image
        self.count = hosts
        self.run_id = new_run_id()
        self.hosts: list[ContainerHost] = []
        self.health = _Health(self.hosts)
        self.removed: dict[str, int] = {}

    def provision(self, nodes: int, phases: Phases, progress: Progress) -> list[Host]:
        count = self.count or nodes
        for i in range(count):
            self.hosts.append(
                ContainerHost(self.client, f"c{i}", self.run_id, image=self.image)
            )
        progress(f"run {self.run_id}: {count} container hosts of {self.image}")
        return list(self.hosts)

    def samplers(self) -> list[Sampler]:
        return [self.health]

    def teardown(self) -> None:
        try:
            for host in self.hosts:
                host.close()
        finally:
            self.removed = cleanup(self.client, self.run_id)

    def report(self) -> ProviderReport:
        return ProviderReport(
            containers={
                "run_id": self.run_id,
                "image": self.image,
                "health": dict(self.health.status),
                "removed": self.removed,
                "leftovers": leftovers(self.client, self.run_id),
            }
        )
