"""QEMU guests as context managers (modeled on QEMU's python/qemu/machine).

``Machine`` is synchronous: QMP goes through :class:`plexilab.infra.qmp.QMP`
(the asyncio ``qemu.qmp`` client on a private event loop), so callers never
see asyncio; ``accel="auto"`` asks :func:`plexilab.infra.kvm.choose_accel`.

Lifetime guarantees (no QEMU and no guestfwd relay outlives the run):

* QEMU runs in its own session/process group and is started from one
  long-lived launcher thread with ``PR_SET_PDEATHSIG=SIGKILL``
  (:mod:`plexilab.infra.rundir`), so it dies with this process even on
  SIGKILL; relays watch QEMU's pidfile and exit when it is gone.
* ``shutdown()`` (called by ``__exit__``, ``finally`` blocks, an ``atexit``
  hook and SIGTERM/SIGHUP handlers that turn into ``SystemExit``) asks the
  guest to power off (or QMP ``quit``), then SIGTERM/SIGKILLs the group
  (:func:`plexilab.proc.terminate`).
* Every process is recorded as a pidfile (pid, start time) in a run directory
  owned by this process; :func:`plexilab.infra.rundir.reap` (``invoke
  qemu.reap``) kills the recorded processes of run directories whose owner is
  gone -- by PID and process group, after checking the start time, never by
  name.

Networking is QEMU user mode with ``restrict=on``: SSH and node ports are
forwarded from 127.0.0.1 only; guest-to-guest links use ``guestfwd`` to a
small relay (:mod:`plexilab.guest.relay`) that bridges the connection to a
127.0.0.1 port.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plexilab import guest, proc
from plexilab.infra import images, kvm, rundir
from plexilab.infra.images import Image
from plexilab.infra.qmp import QMP
from plexilab.infra.sshclient import HostKeyPair, SSHClient, lab_key

SEED_FW_CFG = "opt/plexilab/seed"
GUEST_ADDRESS = "10.0.2.15"
LINK_BASE = 100  # guestfwd addresses are 10.0.2.100, 10.0.2.101, ...


_live: weakref.WeakSet[Machine] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for machine in list(_live):
        with contextlib.suppress(Exception):
            machine.shutdown(graceful=False)


# --------------------------------------------------------------------------
# Ports and guest links
# --------------------------------------------------------------------------
def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class GuestLink:
    """guestfwd rule: guest address:port is relayed to 127.0.0.1:target_port."""

    address: str
    port: int
    target_port: int


# --------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ResourceSample:
    """QMP-sampled CPU time per vCPU thread plus process totals."""

    time: float
    vcpu_seconds: tuple[float, ...]
    process_cpu_seconds: float
    rss_bytes: int


@dataclass
class BootTimes:
    launched: float = 0.0
    banner: float | None = None
    ssh_ready: float | None = None

    @property
    def to_ssh(self) -> float | None:
        return None if self.ssh_ready is None else self.ssh_ready - self.launched


class MachineError(RuntimeError):
    """QEMU failed to start or the guest did not come up."""


@dataclass
class MachineConfig:
    """Everything that defines one guest."""

    arch: str
    name: str
    memory_mib: int | None = None
    smp: int | None = None
    accel: str = "auto"  # auto | kvm | tcg
    forwards: dict[int, int] = field(
        default_factory=dict
    )  # guest port -> host port (0=free)
    links: list[GuestLink] = field(default_factory=list)
    seed_files: dict[str, bytes] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    deps_disk: Path | None = None  # read-only disk mounted at depsdisk.DEPS_MOUNT
    variant: str = ""  # guest image variant ("" plain, "docker")


class Machine:
    """One QEMU guest: ``with Machine(cfg) as m: m.ssh.run([...], timeout=30)``."""

    def __init__(self, config: MachineConfig, *, image: Image | None = None) -> None:
        self.config = config
        self.name = config.name
        self.arch = config.arch
        self.profile = images.load_profile(config.arch, config.variant)
        self._image = image
        self.host_key = HostKeyPair.generate()
        self.forwards: dict[int, int] = {}
        self.ssh_port = 0
        self.accel = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMP | None = None
        self._ssh: SSHClient | None = None
        self.times = BootTimes()
        self.dir = rundir.current_run_dir() / config.name
        self.log_dir = config.log_dir or self.dir
        self.serial_log = self.log_dir / f"{config.name}.serial.log"
        self._closed = False

    # -- properties -------------------------------------------------------
    @property
    def image(self) -> Image:
        if self._image is None:
            self._image = images.image(self.arch, variant=self.config.variant)
        return self._image

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ssh(self) -> SSHClient:
        if self._ssh is None:
            raise MachineError(f"{self.name}: not launched")
        return self._ssh

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- launch -----------------------------------------------------------
    def _seed(self) -> Path:
        _path, _key, public = lab_key()
        files: dict[str, tuple[bytes, int]] = {
            "hostname": (self.name.encode() + b"\n", 0o644),
            "ssh_host_ed25519_key": (self.host_key.private_openssh, 0o600),
            "ssh_host_ed25519_key.pub": (
                self.host_key.public_line.encode() + b"\n",
                0o644,
            ),
            "authorized_keys": (public.encode() + b" plexilab\n", 0o600),
        }
        for name, data in self.config.seed_files.items():
            files[name] = (data, 0o600)
        seed = self.dir / "seed.tar"
        fd = os.open(seed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with (
            os.fdopen(fd, "wb") as fh,
            tarfile.open(fileobj=fh, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            for name, (data, mode) in sorted(files.items()):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = mode
                info.mtime = int(time.time())
                tar.addfile(info, fileobj=io.BytesIO(data))
        return seed

    def _netdev(self) -> str:
        parts = ["user", "id=net0", "restrict=on", f"hostname={self.name}"]
        parts.append(f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22")
        for port, host in self.forwards.items():
            parts.append(f"hostfwd=tcp:127.0.0.1:{host}-:{port}")
        relay = self.dir / "relay.py"
        for link in self.config.links:
            cmd = shlex.join(
                [
                    sys.executable,
                    "-S",
                    "-E",
                    str(relay),
                    str(link.target_port),
                    str(self.dir / "relays"),
                    str(self.dir / "qemu.pid"),
                ]
            )
            parts.append(
                f"guestfwd=tcp:{link.address}:{link.port}-cmd:{cmd.replace(',', ',,')}"
            )
        return ",".join(parts)

    def argv(self) -> list[str]:
        p = self.profile
        accel = self.accel
        cmdline = (
            f"console={p.console} root=/dev/nvme0n1 rootfstype=ext4 rw "
            f"init=/sbin/plexilab-init panic=-1 {p.cmdline}"
        )
        argv = [
            p.qemu,
            "-name", self.name,
            "-M", p.machine,
            "-accel", accel,
            "-cpu", p.kvm_cpu if accel == "kvm" else p.cpu,
            "-m", str(self.config.memory_mib or p.memory_mib),
            "-smp", str(self.config.smp or p.smp),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", f"file:{self.serial_log}",
            "-qmp", f"unix:{self.dir / 'qmp.sock'},server=on,wait=off",
            "-kernel", str(self.image.kernel),
            "-append", cmdline,
            "-drive",
            f"file={self.dir / 'disk.qcow2'},if=none,id=root,format=qcow2",
            "-device", "nvme,drive=root,serial=plexiroot",
            "-netdev", self._netdev(),
            "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-device", "virtio-rng-pci",
            *self._deps_args(),
            "-fw_cfg", f"name={SEED_FW_CFG},file={self.dir / 'seed.tar'}",
            *self.config.extra_args,
        ]  # fmt: skip
        return argv

    def _deps_args(self) -> list[str]:
        if self.config.deps_disk is None:
            return []
        return [
            "-drive",
            f"file={self.config.deps_disk},if=none,id=deps,format=qcow2,readonly=on",
            "-device", "virtio-blk-pci,drive=deps",
        ]  # fmt: skip

    def launch(self, *, attempts: int = 3) -> Machine:
        """Start QEMU and connect QMP (does not wait for SSH)."""
        rundir.install_signal_handlers()
        if self.running():
            return self
        pidfile = self.dir / "qemu.pid"
        other = proc.read_pidfile(pidfile)
        if other is not None and other.alive():
            raise MachineError(f"a guest named {self.name} already runs in this lab")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "relays").mkdir(exist_ok=True)
        (self.dir / "relay.py").write_bytes(guest.source_bytes("relay.py"))
        image = self.image
        disk = self.dir / "disk.qcow2"
        disk.unlink(missing_ok=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2",
             "-b", str(image.disk), "-F", "qcow2", str(disk)],
            check=True,
        )  # fmt: skip
        self._seed()
        if self.config.accel == "auto":
            self.accel = kvm.choose_accel(
                self.arch, image.kernel, log=lambda s: print(s, file=sys.stderr)
            )
        else:
            self.accel = self.config.accel
        last = ""
        for _ in range(attempts):
            self.ssh_port = free_port()
            self.forwards = {
                g: (h or free_port()) for g, h in self.config.forwards.items()
            }
            last = self._start()
            if not last:
                break
            if "forwarding" not in last and "in use" not in last:
                raise MachineError(f"{self.name}: QEMU failed:\n{last}")
        else:
            raise MachineError(f"{self.name}: QEMU failed {attempts} times:\n{last}")
        self._ssh = SSHClient(
            "127.0.0.1",
            self.ssh_port,
            host_key=self.host_key.public_pkey(),
            name=self.name,
        )
        _live.add(self)
        self._write_state()
        return self

    def _write_state(self) -> None:
        """``guest.json`` + ``known_hosts``: lets other lab processes use this guest."""
        host = f"[127.0.0.1]:{self.ssh_port}"
        (self.dir / "known_hosts").write_text(f"{host} {self.host_key.public_line}\n")
        state = {
            "name": self.name,
            "arch": self.arch,
            "pid": self.pid,
            "starttime": proc.proc_starttime(self.pid),
            "ssh_port": self.ssh_port,
            "host_key": self.host_key.public_line,
            "forwards": {str(g): h for g, h in self.forwards.items()},
            "deps_disk": str(self.config.deps_disk) if self.config.deps_disk else None,
            "known_hosts": str(self.dir / "known_hosts"),
        }
        (self.dir / "guest.json").write_text(json.dumps(state, indent=2))

    def _start(self) -> str:
        """Spawn QEMU; return '' on success or its error output."""
        stderr_path = self.log_dir / f"{self.name}.qemu.log"
        sock = self.dir / "qmp.sock"
        sock.unlink(missing_ok=True)
        argv = self.argv()
        (self.dir / "argv.json").write_text(json.dumps(argv, indent=1))

        def spawn() -> subprocess.Popen[bytes]:
            with stderr_path.open("wb") as err:
                return proc.spawn(
                    argv,
                    stdout=err,
                    stderr=subprocess.STDOUT,
                    preexec_fn=rundir.child_setup,
                )

        self.times = BootTimes(launched=time.monotonic())
        self._closed = False
        qemu: subprocess.Popen[bytes] = rundir.in_launcher(spawn)
        self.proc = qemu
        proc.write_pidfile(self.dir / "qemu.pid", qemu.pid, f"qemu {self.name}")
        proc.wait_until(lambda: sock.exists() or qemu.poll() is not None, 15, 0.02)
        if not sock.exists():
            if qemu.poll() is not None:
                self._forget()
                return stderr_path.read_text(errors="replace")
            self.kill()
            raise MachineError(f"{self.name}: no QMP socket after 15 s")
        self._qmp = QMP(self.name)
        try:
            self._qmp.connect(sock, timeout=10)
        except Exception as exc:
            if self.proc.poll() is not None:
                self._forget()
                return stderr_path.read_text(errors="replace")
            self.kill()
            raise MachineError(f"{self.name}: QMP connect failed: {exc!r}") from exc
        return ""

    def _forget(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        (self.dir / "qemu.pid").unlink(missing_ok=True)

    def wait_ssh(self, timeout: float = 120.0) -> float:
        """Wait for sshd (banner, then one command); return seconds since launch."""
        deadline = proc.Deadline(timeout)
        try:
            self.ssh.connect(timeout=timeout)
            self.times.banner = time.monotonic()
            self.ssh.run(["true"], timeout=max(1.0, deadline.remaining()))
        except Exception as exc:
            tail = (
                self.serial_log.read_text(errors="replace")[-2000:]
                if self.serial_log.exists()
                else ""
            )
            raise MachineError(
                f"{self.name}: no SSH within {timeout:.0f} s ({exc!r}); "
                f"running={self.running()}; serial log tail:\n{tail}"
            ) from exc
        self.times.ssh_ready = time.monotonic()
        return self.times.ssh_ready - self.times.launched

    def __enter__(self) -> Machine:
        try:
            self.launch()
            self.wait_ssh()
        except BaseException:
            self.shutdown(graceful=False)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- control ----------------------------------------------------------
    def qmp(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 10
    ) -> Any:
        if self._qmp is None:
            raise MachineError(f"{self.name}: QMP not connected")
        return self._qmp.execute(cmd, args, timeout=timeout)

    def resources(self) -> ResourceSample:
        """CPU s per vCPU thread (QMP query-cpus-fast -> /proc), total CPU, RSS."""
        tick = os.sysconf("SC_CLK_TCK")
        pid = self.pid
        cpus = self.qmp("query-cpus-fast")

        def cpu_time(stat: Path) -> float:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick

        vcpus = tuple(
            cpu_time(Path(f"/proc/{pid}/task/{c['thread-id']}/stat")) for c in cpus
        )
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return ResourceSample(
            time=time.monotonic(),
            vcpu_seconds=vcpus,
            process_cpu_seconds=cpu_time(Path(f"/proc/{pid}/stat")),
            rss_bytes=rss,
        )

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGTERM then SIGKILL QEMU's process group; kill this machine's relays."""
        if self.proc is not None:
            proc.terminate(self.proc, grace=3.0, kill_grace=5.0)
        for pidfile in (self.dir / "relays").glob("*.pid"):
            proc.kill_recorded(pidfile, grace=1.0)
            pidfile.unlink(missing_ok=True)

    def shutdown(self, *, graceful: bool = True, timeout: float = 10.0) -> int | None:
        """Power off (SSH request, else QMP quit), then make sure QEMU is gone."""
        if self._closed:
            return self.proc.returncode if self.proc else None
        self._closed = True
        try:
            if (
                self.running()
                and graceful
                and self._ssh is not None
                and self.times.ssh_ready
            ):
                with contextlib.suppress(Exception):
                    self._ssh.run("plexilab-poweroff", timeout=3, check=False)
                self.wait(timeout)
            if self.running() and self._qmp is not None:
                with contextlib.suppress(Exception):
                    self._qmp.execute("quit", timeout=3)
                self.wait(3)
        finally:
            self.kill()
            if self._ssh is not None:
                self._ssh.close()
            if self._qmp is not None:
                self._qmp.close()
                self._qmp = None
            (self.dir / "qemu.pid").unlink(missing_ok=True)
            for name in ("disk.qcow2", "seed.tar", "qmp.sock", "guest.json"):
                (self.dir / name).unlink(missing_ok=True)
            _live.discard(self)
        return self.proc.returncode if self.proc else None


def boot(
    arch: str,
    name: str | None = None,
    **kwargs: Any,
) -> Machine:
    """Launch a guest and wait for SSH (caller must ``shutdown()`` or use ``with``)."""
    machine = Machine(MachineConfig(arch=arch, name=name or f"{arch}-0", **kwargs))
    return machine.__enter__()


def link_address(slot: int) -> str:
    """The guestfwd address under which guest *slot* is reached from other guests."""
    return f"10.0.2.{LINK_BASE + slot}"


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m plexilab.infra.machine")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("boot", help="boot a guest, run a command, shut down")
    b.add_argument("--arch", default="x86_64", choices=images.ARCHES)
    b.add_argument("--accel", default="auto")
    b.add_argument("command", nargs="*", default=["uname", "-a"])
    r = sub.add_parser("reap", help="kill leftovers of dead lab runs")
    r.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "reap":
        for line in rundir.reap(everything=args.all):
            print("killed", line)
        return 0
    with Machine(
        MachineConfig(arch=args.arch, name=f"{args.arch}-cli", accel=args.accel)
    ) as m:
        print(f"boot to SSH: {m.times.to_ssh:.2f} s ({m.accel})")
        res = m.ssh.run(args.command, timeout=120, check=False)
        print(res.stdout, end="")
        print(res.stderr, end="", file=sys.stderr)
        print(m.resources())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
