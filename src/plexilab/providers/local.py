"""Local-process host provider: nodes are processes on this machine.

Every endpoint is on 127.0.0.1; ports are picked free when the host is made
(one per node index).  Spawned processes get their own session (process
group) so that stopping one also stops whatever it started.

No stray nodes: a spawned process dies with the lab, even a SIGKILLed one.
It is forked from the lab's process-lifetime launcher thread
(:func:`plexilab.infra.rundir.in_launcher`; ``PR_SET_PDEATHSIG`` follows the
thread that forked, and nodes are also restarted from worker threads such as
the fault injector's) with ``PR_SET_PDEATHSIG=SIGKILL``.  It is also recorded
as a pidfile (:func:`plexilab.proc.write_pidfile`) in the lab's run directory
(:func:`plexilab.infra.rundir.current_run_dir`), removed once the process has
been waited for, so :func:`plexilab.infra.rundir.reap` (``invoke qemu.reap``,
and every later lab run) kills it should the signal not have fired.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from plexilab import proc
from plexilab.host import CommandResult, Endpoint, Host, HostError, Process
from plexilab.infra import rundir
from plexilab.providers.base import Capabilities, Phases, Progress, Provider, register

LOOPBACK = "127.0.0.1"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """*count* distinct TCP ports that are free on *host* right now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LoopbackHost(Host):
    """A host whose nodes listen on ports of 127.0.0.1 picked for them
    (``_ports``, one per host-local node index), reached there by the lab
    and by each other."""

    name: str
    _ports: list[int]

    def _port(self, index: int) -> int:
        if not 0 <= index < len(self._ports):
            raise HostError(
                f"{self.name} has ports for node indexes 0..{len(self._ports) - 1}"
            )
        return self._ports[index]

    def listen_endpoint(self, index: int) -> Endpoint:
        return Endpoint(LOOPBACK, self._port(index))

    def lab_endpoint(self, index: int) -> Endpoint:
        return Endpoint(LOOPBACK, self._port(index))

    def peer_endpoint(self, index: int, from_host: Host) -> Endpoint:
        return Endpoint(LOOPBACK, self._port(index))


class LocalProcess(Process):
    """A ``subprocess.Popen`` in its own session; signals go to its group.

    *pidfile* (the reaper's record of it) is removed once it has been waited for.
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        log: IO[bytes],
        log_path: str,
        pidfile: Path | None = None,
    ) -> None:
        self.popen = popen
        self.log_path = log_path
        self.pidfile = pidfile
        self._log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is not None:
            return
        proc.signal_group(self.popen.pid, signum)

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None
        if not self._log.closed:
            self._log.close()
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)
        return code

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait, then SIGKILL (:func:`plexilab.proc.terminate`)."""
        proc.terminate(self.popen, grace=timeout, kill_grace=timeout)
        return self.wait(0)

    def kill(self) -> int | None:
        """SIGKILL the whole group (a crash, for fault tests)."""
        self.send_signal(signal.SIGKILL)
        return self.wait(10.0)


class LocalHost(LoopbackHost):
    """This machine as a host: subprocesses, file copies, loopback ports.

    Partitions between its nodes go through a lab link layer
    (:class:`plexilab.infra.links.LinkLayer`): every node is a process on this
    machine, so the lab can relay all of their peer traffic.

    Spawned processes die with the lab (see the module docstring);
    *die_with_lab* False leaves only the pidfile (for tests of the reaper).
    """

    def __init__(
        self,
        name: str = "local",
        *,
        workdir: Path | None = None,
        python: str | None = None,
        ports: int = 16,
        env: Mapping[str, str] | None = None,
        die_with_lab: bool = True,
    ) -> None:
        self.name = name
        self.die_with_lab = die_with_lab
        self.arch = platform.machine()
        self._owns_workdir = workdir is None
        self._workdir = Path(workdir or tempfile.mkdtemp(prefix=f"plexilab-{name}-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        self._python = python or sys.executable
        self._ports = free_ports(ports)
        self.env = dict(env or {})
        self.processes: list[LocalProcess] = []

    def set_python(self, python: str) -> None:
        """Use *python* (for example a venv the cluster task made) for nodes."""
        self._python = python

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        merged = dict(os.environ)
        merged.update(self.env)
        merged.update(env or {})
        return merged

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> CommandResult:
        start = time.monotonic()
        try:
            proc = subprocess.run(
                list(argv),
                capture_output=True,
                timeout=timeout,
                env=self._env(env),
                cwd=self._workdir,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"{' '.join(argv)} timed out after {timeout}s") from exc
        except OSError as exc:
            raise HostError(f"{' '.join(argv)}: {exc}") from exc
        result = CommandResult(
            tuple(argv),
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
            time.monotonic() - start,
        )
        return result.check() if check else result

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: str,
        env: Mapping[str, str] | None = None,
    ) -> LocalProcess:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "ab")  # noqa: SIM115 - closed when the process is waited for
        run_env = self._env(env)
        die = self.die_with_lab

        def start() -> subprocess.Popen[bytes]:
            return proc.spawn(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=run_env,
                cwd=self._workdir,
                preexec_fn=rundir.parent_death_setup() if die else None,
            )

        try:
            popen: subprocess.Popen[bytes] = (
                rundir.in_launcher(start) if die else start()
            )
        except OSError as exc:
            log.close()
            raise HostError(f"cannot start {argv[0]}: {exc}") from exc
        process = LocalProcess(popen, log, str(path))
        try:
            process.pidfile = self._record(popen.pid, path.name)
        except OSError as exc:
            process.kill()
            raise HostError(
                f"cannot record {argv[0]} (pid {popen.pid}): {exc}"
            ) from exc
        self.processes.append(process)
        return process

    def _record(self, pid: int, log_name: str) -> Path:
        """Write the reaper's pidfile of *pid* in this lab's run directory."""
        nodes = rundir.current_run_dir() / "nodes"
        nodes.mkdir(exist_ok=True)
        pidfile = nodes / f"{self.name}-{pid}.pid"
        proc.write_pidfile(pidfile, pid, f"{self.name} process ({log_name})")
        return pidfile

    def put(self, local: Path, remote: str) -> None:
        target = Path(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)

    def get(self, remote: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(remote, local)
        except OSError as exc:
            raise HostError(f"cannot copy {remote}: {exc}") from exc

    def python(self) -> str:
        return self._python

    def workdir(self) -> str:
        return str(self._workdir)

    def close(self) -> None:
        """Stop every process still running (the workdir stays for the logs)."""
        for process in self.processes:
            process.stop(timeout=5.0)
        self.processes.clear()


# local processes: this machine's Python, a lab link layer for partitions
LOCAL = Capabilities(
    local_python=True, fault_kinds=frozenset({"kill", "pause", "partition", "split"})
)
register(LocalHost, "local", LOCAL)


class LocalProvider(Provider):
    """One :class:`LocalHost` (every node a process of this machine)."""

    name = "local"
    capabilities = LOCAL

    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = workdir
        self.hosts: list[LocalHost] = []

    def provision(self, nodes: int, phases: Phases, progress: Progress) -> list[Host]:
        self.hosts = [LocalHost(workdir=self.workdir, ports=max(16, nodes))]
        return list(self.hosts)

    def teardown(self) -> None:
        for host in self.hosts:
            host.close()
        self.hosts.clear()
