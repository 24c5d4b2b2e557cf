"""Host set-up for the QEMU lab: Debian packages, arm64 multiarch and binfmt.

``ensure()`` is idempotent and fast when everything is present (one
``dpkg-query`` call and a few file checks); tasks that need the host call it
first.  As root it installs what is missing (``apt-get update`` only when a
package has no install candidate or the arm64 lists are missing); otherwise it
prints the exact commands to run and raises :class:`HostSetupError`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES: tuple[str, ...] = (
    "qemu-system-x86",
    "qemu-system-arm",
    "qemu-utils",
    "mmdebstrap",
    "qemu-user-static",
    "binfmt-support",
    "gcc-aarch64-linux-gnu",
    "libpython3.11-dev:arm64",
    "e2fsprogs",
    "tar",
    "arch-test",
)
FOREIGN_ARCH = "arm64"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = "qemu-aarch64"
APT_LISTS = Path("/var/lib/apt/lists")


class HostSetupError(RuntimeError):
    """The host lacks something and this process cannot fix it."""


@dataclass
class Report:
    """What ``ensure`` found and did."""

    actions: list[str] = field(default_factory=list)
    needed: list[str] = field(default_factory=list)  # commands for a non-root user

    @property
    def ok(self) -> bool:
        return not self.needed


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        list(argv), text=True, capture_output=True, env=env, check=False
    )


def _check(argv: Sequence[str]) -> None:
    proc = _run(argv)
    if proc.returncode != 0:
        raise HostSetupError(
            f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )


def missing_packages(names: Sequence[str] = PACKAGES) -> list[str]:
    """Packages of *names* that are not installed (one dpkg-query call)."""
    proc = _run(
        ["dpkg-query", "-W", "-f=${binary:Package} ${db:Status-Abbrev}\n", *names]
    )
    installed = set()
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("ii"):
            installed.add(parts[0])
    missing = []
    for name in names:
        # dpkg-query qualifies foreign packages ("pkg:arm64"), not native ones.
        if name not in installed:
            missing.append(name)
    return missing


def foreign_arch_enabled() -> bool:
    out = _run(["dpkg", "--print-foreign-architectures"]).stdout.split()
    return FOREIGN_ARCH in out


def arm64_lists_present() -> bool:
    return any(APT_LISTS.glob(f"*binary-{FOREIGN_ARCH}_Packages*"))


def binfmt_enabled() -> bool:
    entry = BINFMT_DIR / BINFMT_ENTRY
    try:
        return entry.read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return False


def binfmt_mounted() -> bool:
    return (BINFMT_DIR / "register").exists()


def ensure(*, quiet: bool = False, binfmt: bool = True) -> Report:
    """Install/enable whatever the lab needs; raise when that needs root."""
    report = Report()
    root = os.geteuid() == 0
    need_arch = not foreign_arch_enabled()
    missing = missing_packages()
    if need_arch:
        cmd = f"dpkg --add-architecture {FOREIGN_ARCH}"
        if root:
            _check(cmd.split())
            report.actions.append(cmd)
        else:
            report.needed.append(cmd)
    if missing:
        update = need_arch or not arm64_lists_present()
        install = [
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            *missing,
        ]
        if not root:
            if update:
                report.needed.append("apt-get update")
            report.needed.append(shlex.join(install))
        else:
            if update:
                _check(["apt-get", "update", "-q"])
                report.actions.append("apt-get update")
            proc = _run(install)
            if proc.returncode != 0 and not update:
                # Stale package lists are the usual cause: refresh once, retry.
                _check(["apt-get", "update", "-q"])
                report.actions.append("apt-get update")
                proc = _run(install)
            if proc.returncode != 0:
                raise HostSetupError(
                    f"{shlex.join(install)} failed:\n{proc.stderr[-3000:]}"
                )
            report.actions.append(shlex.join(install))
    if binfmt and not binfmt_enabled():
        steps: list[list[str]] = []
        if not binfmt_mounted():
            steps.append(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)])
        steps.append(["update-binfmts", "--enable", BINFMT_ENTRY])
        for step in steps:
            if root:
                _check(step)
                report.actions.append(shlex.join(step))
            else:
                report.needed.append(shlex.join(step))
    if not quiet:
        for action in report.actions:
            print(f"setup: {action}", file=sys.stderr)
    if report.needed:
        commands = "\n".join(f"    sudo {c}" for c in report.needed)
        raise HostSetupError(f"the lab host needs set-up; run as root:\n{commands}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plexilab.infra.setup_host", description=__doc__
    )
    parser.parse_args(argv)
    try:
        report = ensure()
    except HostSetupError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not report.actions:
        print("setup: host already has everything the QEMU lab needs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
