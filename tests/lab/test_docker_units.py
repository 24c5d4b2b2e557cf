"""Docker provider pieces that need no engine: recipe keys, build context, labels."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from plexilab.infra import engine as containers
from plexilab.infra import images


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Debian bookworm host whose apt sources file is ours (not the machine's)."""
    sources = tmp_path / "lab.sources"
    sources.write_text("Types: deb\nURIs: http://deb.example/debian\n")
    monkeypatch.setenv("PLEXILAB_APT_SOURCES", str(sources))
    monkeypatch.setattr(images, "host_suite", lambda: "bookworm")
    return sources


def test_base_key_follows_the_recipe(
    monkeypatch: pytest.MonkeyPatch, host: Path, tmp_path: Path
) -> None:
    key = containers.base_key("base")
    assert key == containers.base_key("base")
    assert key != containers.base_key("build")
    other = tmp_path / "sources.list"  # where the mirror list lives is no recipe
    other.write_text("deb http://deb.example/debian bookworm main\n")
    monkeypatch.setenv("PLEXILAB_APT_SOURCES", str(other))
    assert containers.base_key("base") == key
    monkeypatch.setattr(images, "host_suite", lambda: "trixie")
    assert containers.base_key("base") != key
    monkeypatch.setattr(images, "host_suite", lambda: "bookworm")
    changed = {**containers.BASE_PACKAGES, "base": ("python3",)}
    monkeypatch.setattr(containers, "BASE_PACKAGES", changed)
    assert containers.base_key("base") != key


def test_mmdebstrap_streams_a_tarball_from_the_host_sources(host: Path) -> None:
    argv = containers.mmdebstrap_argv("build")
    assert "--format=tar" in argv
    assert argv[-3:] == ["bookworm", "-", str(host)]  # tarball to stdout
    assert not any("http" in a for a in argv)  # no mirror URL in code
    assert "gcc" in next(a for a in argv if a.startswith("--include="))


def test_head_context_has_the_sources_and_wheelhouses(tmp_path, monkeypatch) -> None:
    wheels = tmp_path / "build" / "docker" / "wheels"
    (wheels / "runtime").mkdir(parents=True)
    (wheels / "runtime" / "x-1-py3-none-any.whl").write_bytes(b"zip")
    monkeypatch.setattr(containers, "CONTEXT_WHEELS", wheels)
    monkeypatch.setattr(containers, "REPO", tmp_path)
    monkeypatch.setattr(
        containers.subprocess,
        "run",
        lambda *a, **k: _fake_git_archive(tmp_path),
    )
    with tarfile.open(fileobj=containers.head_context()) as tar:
        names = tar.getnames()
        member = tar.extractfile("build/docker/wheels/runtime/x-1-py3-none-any.whl")
        assert member is not None
        assert member.read() == b"zip"
    assert "Dockerfile" in names


def _fake_git_archive(tmp_path):  # type: ignore[no-untyped-def]
    import io
    import subprocess

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        data = b"FROM scratch\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return subprocess.CompletedProcess([], 0, buf.getvalue(), b"")


def test_labels_and_filters() -> None:
    labels = containers.labels("r1", role="node")
    assert labels[containers.OWNER_LABEL] == containers.OWNER
    assert labels[containers.RUN_LABEL] == "r1"
    assert containers._filters("r1") == {
        "label": [
            f"{containers.OWNER_LABEL}={containers.OWNER}",
            f"{containers.RUN_LABEL}=r1",
        ]
    }
    assert containers._filters(None)["label"] == [
        f"{containers.OWNER_LABEL}={containers.OWNER}"
    ]
