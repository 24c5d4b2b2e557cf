"""QEMU guests as context managers (modeled on QEMU's python/qemu/machine).

``Machine`` is synchronous.  QMP is driven with the asyncio ``qemu.qmp``
``QMPClient`` on a private event loop in a daemon thread; ``Machine.qmp()``
submits a coroutine there and waits for the reply, so callers never see
asyncio.

Lifetime guarantees (no QEMU and no guestfwd relay outlives the run):

* QEMU runs in its own session/process group and is started from one
  long-lived launcher thread with ``PR_SET_PDEATHSIG=SIGKILL``, so it dies
  with this process even on SIGKILL; relays watch QEMU's pidfile and exit
  when it is gone.
* ``shutdown()`` (called by ``__exit__``, ``finally`` blocks, an ``atexit``
  hook and SIGTERM/SIGHUP handlers that turn into ``SystemExit``) asks the
  guest to power off (or QMP ``quit``), then SIGTERM/SIGKILLs the group.
* Every process is recorded as a pidfile (pid, start time) in a run directory
  owned by this process; ``reap()`` (``invoke qemu.reap``) kills the recorded
  processes of run directories whose owner is gone -- by PID and process
  group, after checking the start time, never by name.

Networking is QEMU user mode with ``restrict=on``: SSH and node ports are
forwarded from 127.0.0.1 only; guest-to-guest links use ``guestfwd`` to a
small relay that bridges the connection to a 127.0.0.1 port.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from plexilab.infra import images
from plexilab.infra.images import Image, Profile
from plexilab.infra.ssh import HostKeyPair, SSHClient, lab_key

SEED_FW_CFG = "opt/plexilab/seed"
GUEST_ADDRESS = "10.0.2.15"
LINK_BASE = 100  # guestfwd addresses are 10.0.2.100, 10.0.2.101, ...
PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------
# Run directories, pidfiles and the reaper
# --------------------------------------------------------------------------
def proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of *pid*, or None when gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie is as good as gone
    return int(fields[19])


def alive(pid: int, starttime: int | None) -> bool:
    """True when *pid* runs and is the same process that was recorded."""
    now = proc_starttime(pid)
    return now is not None and (starttime is None or now == starttime)


def run_root() -> Path:
    """Where lab runs keep their directories: ``$PLEXILAB_RUN_ROOT`` or the
    cache's ``run/`` (the test suite uses its own, so it reaps only its own
    dead runs and never a user's lab)."""
    env = os.environ.get("PLEXILAB_RUN_ROOT")
    root = Path(env) if env else images.cache_root() / "run"
    root.mkdir(parents=True, exist_ok=True)
    return root


def record(path: Path, pid: int, kind: str) -> None:
    """Write a pidfile (pid, process group, start time) atomically."""
    data = {
        "pid": pid,
        "pgid": _pgid(pid),
        "starttime": proc_starttime(pid),
        "kind": kind,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


_run_dir: Path | None = None
_run_lock = threading.Lock()


def current_run_dir() -> Path:
    """This process's run directory (created on first use, owner recorded)."""
    global _run_dir
    with _run_lock:
        if _run_dir is None:
            me = os.getpid()
            path = run_root() / f"{me}-{proc_starttime(me)}"
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            record(path / "owner.json", me, "owner")
            _run_dir = path
        else:
            return _run_dir
    # A lab run that was SIGKILLed could not clean up: do it now (logs stay).
    with contextlib.suppress(OSError):
        reap(keep_logs=True)
    return path


def kill_recorded(pidfile: Path, grace: float = 3.0) -> str | None:
    """Kill the process of a pidfile (group first) if it is still the same one."""
    try:
        data = json.loads(pidfile.read_text())
    except (OSError, ValueError):
        return None
    pid, pgid, start = int(data["pid"]), data.get("pgid"), data.get("starttime")
    if not alive(pid, start):
        return None

    def send(sig: int) -> None:
        with contextlib.suppress(OSError):
            if pgid == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid, start):
        send(signal.SIGKILL)
    return f"{data.get('kind', '?')} pid {pid}"


def reap(
    *, everything: bool = False, root: Path | None = None, keep_logs: bool = False
) -> list[str]:
    """Kill leftovers of lab runs whose owner process is gone (or all of them).

    Returns a description of each process killed.  Run directories of dead
    owners are removed afterwards; with *keep_logs* only their ``*.log``
    files stay (disk overlays and seeds -- the node secrets -- go).
    """
    killed: list[str] = []
    root = root or run_root()
    me = _run_dir
    for rundir in sorted(p for p in root.iterdir() if p.is_dir()):
        owner = rundir / "owner.json"
        try:
            info = json.loads(owner.read_text())
            owner_alive = alive(int(info["pid"]), info.get("starttime"))
        except (OSError, ValueError, KeyError):
            owner_alive = False
        if owner_alive and not everything:
            continue
        if rundir == me and not everything:
            continue
        for pidfile in sorted(rundir.rglob("*.pid")):
            what = kill_recorded(pidfile)
            if what:
                killed.append(f"{what} ({pidfile.relative_to(root)})")
            pidfile.unlink(missing_ok=True)
        if owner_alive:
            continue
        if not keep_logs:
            shutil.rmtree(rundir, ignore_errors=True)
            continue
        for path in rundir.rglob("*"):
            if path.is_file() and path.suffix != ".log" and path.name != "owner.json":
                path.unlink(missing_ok=True)
    return killed


# --------------------------------------------------------------------------
# Launcher thread (PDEATHSIG follows the thread that forked) and signals
# --------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_launch_queue: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
    queue.Queue()
)
_launcher: threading.Thread | None = None


def _launcher_loop() -> None:
    while True:
        fn, fut = _launch_queue.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)


def in_launcher(fn: Callable[[], Any]) -> Any:
    """Run *fn* in the process-lifetime launcher thread and return its result."""
    global _launcher
    with _run_lock:
        if _launcher is None:
            _launcher = threading.Thread(
                target=_launcher_loop, name="plexilab-launcher", daemon=True
            )
            _launcher.start()
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    _launch_queue.put((fn, fut))
    return fut.result()


def _child_setup() -> None:
    """In the forked child: die with the parent (SIGKILL)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def parent_death_setup() -> Callable[[], None]:
    """A ``preexec_fn`` (made in the forking thread): SIGKILL the child when
    that thread ends, and end it at once if this process died before the
    ``prctl`` took hold.  Fork from :func:`in_launcher` so "that thread" is
    the process-lifetime launcher."""
    parent = os.getpid()

    def setup() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup


_live: weakref.WeakSet[Machine] = weakref.WeakSet()
_handlers_installed = False


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so ``finally`` blocks shut guests down."""
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _on_signal)
    _handlers_installed = True


@atexit.register
def _shutdown_all() -> None:
    for machine in list(_live):
        with contextlib.suppress(Exception):
            machine.shutdown(graceful=False)


# --------------------------------------------------------------------------
# QMP (asyncio qemu.qmp behind a synchronous facade)
# --------------------------------------------------------------------------
class QMP:
    """``qemu.qmp.QMPClient`` on a private event loop thread, used synchronously."""

    def __init__(self, name: str) -> None:
        from qemu.qmp import QMPClient

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self.thread.start()
        self.client = QMPClient(name)

    def _call(self, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"QMP call did not answer within {timeout} s") from None

    def connect(self, path: Path, timeout: float) -> None:
        self._call(self.client.connect(str(path)), timeout)

    def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 10
    ) -> Any:
        return self._call(self.client.execute(cmd, args), timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self.client.disconnect(), 5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


# --------------------------------------------------------------------------
# KVM probe
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    seconds: float
    detail: str


def probe_boot(profile: Profile, kernel: Path, *, timeout: float = 15.0) -> ProbeResult:
    """Boot the kernel under KVM with no root disk; it must reach its panic."""
    argv = [
        profile.qemu, "-M", profile.machine, "-accel", "kvm", "-cpu", profile.kvm_cpu,
        "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-serial", "stdio", "-kernel", str(kernel),
        "-append", f"console={profile.console} panic=-1 loglevel=4",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        text = out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        text = out.decode(errors="replace")
        return ProbeResult(False, time.monotonic() - start, "timeout: " + text[-300:])
    ok = "Linux version" in text and ("Kernel panic" in text or "VFS:" in text)
    return ProbeResult(ok, time.monotonic() - start, text[-300:])


def kvm_cache_path() -> Path:
    return images.cache_root() / "kvm-verdict.json"


def choose_accel(
    arch: str,
    kernel: Path,
    *,
    probe: Callable[[Profile, Path], ProbeResult] = probe_boot,
    dev_kvm: Path = Path("/dev/kvm"),
    host_arch: str | None = None,
    cache_path: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """``"kvm"`` only if a short probe boot proved it works here, else ``"tcg"``.

    The verdict is cached per (arch, QEMU binary, host kernel, guest kernel).
    """
    host_arch = host_arch or platform.machine()
    if arch != host_arch or not os.access(dev_kvm, os.R_OK | os.W_OK):
        return "tcg"
    profile = images.load_profile(arch)
    qemu_bin = shutil.which(profile.qemu) or profile.qemu
    with contextlib.suppress(OSError):
        qemu_bin += f"@{int(Path(qemu_bin).stat().st_mtime)}"
    key = (
        f"{arch}|{qemu_bin}|{platform.release()}|{kernel.name}@{kernel.stat().st_size}"
    )
    cache_path = cache_path or kvm_cache_path()
    try:
        cache: dict[str, Any] = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return "kvm" if cache[key]["ok"] else "tcg"
    result = probe(profile, kernel)
    cache[key] = {"ok": result.ok, "seconds": round(result.seconds, 2)}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_text(json.dumps(cache, indent=2))
    if log:
        verdict = "works" if result.ok else "does not work (using TCG)"
        log(f"KVM probe for {arch}: {verdict} ({result.seconds:.1f} s)")
    return "kvm" if result.ok else "tcg"


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


RELAY_SOURCE = r'''
"""guestfwd relay: bridge stdin/stdout (the guest connection) to 127.0.0.1:PORT.

slirp starts one relay per guest connection (GLib double-forks it, so its
parent is not QEMU): the relay watches QEMU's pidfile and exits when QEMU is
gone; it records itself in PIDDIR for the reaper.  Fault injection: while
PORT is listed in the file "blocked" next to PIDDIR, the relay refuses to
connect and cuts a live connection (a network partition between guests).
"""
import json, os, select, socket, sys, time
port, piddir, qemu_pidfile = int(sys.argv[1]), sys.argv[2], sys.argv[3]
blocked_file = os.path.join(os.path.dirname(piddir), "blocked")
_seen = [None, False]


def blocked():
    try:
        stamp = os.stat(blocked_file).st_mtime_ns
    except OSError:
        return False
    if stamp != _seen[0]:
        try:
            with open(blocked_file) as fh:
                _seen[1] = str(port) in fh.read().split()
        except OSError:
            return False
        _seen[0] = stamp
    return _seen[1]
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 2)  # stderr is the guest's connection: never write to it


def starttime(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def qemu_alive():
    try:
        with open(qemu_pidfile) as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return False
    return starttime(rec["pid"]) == rec["starttime"]


me = os.getpid()
pidfile = os.path.join(piddir, f"relay-{me}.pid")
try:
    with open(pidfile + ".tmp", "w") as fh:
        json.dump({"pid": me, "pgid": os.getpgid(0), "starttime": starttime(me),
                   "kind": "relay"}, fh)
    os.replace(pidfile + ".tmp", pidfile)
except OSError:
    pidfile = None
try:
    if not qemu_alive() or blocked():
        sys.exit(1)
    up = socket.create_connection(("127.0.0.1", port), timeout=10)
    up.settimeout(None)
    try:
        down = socket.socket(fileno=os.dup(0))
        down_r = down_w = down.fileno()
    except OSError:
        down = None
        down_r, down_w = 0, 1
    open_in, open_out = True, True  # guest->lab, lab->guest
    checked = time.monotonic()
    while open_in or open_out:
        watch = ([down_r] if open_in else []) + ([up.fileno()] if open_out else [])
        ready, _, _ = select.select(watch, [], [], 0.25)
        if blocked():
            break
        if not ready and time.monotonic() - checked > 2.0:
            if not qemu_alive():
                break
            checked = time.monotonic()
        for fd in ready:
            if fd == down_r:
                data = os.read(down_r, 65536)
                if data:
                    up.sendall(data)
                else:
                    open_in = False
                    up.shutdown(socket.SHUT_WR)
            else:
                data = up.recv(65536)
                if data:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(down_w, view):]
                else:
                    open_out = False
                    if down is not None:
                        down.shutdown(socket.SHUT_WR)
                    else:
                        os.close(down_w)
except OSError:
    pass
finally:
    if pidfile:
        try:
            os.unlink(pidfile)
        except OSError:
            pass
'''


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
    deps_disk: Path | None = None  # read-only disk mounted at images.DEPS_MOUNT
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
        self.dir = current_run_dir() / config.name
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
                tar.addfile(info, fileobj=__import__("io").BytesIO(data))
        return seed

    def _netdev(self) -> str:
        parts = ["user", "id=net0", "restrict=on", f"hostname={self.name}"]
        parts.append(f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22")
        for guest, host in self.forwards.items():
            parts.append(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}")
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
        install_signal_handlers()
        if self.running():
            return self
        pidfile = self.dir / "qemu.pid"
        with contextlib.suppress(OSError, ValueError, KeyError):
            other = json.loads(pidfile.read_text())
            if alive(int(other["pid"]), other.get("starttime")):
                raise MachineError(
                    f"a guest named {self.name} already runs in this lab"
                )
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "relays").mkdir(exist_ok=True)
        (self.dir / "relay.py").write_text(RELAY_SOURCE)
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
            self.accel = choose_accel(
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
            "starttime": proc_starttime(self.pid),
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
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_child_setup,
                )

        self.times = BootTimes(launched=time.monotonic())
        self._closed = False
        self.proc = in_launcher(spawn)
        record(self.dir / "qemu.pid", self.proc.pid, f"qemu {self.name}")
        deadline = time.monotonic() + 15
        while not sock.exists():
            if self.proc.poll() is not None:
                self._forget()
                return stderr_path.read_text(errors="replace")
            if time.monotonic() > deadline:
                self.kill()
                raise MachineError(f"{self.name}: no QMP socket after 15 s")
            time.sleep(0.02)
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
        deadline = time.monotonic() + timeout
        try:
            self.ssh.connect(timeout=timeout)
            self.times.banner = time.monotonic()
            self.ssh.run(["true"], timeout=max(1.0, deadline - time.monotonic()))
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
        if self.proc is not None and self.proc.poll() is None:
            for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(OSError):
                    os.killpg(self.proc.pid, sig)
                if self.wait(grace) is not None:
                    break
        for pidfile in (self.dir / "relays").glob("*.pid"):
            kill_recorded(pidfile, grace=1.0)
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


def running_guests(arch: str | None = None) -> list[dict[str, Any]]:
    """State of guests that other (live) lab processes hold, e.g. ``invoke qemu.up``."""
    out = []
    for state_file in sorted(run_root().glob("*/*/guest.json")):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if alive(int(state["pid"]), state.get("starttime")) and (
            arch is None or state["arch"] == arch
        ):
            out.append(state)
    return out


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
        for line in reap(everything=args.all):
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
