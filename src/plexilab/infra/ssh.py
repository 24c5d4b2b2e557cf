"""SSH hosts: :class:`SSHHost` implements :class:`plexilab.host.Host` over SSH.

The QEMU and inventory providers subclass it for their endpoints.  The
connection is a :class:`plexilab.infra.sshclient.SSHClient` (pinned host
keys, banner wait, bounded commands).  With ``lease_nodes`` the nodes a host
spawns are held by a :class:`plexilab.infra.leases.RemoteLease` and die with
the lab.  :meth:`SSHHost.install` pushes wheels and installs them offline
with :mod:`plexilab.guest.install`.
"""

from __future__ import annotations

import posixpath
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from plexilab import guest
from plexilab.host import CommandResult, Host, HostError, Process
from plexilab.infra.leases import LEASE_STALE, SPAWN_WRAPPER, RemoteLease, reap_leases
from plexilab.infra.sshclient import SSHClient


class SSHProcess(Process):
    """A program started by :meth:`SSHHost.spawn` (pid = its process group)."""

    def __init__(self, ssh: SSHClient, pid: int, log_path: str) -> None:
        self.ssh = ssh
        self._pid = pid
        self.log_path = log_path
        self._code: int | None = None

    @property
    def pid(self) -> int:
        return self._pid

    def _rc(self) -> str:
        return shlex.quote(self.log_path + ".rc")

    def alive(self) -> bool:
        if self._code is not None:
            return False
        res = self.ssh.run(
            f"test ! -e {self._rc()} && kill -0 {self._pid}", timeout=30, check=False
        )
        return res.returncode == 0

    def send_signal(self, signum: int) -> None:
        self.ssh.run(f"kill -{int(signum)} -{self._pid}", timeout=30, check=False)

    def wait(self, timeout: float) -> int | None:
        if self._code is not None:
            return self._code
        ticks = max(0, int(timeout * 10))
        script = (
            f"n={ticks}; while [ ! -e {self._rc()} ] && [ $n -gt 0 ]; do "
            f"sleep 0.1; n=$((n-1)); done; cat {self._rc()} 2>/dev/null || true"
        )
        res = self.ssh.run(script, timeout=timeout + 30, check=False)
        text = res.stdout.strip()
        if text:
            self._code = int(text)
        return self._code


@dataclass(frozen=True)
class InstallReport:
    """Timings of :meth:`SSHHost.install`."""

    bytes_sent: int
    push_seconds: float
    install_seconds: float
    output: str

    @property
    def seconds(self) -> float:
        return self.push_seconds + self.install_seconds


class SSHHost(Host):
    """A :class:`Host` reached over SSH (endpoints are left to subclasses).

    With ``lease_nodes`` (the inventory's real machines) the nodes it spawns
    are held by a :class:`RemoteLease` and die with the lab; see the module
    docstring.
    """

    lease_nodes: bool = False

    def __init__(
        self,
        name: str,
        arch: str,
        ssh: SSHClient,
        *,
        python: str = "/opt/plexichat/bin/python",
        workdir: str = "/root/plexilab",
        deps: str | None = None,
    ) -> None:
        self.name = name
        self.deps = deps  # directory whose site-packages already holds the deps
        self.arch = arch
        self.ssh = ssh
        self._python = python
        self._workdir = workdir
        self._lease: RemoteLease | None = None
        self._lease_lock = threading.Lock()

    def leases_dir(self) -> str:
        """Where the leases of the labs holding nodes on this host live."""
        return f"{self._workdir}/leases"

    def lease(self) -> RemoteLease:
        """This lab's open lease on the host (opened, or opened again, on demand)."""
        with self._lease_lock:
            if self._lease is None or not self._lease.active():
                if self._lease is not None:
                    self._lease.close(timeout=1.0)
                self._lease = RemoteLease(self.ssh, self.leases_dir()).open()
            return self._lease

    def reap_leftovers(self, *, stale: float = LEASE_STALE) -> list[str]:
        """Kill the nodes that dead labs left on this host (one line per node)."""
        keep = self._lease.name if self._lease is not None else ""
        return reap_leases(self.ssh, self.leases_dir(), keep=keep, stale=stale)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> CommandResult:
        return self.ssh.run(argv, timeout=timeout, env=env, check=check)

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: str,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        program = list(argv)
        if env:
            program = ["env", *(f"{k}={v}" for k, v in env.items()), *program]
        pidfile = shlex.quote(log_path + ".pid")
        lease = self.lease().dir if self.lease_nodes else ""
        wrapper = shlex.join(
            ["sh", "-c", SPAWN_WRAPPER, "sh", log_path, lease, *program]
        )
        script = (
            f"rm -f {pidfile}; ({wrapper} >/dev/null 2>&1 </dev/null &); "
            f"n=300; while [ ! -s {pidfile} ] && [ $n -gt 0 ]; do sleep 0.05; "
            f"n=$((n-1)); done; cat {pidfile}"
        )
        res = self.ssh.run(script, timeout=60)
        try:
            pid = int(res.stdout.strip())
        except ValueError:
            raise HostError(
                f"{self.name}: spawn of {program} gave {res.stdout!r}"
            ) from None
        return SSHProcess(self.ssh, pid, log_path)

    def put(self, local: Path, remote: str) -> None:
        self.ssh.put(local, remote)

    def get(self, remote: str, local: Path) -> None:
        self.ssh.get(remote, local)

    def install(
        self,
        wheel: Path,
        wheelhouse: Path | None,
        *,
        deps: str | None = None,
        timeout: float = 600.0,
    ) -> InstallReport:
        """Push *wheel* (and *wheelhouse*) over SFTP; install offline into the venv.

        The venv is ``dirname(dirname(self.python()))``, created with the host's
        ``python3 -m venv --without-pip`` when missing; wheels are installed by
        ``installer`` (imported from its wheel) without bytecode compilation.
        Files already on the host with the same size are not sent again (the
        plexichat wheel always is); distributions already installed at the
        same version are skipped.  *deps* names a directory whose
        ``site-packages`` already holds the dependencies (the guests' deps
        disk): it is added to the venv with a ``.pth`` file and what it
        provides is not installed again.
        """
        deps = deps if deps is not None else self.deps
        if deps is not None:
            wheelhouse = None  # the deps are on the host already
        venv = posixpath.dirname(posixpath.dirname(self._python))
        remote = f"{self._workdir}/wheels"
        start = time.monotonic()
        listing = self.ssh.run(
            f"mkdir -p {shlex.quote(remote)} && cd {shlex.quote(remote)} && "
            'for f in *.whl; do [ -e "$f" ] && stat -c \'%s %n\' "$f"; done; true',
            timeout=60,
        ).stdout
        have = {}
        for line in listing.splitlines():
            size, _, name = line.partition(" ")
            have[name] = int(size)
        sent = 0
        files = [wheel, *(sorted(wheelhouse.glob("*.whl")) if wheelhouse else [])]
        for path in files:
            if path != wheel and have.get(path.name) == path.stat().st_size:
                continue
            self.ssh.put(path, f"{remote}/{path.name}")
            sent += path.stat().st_size
        pushed = time.monotonic()
        script = f"{self._workdir}/install-wheels.py"
        q = shlex.quote
        cmd = (
            f"cat > {q(script)} && "
            f"{{ test -x {q(self._python)} || "
            f"python3 -m venv --without-pip {q(venv)}; }} && "
            f"{q(self._python)} {q(script)} {q(venv)} {q(remote)} "
            f"{q(deps or '-')} plexichat"
        )
        res = self.ssh.run(cmd, timeout=timeout, input=guest.source_bytes("install.py"))
        done = time.monotonic()
        return InstallReport(
            bytes_sent=sent,
            push_seconds=pushed - start,
            install_seconds=done - pushed,
            output=res.stdout.strip(),
        )

    def python(self) -> str:
        return self._python

    def workdir(self) -> str:
        return self._workdir

    def close(self) -> None:
        """End the lease (its watchdog kills nodes still running), then disconnect."""
        with self._lease_lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            lease.close()
        self.ssh.close()
