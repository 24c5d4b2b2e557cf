"""plexilab.infra.artifacts: content keys, the store, freshness of dist/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from plexilab.infra import artifacts, wheels
from plexilab.run import install


def _repo(root: Path) -> Path:
    """A fake source tree with sources, build outputs and caches."""
    pkg = root / "src" / "plexichat"
    (pkg / "node" / "__pycache__").mkdir(parents=True)
    (pkg / "_vendor" / "xxhash").mkdir(parents=True)
    (root / "setup.py").write_text("setup()\n")
    (root / "pyproject.toml").write_text("[project]\n")
    (pkg / "__init__.py").write_text("")
    (pkg / "py.typed").write_text("")
    (pkg / "node" / "_speedups.pyx").write_text("cdef int x\n")
    (pkg / "node" / "_speedups.c").write_text("/* generated */\n")
    (pkg / "node" / "_speedups.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7f")
    (pkg / "node" / "_speedups.html").write_text("<html>")
    (pkg / "node" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"pyc")
    (pkg / "_vendor" / "xxhash" / "xxhash.h").write_text("#define X 1\n")
    (pkg / "_vendor" / "xxhash" / "LICENSE").write_text("BSD\n")
    (pkg / "vendor" / "other").mkdir(parents=True)
    (pkg / "vendor" / "other" / "COPYING").write_text("MIT\n")
    return root


def test_source_files_are_the_sources_only(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    names = [str(p.relative_to(repo)) for p in artifacts.source_files(repo)]
    assert names == [
        "setup.py",
        "pyproject.toml",
        "src/plexichat/__init__.py",
        "src/plexichat/_vendor/xxhash/LICENSE",
        "src/plexichat/_vendor/xxhash/xxhash.h",
        "src/plexichat/node/_speedups.pyx",
        "src/plexichat/py.typed",
        "src/plexichat/vendor/other/COPYING",
    ]


def test_source_key_follows_content_not_mtime(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    key = artifacts.source_key(repo)
    pyx = repo / "src" / "plexichat" / "node" / "_speedups.pyx"
    os.utime(pyx, (1, 1))  # touched: same content
    assert artifacts.source_key(repo) == key
    (repo / "src" / "plexichat" / "node" / "_speedups.c").write_text("/* other */")
    assert artifacts.source_key(repo) == key  # a build output
    pyx.write_text("cdef int y\n")
    assert artifacts.source_key(repo) != key
    pyx.write_text("cdef int x\n")
    assert artifacts.source_key(repo) == key
    pyx.rename(pyx.with_name("_other.pyx"))  # same bytes, another path
    assert artifacts.source_key(repo) != key


def test_artifact_key_covers_arch_lock_and_numba() -> None:
    keys = {
        artifacts.artifact_key("x86_64"),
        artifacts.artifact_key("aarch64"),
        artifacts.artifact_key("x86_64", numba=True),
    }
    assert len(keys) == 3
    assert artifacts.artifact_key("x86_64") == artifacts.artifact_key("x86_64")


def test_cached_builds_once_and_publishes_atomically(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(out: Path) -> None:
        assert list(out.iterdir()) == []  # a fresh, empty directory
        calls.append(out)
        (out / "thing").write_text("built")

    first = artifacts.cached("demo", "k1", build, root=tmp_path)
    assert first == tmp_path / "demo" / "k1"
    assert (first / "thing").read_text() == "built"
    assert (first / artifacts.COMPLETE).is_file()
    assert artifacts.cached("demo", "k1", build, root=tmp_path) == first
    assert len(calls) == 1
    artifacts.cached("demo", "k2", build, root=tmp_path)
    assert len(calls) == 2


def test_a_failed_build_leaves_nothing_to_reuse(tmp_path: Path) -> None:
    def broken(out: Path) -> None:
        (out / "half").write_text("partial")
        raise RuntimeError("compiler exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        artifacts.cached("demo", "k", broken, root=tmp_path)
    assert not (tmp_path / "demo" / "k").exists()
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["k.lock"]
    # an incomplete directory (a crash before the marker) is rebuilt
    (tmp_path / "demo" / "k").mkdir()
    done = artifacts.cached(
        "demo", "k", lambda out: (out / "ok").write_text("1"), root=tmp_path
    )
    assert (done / "ok").is_file()


class FakeBuild:
    """Stands in for wheels.build: writes a wheel and a wheelhouse into dist."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self, arch: str, out: Path, *, numba: bool = False, prebuilt: Path
    ) -> wheels.BuildResult:
        self.calls += 1
        target = out / arch
        house = target / "wheelhouse"
        house.mkdir(parents=True, exist_ok=True)
        whl = target / prebuilt.name
        whl.write_bytes(prebuilt.read_bytes() + b" %d" % self.calls)
        (house / "msgpack-1.0-py3-none-any.whl").write_bytes(b"dep")
        if numba:
            (house / "numba-0.1-py3-none-any.whl").write_bytes(b"numba")
        return wheels.BuildResult(arch, whl, house)


class FakeWheel:
    """Stands in for wheels.build_wheel (called by the store, artifacts.wheel)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(
        self, arch: str, out: Path, *, timeout: float | None = None
    ) -> tuple[Path, list[str]]:
        self.calls.append(arch)
        path = out / f"plexichat-1.0-cp311-cp311-linux_{arch}.whl"
        path.write_bytes(b"wheel of %d builds" % len(self.calls))
        return path, []


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeWheel:
    build_wheel = FakeWheel()
    monkeypatch.setattr(wheels, "build_wheel", build_wheel)
    monkeypatch.setattr(artifacts, "store_root", lambda: tmp_path / "store")
    return build_wheel


@pytest.fixture
def fake_dist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wheel: FakeWheel
) -> FakeBuild:
    build = FakeBuild()
    monkeypatch.setattr(artifacts, "DIST", tmp_path / "dist")
    monkeypatch.setattr(wheels, "build", build)
    monkeypatch.setattr(artifacts, "source_key", lambda repo=None: "sources-1")
    return build


def test_ensure_artifacts_rebuilds_only_when_the_content_changes(
    fake_dist: FakeBuild, fake_wheel: FakeWheel, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    wheel, house = artifacts.ensure_artifacts("x86_64", progress=seen.append)
    assert fake_dist.calls == 1
    assert fake_wheel.calls == ["x86_64"]  # the wheel was built in the store
    assert wheel.read_bytes().startswith(artifacts.wheel("x86_64").read_bytes())
    assert seen[0].startswith("built plexichat-1.0")
    assert artifacts.recorded_key("x86_64", artifacts.DIST) == (
        artifacts.artifact_key("x86_64")
    )
    assert artifacts.ensure_artifacts("x86_64") == (wheel, house)
    assert fake_dist.calls == 1  # same content: reused, whatever the mtimes
    os.utime(wheel, (1, 1))  # older than every source: mtime would say stale
    assert artifacts.ensure_artifacts("x86_64") == (wheel, house)
    assert fake_dist.calls == 1
    monkeypatch.setattr(artifacts, "source_key", lambda repo=None: "sources-2")
    artifacts.ensure_artifacts("x86_64")
    assert fake_dist.calls == 2  # other sources: rebuilt
    assert len(fake_wheel.calls) == 2
    artifacts.ensure_artifacts("x86_64", numba=True)
    assert fake_dist.calls == 3  # numba wanted: remade ...
    assert len(fake_wheel.calls) == 2  # ... with the stored wheel
    artifacts.ensure_artifacts("x86_64", numba=True, rebuild=True)
    assert fake_dist.calls == 4
    assert len(fake_wheel.calls) == 3  # --rebuild builds the wheel again


def test_ensure_artifacts_adopts_fresh_unkeyed_artifacts_once(
    fake_dist: FakeBuild,
) -> None:
    wheel, house = artifacts.ensure_artifacts("aarch64")
    (artifacts.DIST / "aarch64" / artifacts.KEY_FILE).unlink()  # an older lab's
    assert artifacts.ensure_artifacts("aarch64") == (wheel, house)
    assert fake_dist.calls == 1  # newer than the sources: adopted, key recorded
    assert artifacts.recorded_key("aarch64", artifacts.DIST) is not None
    (artifacts.DIST / "aarch64" / artifacts.KEY_FILE).unlink()
    os.utime(wheel, (1, 1))  # older than the sources: not adopted
    artifacts.ensure_artifacts("aarch64")
    assert fake_dist.calls == 2


def test_wheel_and_wheelhouse_come_from_the_store(
    tmp_path: Path, fake_dist: FakeBuild, fake_wheel: FakeWheel
) -> None:
    store = tmp_path / "store"
    whl, house = artifacts.wheel_and_wheelhouse("x86_64", root=store)
    assert whl.is_relative_to(store / "wheelhouse")
    assert [p.name for p in house.iterdir()] == ["msgpack-1.0-py3-none-any.whl"]
    assert artifacts.wheel_and_wheelhouse("x86_64", root=store) == (whl, house)
    assert fake_dist.calls == 1
    artifacts.wheel_and_wheelhouse("x86_64", numba=True, root=store)
    assert fake_dist.calls == 2  # another wheelhouse ...
    assert fake_wheel.calls == ["x86_64"]  # ... one wheel build


def test_a_failed_build_leaves_no_wheel_and_rebuild_builds_again(
    fake_wheel: FakeWheel, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = artifacts.wheel("x86_64")
    assert artifacts.wheel("x86_64", rebuild=True) == first
    assert first.read_bytes() == b"wheel of 2 builds"

    def broken(arch: str, out: Path, *, timeout: float | None = None) -> None:
        raise RuntimeError(f"wheel build for {arch} timed out after {timeout} s")

    monkeypatch.setattr(wheels, "build_wheel", broken)
    with pytest.raises(RuntimeError, match="timed out after 5 s"):
        artifacts.wheel("x86_64", rebuild=True, timeout=5)
    assert first.read_bytes() == b"wheel of 2 builds"  # the old one stays


def test_wheel_builds_once_per_source_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_wheel: FakeWheel
) -> None:
    monkeypatch.setattr(artifacts, "source_key", lambda repo=None: "s1")
    first = artifacts.wheel("x86_64", root=tmp_path)
    assert artifacts.wheel("x86_64", root=tmp_path) == first
    assert first.parent.name == artifacts.wheel_key("x86_64")
    assert fake_wheel.calls == ["x86_64"]
    monkeypatch.setattr(artifacts, "source_key", lambda repo=None: "s2")
    assert artifacts.wheel("x86_64", root=tmp_path) != first
    assert fake_wheel.calls == ["x86_64", "x86_64"]


def test_local_runs_take_their_wheel_from_the_store(
    fake_wheel: FakeWheel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.install.build_wheel is the store's wheel of this machine's arch."""
    monkeypatch.setattr(wheels, "host_arch", lambda: "x86_64")
    assert install.build_wheel() == artifacts.wheel("x86_64")
    assert install.build_wheel().parent.name == artifacts.wheel_key("x86_64")
    assert fake_wheel.calls == ["x86_64"]  # built once, for both
    assert install.source_key() == artifacts.source_key()

    def broken(arch: str, out: Path, *, timeout: float | None = None) -> None:
        raise RuntimeError("wheel build for x86_64 failed")

    monkeypatch.setattr(wheels, "build_wheel", broken)
    monkeypatch.setattr(artifacts, "source_key", lambda repo=None: "other")
    with pytest.raises(install.InstallError, match="wheel build for x86_64 failed"):
        install.build_wheel()


def test_the_store_keeps_the_most_recently_used_wheels_per_arch(
    monkeypatch: pytest.MonkeyPatch, fake_wheel: FakeWheel
) -> None:
    def sources(key: str) -> None:
        monkeypatch.setattr(artifacts, "source_key", lambda repo=None: key)

    kept = artifacts.WHEELS_KEPT
    made = []
    for n in range(kept + 2):
        sources(f"s{n}")
        made.append(artifacts.wheel("x86_64"))
        os.utime(made[-1].parent, (n + 1, n + 1))  # used in this order
    other = artifacts.wheel("aarch64")  # another arch counts on its own
    assert [w.exists() for w in made] == [False, False] + [True] * kept
    assert other.exists()
    # a reused wheel counts as used: it outlives one built after it
    sources("s2")
    assert artifacts.wheel("x86_64") == made[2]
    assert len(fake_wheel.calls) == kept + 3  # reused, not built again
    sources("s-new")
    artifacts.wheel("x86_64")
    assert made[2].exists()
    assert not made[3].exists()
