"""plexilab.infra.wheels: tags, checks, requirements (builds: test_qemu_guests)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from plexilab.infra import setup_host, wheels


def _elf(machine: int) -> bytes:
    return b"\x7fELF" + bytes(14) + machine.to_bytes(2, "little") + bytes(40)


def _wheel(tmp_path: Path, machine: int, families: list[str]) -> Path:
    path = tmp_path / "plexichat-0.1.0-cp311-cp311-linux_aarch64.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for family in families:
            name = f"plexichat/{family}/_speedups.cpython-311-aarch64-linux-gnu.so"
            zf.writestr(name, _elf(machine))
        zf.writestr("plexichat/__init__.py", "")
    return path


def test_check_wheel_accepts_complete_target_elf(tmp_path: Path) -> None:
    families = wheels.pyx_families()
    path = _wheel(tmp_path, wheels.ELF_MACHINE["aarch64"], families)
    assert len(wheels.check_wheel(path, "aarch64")) == len(families)


def test_check_wheel_rejects_host_objects(tmp_path: Path) -> None:
    path = _wheel(tmp_path, wheels.ELF_MACHINE["x86_64"], wheels.pyx_families())
    with pytest.raises(RuntimeError, match="not an aarch64 ELF"):
        wheels.check_wheel(path, "aarch64")


def test_check_wheel_rejects_a_missing_family(tmp_path: Path) -> None:
    families = wheels.pyx_families()
    assert families
    path = _wheel(tmp_path, wheels.ELF_MACHINE["aarch64"], families[1:])
    with pytest.raises(RuntimeError, match=f"lacks compiled modules of: {families[0]}"):
        wheels.check_wheel(path, "aarch64")


def test_platform_tags_cover_the_guest_glibc() -> None:
    tags = wheels.platform_tags("aarch64")
    assert "manylinux_2_36_aarch64" in tags
    assert "manylinux_2_28_aarch64" in tags
    assert "manylinux2014_aarch64" in tags
    assert all(t.endswith("_aarch64") for t in tags)


SYSCONFIGDATA = Path("/usr/lib/python3.11/_sysconfigdata__linux_aarch64-linux-gnu.py")


@pytest.fixture
def cross_toolchain(skips: Any) -> None:
    """libpython3.11-dev:arm64 and the aarch64 gcc, installed here when missing
    (no reliance on an earlier test having run ``invoke setup``)."""
    if SYSCONFIGDATA.is_file() and shutil.which("aarch64-linux-gnu-gcc"):
        return
    skips.setup("arm64 cross toolchain", setup_host.ensure, quiet=True, binfmt=False)


@pytest.mark.usefixtures("cross_toolchain")
def test_cross_env_points_at_only_the_target_sysconfigdata(tmp_path: Path) -> None:
    source = SYSCONFIGDATA
    env = wheels.cross_env("aarch64", tmp_path)
    assert env["_PYTHON_HOST_PLATFORM"] == "linux-aarch64"
    assert env["CC"].startswith("aarch64-linux-gnu-")
    assert [p.name for p in Path(env["PYTHONPATH"]).iterdir()] == [source.name]


def test_cross_env_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wheels, "PYTHON_VERSION", "0.0")
    with pytest.raises(
        RuntimeError, match=r"python0\.0/.*is missing: run `invoke setup`"
    ):
        wheels.cross_env("aarch64", tmp_path)


def test_artifacts_needs_one_wheel_and_a_wheelhouse(tmp_path: Path) -> None:
    assert wheels.artifacts("aarch64", tmp_path) is None
    (tmp_path / "aarch64" / "wheelhouse").mkdir(parents=True)
    wheel = tmp_path / "aarch64" / "plexichat-0.1.0-cp311-cp311-linux_aarch64.whl"
    wheel.write_bytes(b"")
    assert wheels.artifacts("aarch64", tmp_path) is None
    (tmp_path / "aarch64" / "wheelhouse" / "numpy-2-cp311.whl").write_bytes(b"")
    assert wheels.artifacts("aarch64", tmp_path) == (
        wheel,
        tmp_path / "aarch64" / "wheelhouse",
    )


def test_build_copies_a_prebuilt_wheel_after_checking_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build(prebuilt=...) is how the artifact store's wheel reaches dist/."""

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a prebuilt wheel is not built again")

    monkeypatch.setattr(wheels, "build_wheel", no_build)
    families = wheels.pyx_families()
    store = tmp_path / "store"
    store.mkdir()
    prebuilt = _wheel(store, wheels.ELF_MACHINE["aarch64"], families)
    out = tmp_path / "dist"
    (out / "aarch64").mkdir(parents=True)
    stale = out / "aarch64" / "plexichat-0.0.1-cp311-cp311-linux_aarch64.whl"
    stale.write_bytes(b"old")
    result = wheels.build("aarch64", out, wheelhouse=False, prebuilt=prebuilt)
    assert result.wheel == out / "aarch64" / prebuilt.name
    assert result.wheel.read_bytes() == prebuilt.read_bytes()
    assert prebuilt.is_file()  # copied, the store keeps its wheel
    assert not stale.exists()
    assert len(result.extensions) == len(families)
    wrong = _wheel(tmp_path, wheels.ELF_MACHINE["x86_64"], families)
    with pytest.raises(RuntimeError, match="not an aarch64 ELF"):
        wheels.build("aarch64", out, wheelhouse=False, prebuilt=wrong)
