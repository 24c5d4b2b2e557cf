"""plexilab.infra.images without mmdebstrap: keys, module order, and the disk pipeline.

The rootfs and kernel steps are replaced by small fakes; everything after
them (assemble, ``mke2fs -d``, ``qemu-img convert``, the manifest, the cache
and the deps disk) runs for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from plexilab.infra import depsdisk, images, setup_host, wheels

DISK_TOOLS = ("mke2fs", "qemu-img", "debugfs")


@pytest.fixture
def disk_tools(skips) -> None:
    """mke2fs, qemu-img and debugfs, installed now if missing (decided at run time,
    not at collection); on the lab host a set-up that cannot get them fails."""

    def ensure() -> None:
        if not all(shutil.which(t) for t in DISK_TOOLS):
            setup_host.ensure(binfmt=False)
        missing = [t for t in DISK_TOOLS if shutil.which(t) is None]
        if missing:
            raise setup_host.HostSetupError(f"still missing: {', '.join(missing)}")

    skips.setup("qemu-utils and e2fsprogs", ensure)


def _module(path: Path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0x\0")


@pytest.fixture
def kernel_root(tmp_path: Path) -> Path:
    root = tmp_path / "kernel"
    mods = root / "lib/modules/6.1.0-test"
    _module(mods / "kernel/drivers/virtio/virtio_ring.ko", "")
    _module(mods / "kernel/drivers/virtio/virtio.ko", "virtio_ring")
    _module(mods / "kernel/drivers/virtio/virtio_pci.ko", "virtio,virtio_ring")
    _module(mods / "kernel/net/core/failover.ko", "")
    _module(mods / "kernel/drivers/net/net_failover.ko", "failover")
    _module(mods / "kernel/drivers/net/virtio_net.ko", "net_failover,virtio")
    _module(mods / "kernel/drivers/block/virtio_blk.ko", "virtio")
    _module(mods / "kernel/drivers/char/hw_random/virtio-rng.ko", "virtio,rng_core")
    _module(mods / "kernel/drivers/firmware/qemu_fw_cfg.ko", "")
    (root / "boot").mkdir()
    (root / "boot/vmlinuz-6.1.0-test").write_bytes(b"kernel image")
    return root


def test_module_closure_loads_dependencies_first(kernel_root: Path) -> None:
    mods = kernel_root / "lib/modules/6.1.0-test"
    order = [p.stem for p in images.module_closure(mods, ["virtio_net", "virtio_pci"])]
    assert order == [
        "failover",
        "net_failover",
        "virtio_ring",
        "virtio",
        "virtio_net",
        "virtio_pci",
    ]
    assert [p.stem for p in images.module_closure(mods, ["virtio-rng"])][
        -1
    ] == "virtio-rng"
    with pytest.raises(RuntimeError, match="not found"):
        images.module_closure(mods, ["no_such_module"])


def test_recipes_parse() -> None:
    assert {"python3", "python3-venv", "openssh-server"} <= set(images.packages())
    assert "qemu_fw_cfg" in images.kernel_modules()
    for arch in images.ARCHES:
        profile = images.load_profile(arch)
        assert profile.arch == arch
        assert profile.qemu.endswith(arch)
    with pytest.raises(ValueError, match="unknown arch"):
        images.load_profile("riscv64")


def test_image_key_follows_the_recipes(tmp_path: Path, monkeypatch) -> None:
    recipes = tmp_path / "qemu"
    shutil.copytree(images.RECIPES, recipes)
    monkeypatch.setattr(images, "RECIPES", recipes)
    before = {arch: images.image_key(arch) for arch in images.ARCHES}
    assert before["x86_64"] != before["aarch64"]
    assert images.image_key("x86_64") == before["x86_64"]
    with (recipes / "init.sh").open("a") as fh:
        fh.write("# changed\n")
    assert images.image_key("x86_64") != before["x86_64"]
    # The rootfs layer only depends on the package list (and arch, options).
    profile = images.load_profile("x86_64")
    rootfs = images.rootfs_key(profile)
    (recipes / "sshd_config").write_text("changed\n")
    assert images.rootfs_key(profile) == rootfs
    (recipes / "packages.txt").write_text("python3\n")
    assert images.rootfs_key(profile) != rootfs


def test_mmdebstrap_uses_the_host_sources_and_no_host_keys(
    monkeypatch, tmp_path
) -> None:
    sources = tmp_path / "my.sources"
    sources.write_text("Types: deb\n")
    monkeypatch.setenv("PLEXILAB_APT_SOURCES", str(sources))
    assert images.host_sources() == sources
    assert images.host_suite()
    x86 = images.mmdebstrap_options(images.load_profile("x86_64"))
    arm = images.mmdebstrap_options(images.load_profile("aarch64"))
    assert not any("http" in opt for opt in x86 + arm)
    assert any("ssh_host_" in opt for opt in x86)
    on_x86 = os.uname().machine == "x86_64"
    assert any("py_compile" in opt for opt in arm) == on_x86
    assert not any("py_compile" in opt for opt in x86) or not on_x86


def test_compile_python_writes_pyc_for_the_guest_paths(tmp_path: Path) -> None:
    lib = tmp_path / "usr/lib/python3.11"
    lib.mkdir(parents=True)
    (lib / "mod.py").write_text("def f():\n    raise ValueError\n")
    images.compile_python(tmp_path)
    (pyc,) = (lib / "__pycache__").glob("mod.cpython-311.pyc")
    assert b"/usr/lib/python3.11/mod.py" in pyc.read_bytes()
    assert str(tmp_path).encode() not in pyc.read_bytes()


def _fake_rootfs(path: Path) -> Path:
    for d in ("etc/ssh", "sbin", "var/lib/dpkg", "dev"):
        (path / d).mkdir(parents=True, exist_ok=True)
    (path / "etc/ssh/ssh_host_ed25519_key").write_text("baked-in secret")
    (path / "var/lib/dpkg/status").write_text(
        "Package: python3\nStatus: install ok installed\nVersion: 3.11.2-1\n"
        "Architecture: amd64\nMaintainer: x\nDescription: x\n\n"
    )
    return path


@pytest.mark.usefixtures("disk_tools")
def test_build_image_pipeline(tmp_path: Path, monkeypatch, kernel_root: Path) -> None:
    monkeypatch.setenv("PLEXILAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(setup_host, "ensure", lambda **kw: setup_host.Report())
    rootfs = _fake_rootfs(tmp_path / "rootfs")
    monkeypatch.setattr(images, "build_rootfs", lambda profile, rebuild=False: rootfs)
    monkeypatch.setattr(
        images, "fetch_kernel", lambda profile, work: (kernel_root, "6.1.0-test")
    )
    assert images.cached("x86_64") is None
    img = images.image("x86_64")
    assert images.cached("x86_64") == img
    assert img.kernel.read_bytes() == b"kernel image"
    assert img.manifest["python3"] == "3.11.2-1"
    assert img.kernel_version == "6.1.0-test"
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(img.disk)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["format"] == "qcow2"
    raw = tmp_path / "check.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(img.disk), str(raw)], check=True
    )
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /etc/ssh", str(raw)], capture_output=True, text=True
    ).stdout
    assert "ssh_host_" not in listing  # no host key in the shared base
    order = subprocess.run(
        ["debugfs", "-R", "cat /etc/plexilab/modules.order", str(raw)],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert order[-1].endswith("qemu_fw_cfg.ko")
    init = subprocess.run(
        ["debugfs", "-R", "stat /sbin/plexilab-init", str(raw)],
        capture_output=True,
        text=True,
    ).stdout
    assert "Mode:  0755" in init
    assert images.image("x86_64") == img  # cached: no second build
    stale = [
        tmp_path / "cache/images/x86_64-0000",
        tmp_path / "cache/rootfs/aarch64-0000",
    ]
    for path in stale:
        path.mkdir(parents=True)
    assert sorted(images.prune()) == sorted(stale)
    assert images.cached("x86_64") == img


def _tiny_wheel(directory: Path, name: str) -> Path:
    path = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}.py", "VALUE = 42\n")
        info = f"{name}-1.0.dist-info"
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
        )
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.usefixtures("disk_tools")
def test_deps_disk_installs_the_wheelhouse(tmp_path: Path, monkeypatch) -> None:

    # The installer wheel the wheelhouses carry, fetched here if no earlier
    # build left one in dist/ (no reliance on test order).
    installer = sorted(Path("dist").glob("*/wheelhouse/installer-*.whl"))
    if not installer:
        fetched = tmp_path / "fetched"
        wheels.download_wheelhouse(wheels.host_arch(), fetched, ["installer"])
        installer = sorted(fetched.glob("installer-*.whl"))
    monkeypatch.setenv("PLEXILAB_CACHE", str(tmp_path / "cache"))
    house = tmp_path / "house"
    house.mkdir()
    shutil.copy(installer[0], house)
    _tiny_wheel(house, "tinydep")
    disk = depsdisk.deps_disk("aarch64", house)
    assert depsdisk.deps_disk("aarch64", house) == disk  # cached
    raw = tmp_path / "deps.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True
    )
    listing = subprocess.run(
        ["debugfs", "-R", "ls /site-packages", str(raw)], capture_output=True, text=True
    ).stdout
    assert "tinydep.py" in listing
    assert "tinydep-1.0.dist-info" in listing
