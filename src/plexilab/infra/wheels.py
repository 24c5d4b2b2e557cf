"""Build the plexichat wheel per architecture, plus a wheelhouse of its runtime deps.

``python -m plexilab.infra.wheels --arch aarch64 --out dist/`` (the nox ``wheels``
session calls exactly this) writes ``dist/<arch>/plexichat-*.whl`` and
``dist/<arch>/wheelhouse/``.

* x86_64 is built natively; aarch64 is cross-compiled with Debian's
  ``gcc-aarch64-linux-gnu`` against ``libpython3.11-dev:arm64``: ``CC``,
  ``LDSHARED``, ``_PYTHON_HOST_PLATFORM=linux-aarch64`` and
  ``_PYTHON_SYSCONFIGDATA_NAME`` with ``PYTHONPATH`` pointing at a folder that
  holds only that sysconfigdata file.  The guests run Debian's python3.11, so
  the building interpreter must be a CPython 3.11: the wheel is
  ``cp311-cp311-linux_<arch>``.
* The wheelhouse comes from ``pip download --only-binary=:all: --platform ...
  --python-version 3.11`` of the ``runtime`` and ``guest`` dependency groups
  (``pytest`` for the golden tests in guests, ``installer`` for fast offline
  installs), at the versions of ``constraints.txt`` (``plexilab.deps``);
  ``--numba`` adds the ``numba`` group (left out by default).
* Every wheel is checked: its extension modules must be ELF files for the
  target machine and every ``src/plexichat/*/_speedups.pyx`` must be in it.

The script that installs a wheelhouse offline into a venv on a guest is
:mod:`plexilab.guest.install` (``plexilab.infra.ssh.SSHHost.install``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from plexilab import deps

REPO = Path(__file__).resolve().parents[3]
SRC = REPO / "src"
ARCHES = ("x86_64", "aarch64")
PYTHON_VERSION = "3.11"
CROSS = {
    "aarch64": {
        "triplet": "aarch64-linux-gnu",
        "sysconfigdata": "_sysconfigdata__linux_aarch64-linux-gnu",
        "platform": "linux-aarch64",
    }
}
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}
MANYLINUX_GLIBC = range(17, 37)  # guests run Debian 12: glibc 2.36


@dataclass
class BuildResult:
    """What one ``build`` produced, with timings in seconds."""

    arch: str
    wheel: Path
    wheelhouse: Path
    seconds: dict[str, float] = field(default_factory=dict)
    extensions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "arch": self.arch,
            "wheel": str(self.wheel),
            "wheelhouse": str(self.wheelhouse),
            "seconds": self.seconds,
            "extensions": self.extensions,
            "wheelhouse_files": sorted(p.name for p in self.wheelhouse.glob("*.whl")),
        }


def log(message: str) -> None:
    print(f"wheels: {message}", file=sys.stderr, flush=True)


def host_arch() -> str:
    return platform.machine()


def pyx_families() -> list[str]:
    return sorted(p.parent.name for p in SRC.glob("plexichat/*/_speedups.pyx"))


def cross_env(arch: str, workdir: Path) -> dict[str, str]:
    """Environment that makes setuptools cross-compile for *arch*."""
    spec = CROSS[arch]
    name = spec["sysconfigdata"]
    source = Path(f"/usr/lib/python{PYTHON_VERSION}/{name}.py")
    if not source.is_file():
        raise RuntimeError(
            f"{source} is missing: run `invoke setup` "
            f"(libpython{PYTHON_VERSION}-dev:arm64)"
        )
    confdir = workdir / "sysconfig"
    shutil.rmtree(confdir, ignore_errors=True)
    confdir.mkdir(parents=True)
    shutil.copyfile(source, confdir / source.name)
    triplet = spec["triplet"]
    if shutil.which(f"{triplet}-gcc") is None:
        raise RuntimeError(f"{triplet}-gcc is missing: run `invoke setup`")
    return {
        "CC": f"{triplet}-gcc",
        "CXX": f"{triplet}-g++",
        "LDSHARED": f"{triplet}-gcc -shared",
        "AR": f"{triplet}-ar",
        "_PYTHON_HOST_PLATFORM": spec["platform"],
        "_PYTHON_SYSCONFIGDATA_NAME": name,
        "PYTHONPATH": str(confdir),
    }


def check_wheel(wheel: Path, arch: str) -> list[str]:
    """Extension modules of *wheel*; raise unless all are *arch* ELF and complete."""
    found: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if not name.endswith(".so"):
                continue
            head = zf.open(name).read(20)
            machine = int.from_bytes(head[18:20], "little")
            if head[:4] != b"\x7fELF" or machine != ELF_MACHINE[arch]:
                raise RuntimeError(
                    f"{wheel.name}: {name} is not an {arch} ELF (machine {machine})"
                )
            found.append(name)
    families = {name.split("/")[1] for name in found if name.count("/") >= 2}
    missing = [f for f in pyx_families() if f not in families]
    if missing:
        raise RuntimeError(
            f"{wheel.name} lacks compiled modules of: {', '.join(missing)}"
        )
    return found


def build_wheel(
    arch: str, out: Path, *, jobs: int | None = None, timeout: float | None = None
) -> tuple[Path, list[str]]:
    """Build ``plexichat-*-cp311-cp311-linux_<arch>.whl`` into *out*.

    This is the build; the lab gets its wheels through the content-hashed
    cache (:func:`plexilab.infra.artifacts.wheel`), which calls it once per
    source state.  *timeout* bounds the build (None: unbounded).
    """
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError(
            f"guests run CPython {PYTHON_VERSION}: build with a 3.11 interpreter"
        )
    work = REPO / "build" / f"plexilab-{arch}"
    work.mkdir(parents=True, exist_ok=True)
    dist = work / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PLEXICHAT_REQUIRE_EXTENSIONS"] = "1"
    env.pop("PLEXICHAT_PURE_PYTHON", None)
    env.pop("PLEXICHAT_ONLY", None)
    env.setdefault("PLEXICHAT_CYTHON_JOBS", str(jobs or os.cpu_count() or 1))
    env["CFLAGS"] = (env.get("CFLAGS", "") + " -g0").strip()  # no debug info
    if arch != host_arch():
        if arch not in CROSS:
            raise RuntimeError(f"cannot cross-compile for {arch} on {host_arch()}")
        env.update(cross_env(arch, work))
    argv = [
        sys.executable, "setup.py", "-q",
        "build", "--build-base", str(work / "build"),
        "build_ext", "--parallel", str(jobs or os.cpu_count() or 1),
        "bdist_wheel", "--dist-dir", str(dist), "--bdist-dir", str(work / "bdist"),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            argv,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"wheel build for {arch} timed out after {timeout} s"
        ) from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"wheel build for {arch} failed:\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    (wheel,) = dist.glob("plexichat-*.whl")
    tag = arch.replace("-", "_")
    if not wheel.name.endswith(f"-cp311-cp311-linux_{tag}.whl"):
        raise RuntimeError(f"unexpected wheel tag: {wheel.name}")
    extensions = check_wheel(wheel, arch)
    out.mkdir(parents=True, exist_ok=True)
    final = _replace_wheel(out, wheel.name)
    shutil.move(str(wheel), final)
    return final, extensions


def _replace_wheel(out: Path, name: str) -> Path:
    """``out/<name>``, with every other plexichat wheel of *out* removed."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("plexichat-*.whl"):
        old.unlink()
    return out / name


def platform_tags(arch: str) -> list[str]:
    tags = [f"manylinux_2_{minor}_{arch}" for minor in reversed(MANYLINUX_GLIBC)]
    return [*tags, f"manylinux2014_{arch}", f"linux_{arch}"]


def download_wheelhouse(arch: str, dest: Path, requirements: Sequence[str]) -> float:
    """``pip download`` binary wheels of *requirements* for *arch* (stamp-cached).

    Versions come from the lock (``constraints.txt``); the stamp covers it.
    """
    dest.mkdir(parents=True, exist_ok=True)
    platforms = platform_tags(arch)
    stamp_data = json.dumps(
        {
            "reqs": sorted(requirements),
            "platforms": platforms,
            "lock": hashlib.sha256(deps.LOCK.read_bytes()).hexdigest(),
        }
    )
    stamp = dest / ".stamp"
    digest = hashlib.sha256(stamp_data.encode()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest and any(dest.glob("*.whl")):
        return 0.0
    start = time.monotonic()
    for old in dest.glob("*.whl"):
        old.unlink()
    argv = [
        sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
        "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
        *(f"--platform={p}" for p in platforms),
        "-c", str(deps.LOCK), "-d", str(dest), *requirements,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download for {arch} failed:\n{proc.stderr[-4000:]}")
    stamp.write_text(digest)
    return time.monotonic() - start


def build(
    arch: str,
    out: Path,
    *,
    wheelhouse: bool = True,
    numba: bool = False,
    jobs: int | None = None,
    prebuilt: Path | None = None,
) -> BuildResult:
    """Wheel plus wheelhouse of *arch* under ``out/<arch>/``.

    With *prebuilt* (a wheel of *arch*, e.g. from the lab's artifact cache)
    that wheel is checked and copied instead of building one.
    """
    target = out / arch
    result = BuildResult(arch, Path(), target / "wheelhouse")
    start = time.monotonic()
    if prebuilt is not None:
        result.extensions = check_wheel(prebuilt, arch)
        result.wheel = _replace_wheel(target, prebuilt.name)
        shutil.copyfile(prebuilt, result.wheel)
    else:
        kind = "native" if arch == host_arch() else "cross"
        log(f"building the {arch} wheel ({kind})")
        result.wheel, result.extensions = build_wheel(arch, target, jobs=jobs)
    result.seconds["wheel"] = round(time.monotonic() - start, 2)
    log(
        f"{result.wheel.name}: {result.seconds['wheel']:.1f} s, "
        f"{len(result.extensions)} extensions"
    )
    if wheelhouse:
        reqs = deps.requirements("runtime", "guest", *(["numba"] if numba else []))
        seconds = download_wheelhouse(arch, result.wheelhouse, reqs)
        result.seconds["wheelhouse"] = round(seconds, 2)
        names = sorted(p.name for p in result.wheelhouse.glob("*.whl"))
        log(f"wheelhouse {arch}: {len(names)} wheels ({seconds:.1f} s)")
    return result


def artifacts(arch: str, out: Path) -> tuple[Path, Path] | None:
    """Existing (wheel, wheelhouse) of *arch* under *out*, or None."""
    wheels = sorted((out / arch).glob("plexichat-*.whl"))
    house = out / arch / "wheelhouse"
    if len(wheels) == 1 and any(house.glob("*.whl")):
        return wheels[0], house
    return None


def default_out() -> Path:
    return REPO / "dist"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plexilab.infra.wheels", description=__doc__
    )
    parser.add_argument("--arch", choices=[*ARCHES, "all", "host"], default="host")
    parser.add_argument("--out", type=Path, default=default_out())
    parser.add_argument("--no-wheelhouse", action="store_true")
    parser.add_argument(
        "--numba", action="store_true", help="add numba to the wheelhouse"
    )
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    arches = (
        ARCHES
        if args.arch == "all"
        else ((host_arch(),) if args.arch == "host" else (args.arch,))
    )
    results = []
    for arch in arches:
        try:
            res = build(
                arch,
                args.out,
                wheelhouse=not args.no_wheelhouse,
                numba=args.numba,
                jobs=args.jobs,
            )
        except RuntimeError as exc:
            print(f"wheels: error: {exc}", file=sys.stderr)
            return 1
        results.append(res.as_dict())
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for row in results:
            print(f"{row['arch']}: {row['wheel']} ({row['seconds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
