"""KVM or TCG: a guest uses KVM only where a short probe boot proved it works.

``choose_accel`` boots the guest kernel under KVM with no root disk
(``probe_boot``: it must reach its panic) and caches the verdict per arch,
QEMU binary, host kernel and guest kernel in ``<cache>/kvm-verdict.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plexilab import proc
from plexilab.infra import buildsteps, images
from plexilab.infra.images import Profile


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
    qemu = proc.spawn(
        argv, stdin=None, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = qemu.communicate(timeout=timeout)
        text = out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.signal_group(qemu.pid, signal.SIGKILL)  # a hung probe: no grace
        out, _ = qemu.communicate()
        text = out.decode(errors="replace")
        return ProbeResult(False, time.monotonic() - start, "timeout: " + text[-300:])
    ok = "Linux version" in text and ("Kernel panic" in text or "VFS:" in text)
    return ProbeResult(ok, time.monotonic() - start, text[-300:])


def kvm_cache_path() -> Path:
    return buildsteps.cache_root() / "kvm-verdict.json"


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
