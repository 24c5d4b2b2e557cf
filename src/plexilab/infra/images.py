"""Guest images: a Debian cloud kernel plus an ext4 root disk, cached per recipe.

``image(arch)`` returns a ready :class:`Image` (building it when the cache has
none).  A build has two layers:

* **rootfs** -- ``mmdebstrap --variant=essential`` with the packages of
  ``qemu/packages.txt``, using the host's own apt sources file as the mirror
  argument (no mirror URL in code).  Keyed by the package list and arch, so
  editing the init script or sshd config does not re-bootstrap.
* **image** -- the rootfs plus the guest init, sshd config and the few kernel
  modules the init loads, turned into a disk without loop mounts
  (``mke2fs -d`` then ``qemu-img convert -O qcow2``).  Keyed by a hash of every
  file under ``qemu/`` and the arch.

The kernel comes from Debian's ``linux-image-cloud-<debarch>`` package,
fetched with ``apt-get download`` and unpacked with ``dpkg -x`` (no install).
Per-node secrets never enter an image: they travel in the seed (fw_cfg).

**Variants** add to the plain recipe from their own folder ``qemu/<variant>/``
(``packages.txt``, ``modules.txt``, ``variant.toml`` machine overrides, extra
files): ``docker`` adds Debian's ``docker.io``, the ``overlay`` module and
``/usr/local/sbin/plexilab-dockerd``.  A variant has its own cache keys (its
files are hashed on top of the plain recipe's); the plain image's key ignores
the variant folders, so adding or editing a variant never rebuilds it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plexilab.infra import setup_host
from plexilab.infra.buildsteps import (
    Step,
    cache_root,
    console,
    digest,
    du,
    locked,
    mb,
    run,
)

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "qemu"
ARCHES = ("x86_64", "aarch64")
VARIANTS = ("docker",)  # folders under qemu/ that are variants, not plain recipe
IMAGE_FORMAT = 1  # bump when the build steps (not the recipes) change


@dataclass(frozen=True)
class Profile:
    """A machine profile (``qemu/<arch>.toml``)."""

    arch: str
    debian_arch: str
    kernel_package: str
    qemu: str
    machine: str
    cpu: str
    kvm_cpu: str
    console: str
    memory_mib: int
    smp: int
    disk_mib: int
    cmdline: str


@dataclass(frozen=True)
class Image:
    """A built guest image in the cache."""

    arch: str
    key: str
    directory: Path
    kernel: Path
    disk: Path
    manifest: dict[str, object]

    @property
    def kernel_version(self) -> str:
        return str(self.manifest["kernel_version"])


def check_variant(variant: str) -> str:
    """*variant* ("" is the plain image); ValueError when unknown."""
    if variant and variant not in VARIANTS:
        raise ValueError(
            f"unknown image variant {variant!r} (known: {', '.join(VARIANTS)})"
        )
    return variant


def load_profile(arch: str, variant: str = "") -> Profile:
    """Read ``qemu/<arch>.toml`` (with ``qemu/<variant>/variant.toml`` on top)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHES)})")
    data = tomllib.loads((RECIPES / f"{arch}.toml").read_text())
    if check_variant(variant):
        overrides = RECIPES / variant / "variant.toml"
        if overrides.is_file():
            extra = tomllib.loads(overrides.read_text())
            append = extra.pop("cmdline_append", "")
            data.update(extra)
            if append:
                data["cmdline"] = f"{data['cmdline']} {append}"
    return Profile(**data)


def recipe_files(variant: str = "") -> list[Path]:
    """Files of the plain recipe under ``qemu/`` (sorted), or of *variant*'s folder."""
    if check_variant(variant):
        return sorted(p for p in (RECIPES / variant).rglob("*") if p.is_file())
    return sorted(
        p
        for p in RECIPES.rglob("*")
        if p.is_file() and p.relative_to(RECIPES).parts[0] not in VARIANTS
    )


def image_key(arch: str, variant: str = "") -> str:
    """Cache key of the image: the ``qemu/`` recipe files, the arch and the rootfs.

    A variant's key adds its folder's files to the plain recipe's; the plain
    key does not depend on any variant.
    """
    parts = [(str(p.relative_to(RECIPES)), p.read_bytes()) for p in recipe_files()]
    parts.append(("arch", arch.encode()))
    profile = load_profile(arch, variant)
    parts.append(("rootfs", rootfs_key(profile, variant).encode()))
    parts.append(("format", str(IMAGE_FORMAT).encode()))
    if variant:
        parts.append(("variant", variant.encode()))
        parts += [
            (f"variant:{p.relative_to(RECIPES)}", p.read_bytes())
            for p in recipe_files(variant)
        ]
    return digest(parts)


def image_name(arch: str, key: str, variant: str = "") -> str:
    """``<arch>-<key>`` or ``<arch>-<variant>-<key>`` (cache directory name)."""
    return f"{arch}-{variant}-{key}" if variant else f"{arch}-{key}"


def _names(path: Path) -> list[str]:
    if not path.is_file():
        return []
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def packages(variant: str = "") -> list[str]:
    """Package names of ``qemu/packages.txt`` (+ ``qemu/<variant>/packages.txt``)."""
    extra = _names(RECIPES / variant / "packages.txt") if check_variant(variant) else []
    return _names(RECIPES / "packages.txt") + extra


def kernel_modules(variant: str = "") -> list[str]:
    """Module names of ``qemu/modules.txt`` (+ ``qemu/<variant>/modules.txt``)."""
    extra = _names(RECIPES / variant / "modules.txt") if check_variant(variant) else []
    return _names(RECIPES / "modules.txt") + extra


def host_suite() -> str:
    """The host's Debian codename (the guests run the same release)."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("cannot read VERSION_CODENAME from /etc/os-release")


def host_sources() -> Path:
    """The host's apt sources file, passed to mmdebstrap as its mirror."""
    env = os.environ.get("PLEXILAB_APT_SOURCES")
    candidates = [Path(env)] if env else []
    candidates += [
        Path("/etc/apt/sources.list.d/debian.sources"),
        Path("/etc/apt/sources.list"),
    ]
    for path in candidates:
        if path.is_file() and path.stat().st_size > 0:
            return path
    raise RuntimeError("no apt sources file found (set PLEXILAB_APT_SOURCES)")


def rootfs_key(profile: Profile, variant: str = "") -> str:
    parts = [
        ("packages", "\n".join(packages(variant)).encode()),
        ("debian_arch", profile.debian_arch.encode()),
        ("suite", host_suite().encode()),
        ("options", " ".join(mmdebstrap_options(profile, variant)).encode()),
    ]
    return digest(parts)


def mmdebstrap_options(profile: Profile, variant: str = "") -> list[str]:
    excludes = [
        "/usr/share/man/*",
        "/usr/share/doc/*",
        "/usr/share/info/*",
        "/usr/share/locale/*",
        "/usr/share/lintian/*",
        "/usr/share/bash-completion/*",
    ]
    return [
        "--variant=essential",
        f"--arch={profile.debian_arch}",
        "--mode=root",
        "--format=directory",
        "--include=" + ",".join(packages(variant)),
        "--dpkgopt=force-unsafe-io",
        *(f"--dpkgopt=path-exclude={p}" for p in excludes),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        '--aptopt=Acquire::Languages "none"',
        # Host keys made by openssh-server's postinst would be shared by every
        # guest: the seed brings a per-node key instead.  Placeholders make the
        # postinst skip its key generation (RSA takes ~10 s under qemu-user).
        '--essential-hook=mkdir -p "$1"/etc/ssh',
        *(
            f'--essential-hook=touch "$1"/etc/ssh/ssh_host_{kind}_key'
            for kind in ("rsa", "ecdsa", "ed25519")
        ),
        '--customize-hook=rm -f "$1"/etc/ssh/ssh_host_*',
        '--customize-hook=rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*',
        *(foreign_python_hooks() if foreign(profile) else []),
    ]


PY = "/usr/bin/python3.11"
# Under qemu-user the python packages' maintainer scripts spend minutes
# byte-compiling the stdlib. While bootstrapping a foreign arch, python3.11 is
# diverted to a wrapper that skips py_compile runs; the lab host compiles the
# same files afterwards (.pyc files do not depend on the CPU: 3.11 is 3.11).
_PY_WRAPPER = f"""#!/bin/sh
# plexilab bootstrap only: byte-compilation happens on the lab host.
case " $* " in
    *" -m py_compile - "*) cat >/dev/null; exit 0 ;;
    *"/py_compile.py "*) exit 0 ;;
esac
exec {PY}.plexilab-real "$@"
"""


def foreign(profile: Profile) -> bool:
    """True when *profile*'s packages run under qemu-user on this host."""
    return profile.arch != os.uname().machine


def foreign_python_hooks() -> list[str]:
    wrapper = _PY_WRAPPER.replace("'", "'\\''")
    divert = f"dpkg-divert --quiet --local --rename --divert {PY}.plexilab-real"
    return [
        f'--essential-hook=chroot "$1" {divert} --add {PY}',
        f"--essential-hook=printf '%s' '{wrapper}' > \"$1\"{PY}",
        f'--essential-hook=chmod 755 "$1"{PY}',
        f'--customize-hook=rm -f "$1"{PY}',
        f'--customize-hook=chroot "$1" {divert} --remove {PY}',
    ]


def compile_python(root: Path) -> None:
    """Byte-compile the rootfs's Python files with a CPython 3.11 of this host."""
    python = sys.executable if sys.version_info[:2] == (3, 11) else PY
    dirs = [root / "usr/lib/python3.11", root / "usr/lib/python3/dist-packages"]
    run(
        [python, "-m", "compileall", "-q", "-j", "0", "-s", str(root), "-p", "/"]
        + [str(d) for d in dirs if d.is_dir()]
    )


def fetch_kernel(profile: Profile, work: Path) -> tuple[Path, str]:
    """Download and unpack the cloud kernel package; return (root, version)."""
    qualified = f"{profile.kernel_package}:{profile.debian_arch}"
    deps = run(["apt-cache", "depends", "--no-recommends", qualified]).stdout
    match = re.search(r"Depends:\s*(linux-image-[^\s:]+)", deps)
    if not match:
        raise RuntimeError(f"cannot find the kernel behind {qualified}:\n{deps}")
    package = match.group(1)
    cached_root = cache_root() / "kernels" / f"{package}_{profile.debian_arch}"
    with locked(cached_root.with_suffix(".lock")):
        if not any((cached_root / "boot").glob("vmlinuz-*")):
            _download_kernel(profile, package, work, cached_root)
    (vmlinuz,) = (cached_root / "boot").glob("vmlinuz-*")
    return cached_root, vmlinuz.name.removeprefix("vmlinuz-")


def _download_kernel(profile: Profile, package: str, work: Path, dest: Path) -> None:
    debs = work / "debs"
    debs.mkdir()
    run(
        [
            "apt-get",
            "download",
            "-q",
            "-o",
            "APT::Sandbox::User=root",
            f"{package}:{profile.debian_arch}",
        ],
        cwd=debs,
    )
    (deb,) = debs.glob("*.deb")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    run(["dpkg", "-x", str(deb), str(tmp)])
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def module_closure(modules_dir: Path, wanted: Sequence[str]) -> list[Path]:
    """Module files of *wanted* plus their dependencies, dependencies first.

    Dependencies come from each module's ``.modinfo`` ``depends=`` field, so
    neither depmod nor modinfo is needed on the host.
    """
    index: dict[str, Path] = {}
    for path in modules_dir.rglob("*.ko"):
        index[path.stem.replace("-", "_")] = path

    def depends(path: Path) -> list[str]:
        data = path.read_bytes()
        match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
        if not match or not match.group(1):
            return []
        return [d.decode().replace("-", "_") for d in match.group(1).split(b",")]

    ordered: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        path = index.get(key)
        if path is None:
            return  # built into the kernel
        for dep in depends(path):
            visit(dep)
        ordered.append(path)

    for name in wanted:
        if name.replace("-", "_") not in index:
            raise RuntimeError(f"kernel module {name!r} not found in {modules_dir}")
        visit(name)
    return ordered


def build_rootfs(profile: Profile, *, rebuild: bool = False, variant: str = "") -> Path:
    """The cached mmdebstrap directory for *profile* (built when missing)."""
    key = rootfs_key(profile, variant)
    final = cache_root() / "rootfs" / image_name(profile.arch, key, variant)
    with locked(final.with_suffix(".lock")):
        if final.is_dir() and not rebuild:
            return final
        if os.geteuid() != 0:
            raise PermissionError(
                "building a guest rootfs needs root (mmdebstrap --mode=root); "
                "run the same command with sudo"
            )
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        timings: dict[str, float] = {}
        with Step(f"mmdebstrap {profile.debian_arch}", timings) as step:
            argv = [
                "mmdebstrap",
                "--quiet",
                *mmdebstrap_options(profile, variant),
                host_suite(),
                str(tmp),
                str(host_sources()),
            ]
            run(argv)
            step.note = mb(du(tmp))
        if foreign(profile):
            with Step("byte-compile on the host", timings):
                compile_python(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (final.parent / f"{final.name}.json").write_text(
            json.dumps({"seconds": timings, "bytes": du(final)}, indent=2)
        )
        return final


def _install(src: Path | bytes, dest: Path, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, bytes):
        dest.write_bytes(src)
    else:
        shutil.copyfile(src, dest)
    dest.chmod(mode)


# Files a variant adds to its image: recipe file -> (path in the guest, mode).
VARIANT_FILES: dict[str, dict[str, tuple[str, int]]] = {
    "docker": {"dockerd.sh": ("usr/local/sbin/plexilab-dockerd", 0o755)},
}


def assemble(
    profile: Profile,
    rootfs: Path,
    kernel_root: Path,
    version: str,
    root: Path,
    variant: str = "",
) -> None:
    """Copy the rootfs to *root* and add init, sshd config and kernel modules."""
    run(["cp", "-a", "--reflink=auto", f"{rootfs}/.", str(root)])
    _install(RECIPES / "init.sh", root / "sbin/plexilab-init", 0o755)
    _install(
        b"#!/bin/sh\n# Ask the PlexiLab init (PID 1) for a clean power-off.\n"
        b"exec kill -USR2 1\n",
        root / "sbin/plexilab-poweroff",
        0o755,
    )
    _install(RECIPES / "sshd_config", root / "etc/plexilab/sshd_config", 0o644)
    mod_src = kernel_root / "lib/modules" / version
    order = []
    for name, (dest, mode) in VARIANT_FILES.get(variant, {}).items():
        _install(RECIPES / variant / name, root / dest, mode)
    for path in module_closure(mod_src, kernel_modules(variant)):
        rel = path.relative_to(kernel_root)
        _install(path, root / rel, 0o644)
        order.append("/" + str(rel))
    _install(
        ("\n".join(order) + "\n").encode(), root / "etc/plexilab/modules.order", 0o644
    )
    for node, major, minor in (("console", 5, 1), ("null", 1, 3)):
        dev = root / "dev" / node
        if not dev.exists():
            dev.parent.mkdir(exist_ok=True)
            os.mknod(dev, 0o600 | 0o020000, os.makedev(major, minor))
    (root / "etc/hostname").write_text("plexilab\n")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # never ship a host key in the shared base


def build_image(
    arch: str,
    *,
    rebuild: bool = False,
    rebuild_rootfs: bool = False,
    variant: str = "",
) -> Image:
    """Build the image of *arch* into the cache (reused if another process just did)."""
    setup_host.ensure()
    key = image_key(arch, variant)
    final = cache_root() / "images" / image_name(arch, key, variant)
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(final.with_suffix(".lock")):  # one builder; the others wait and reuse
        if not rebuild and (final / "manifest.json").is_file():
            return _load(arch, key, final)
        return _build_image(
            arch, key, final, rebuild_rootfs=rebuild_rootfs, variant=variant
        )


def _build_image(
    arch: str, key: str, final: Path, *, rebuild_rootfs: bool, variant: str = ""
) -> Image:
    profile = load_profile(arch, variant)
    timings: dict[str, float] = {}
    start = time.monotonic()
    console.rule(f"guest image {image_name(arch, key, variant)}")
    if variant:
        rootfs = build_rootfs(profile, rebuild=rebuild_rootfs, variant=variant)
    else:  # (plain builds keep the old call: tests stub build_rootfs)
        rootfs = build_rootfs(profile, rebuild=rebuild_rootfs)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"image-{arch}-", dir=final.parent) as t:
        work = Path(t)
        with Step("kernel", timings) as step:
            kernel_root, version = fetch_kernel(profile, work)
            step.note = version
        out = work / "out"
        out.mkdir()
        shutil.copyfile(kernel_root / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
        root = work / "root"
        with Step("assemble rootfs", timings) as step:
            assemble(profile, rootfs, kernel_root, version, root, variant)
            step.note = mb(du(root))
        raw = work / "disk.raw"
        with Step("mke2fs -d", timings) as step:
            run(
                [
                    "mke2fs", "-q", "-F", "-t", "ext4", "-m", "0", "-L", "plexiroot",
                    "-d", str(root), str(raw), f"{profile.disk_mib}M",
                ]
            )  # fmt: skip
            step.note = f"{mb(du(raw))} used of {profile.disk_mib} MiB"
        with Step("qemu-img convert", timings) as step:
            disk = out / "base.qcow2"
            run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(disk)])
            disk.chmod(0o444)  # overlays only: the base is never written
            step.note = mb(disk.stat().st_size)
        py = run(
            ["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "python3"]
        ).stdout.split()
        manifest: dict[str, object] = {
            "arch": arch,
            "key": key,
            "variant": variant,
            "kernel_version": version,
            "python3": py[1] if len(py) > 1 else "?",
            "packages": packages(variant),
            "modules": (root / "etc/plexilab/modules.order").read_text().split(),
            "rootfs_bytes": du(root),
            "disk_bytes": disk.stat().st_size,
            "seconds": timings,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    console.log(
        f"image {arch} ready in {time.monotonic() - start:.1f} s: {final} "
        f"(disk {mb(int(manifest['disk_bytes']))})"  # type: ignore[call-overload]
    )
    return _load(arch, key, final)


def _load(arch: str, key: str, directory: Path) -> Image:
    manifest = json.loads((directory / "manifest.json").read_text())
    return Image(
        arch=arch,
        key=key,
        directory=directory,
        kernel=directory / "vmlinuz",
        disk=directory / "base.qcow2",
        manifest=manifest,
    )


def cached(arch: str, variant: str = "") -> Image | None:
    """The cached image of the current recipes, or None."""
    key = image_key(arch, variant)
    directory = cache_root() / "images" / image_name(arch, key, variant)
    if (directory / "manifest.json").is_file():
        return _load(arch, key, directory)
    return None


def image(arch: str, *, rebuild: bool = False, variant: str = "") -> Image:
    """The image of *arch* and *variant* for the current recipes (built if absent)."""
    if not rebuild:
        found = cached(arch, variant)
        if found is not None:
            return found
    if variant:
        return build_image(arch, rebuild=rebuild, variant=variant)
    return build_image(arch, rebuild=rebuild)


def build_images(
    arches: Sequence[str],
    *,
    rebuild: bool = False,
    rebuild_rootfs: bool = False,
    variant: str = "",
) -> list[Image]:
    """Build several images in parallel (each is mostly one long subprocess)."""
    kw: dict[str, Any] = {"rebuild": rebuild, "rebuild_rootfs": rebuild_rootfs}
    if variant:
        kw["variant"] = variant
    if len(arches) == 1:
        return [build_image(arches[0], **kw)]
    with concurrent.futures.ThreadPoolExecutor(len(arches)) as pool:
        futures = [pool.submit(build_image, a, **kw) for a in arches]
        return [f.result() for f in futures]


def images_for(arches: Sequence[str], variant: str = "") -> list[Image]:
    """Images of *arches*, building the missing ones in parallel."""
    found = {a: cached(a, variant) for a in arches}
    missing = [a for a, img in found.items() if img is None]
    built = (
        {img.arch: img for img in build_images(missing, variant=variant)}
        if missing
        else {}
    )
    return [found[a] or built[a] for a in arches]


def prune() -> list[Path]:
    """Remove cached images and rootfs layers that the current recipes do not use."""
    keep = set()
    for arch in ARCHES:
        for variant in ("", *VARIANTS):
            profile = load_profile(arch, variant)
            keep.add(image_name(arch, image_key(arch, variant), variant))
            keep.add(image_name(arch, rootfs_key(profile, variant), variant))
    removed = []
    for layer in ("images", "rootfs"):
        for path in sorted((cache_root() / layer).glob("*")):
            stem = path.name.split(".", 1)[0]
            if stem in keep:
                continue
            with locked((cache_root() / layer / stem).with_suffix(".lock")):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
                elif path.suffix == ".json":
                    path.unlink(missing_ok=True)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plexilab.infra.images", description=__doc__
    )
    parser.add_argument("--arch", choices=[*ARCHES, "all"], default="all")
    parser.add_argument("--variant", choices=["", *VARIANTS], default="")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the image")
    parser.add_argument(
        "--rebuild-rootfs", action="store_true", help="re-bootstrap too"
    )
    args = parser.parse_args(argv)
    arches = ARCHES if args.arch == "all" else (args.arch,)
    start = time.monotonic()
    if args.rebuild or args.rebuild_rootfs:
        built = build_images(
            arches,
            rebuild=True,
            rebuild_rootfs=args.rebuild_rootfs,
            variant=args.variant,
        )
    else:
        built = images_for(arches, args.variant)
    for img in built:
        print(json.dumps({"arch": img.arch, "dir": str(img.directory), **img.manifest}))
    console.log(f"images {', '.join(arches)}: {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
