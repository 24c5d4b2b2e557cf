"""Containers in QEMU guests (``invoke qemu.cluster --runtime=docker``).

Without a VM: the docker image variant's cache keys and profile, the SDK's SSH
adapter (lab key and pinned host key; ``~/.ssh`` is neither read nor written),
option checks.  Marked ``qemu`` and ``docker``: one real run that boots the
docker variant, loads the lab host's PlexiChat image into each guest's engine
and runs a small container cluster in the guests with the checker passing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from plexilab.infra import images
from plexilab.infra.sshclient import HostKeyPair, SSHClient, known_hosts_name
from plexilab.providers import docker_in_guests as gd
from plexilab.run import qemu as qc

# -- the image variant -----------------------------------------------------------------


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "qemu"
    shutil.copytree(images.RECIPES, path)
    monkeypatch.setattr(images, "RECIPES", path)
    return path


def test_the_variant_has_its_own_key_and_leaves_the_plain_key_alone(
    recipes: Path,
) -> None:
    plain = images.image_key("x86_64")
    docker = images.image_key("x86_64", "docker")
    assert docker != plain
    assert images.image_key("aarch64", "docker") != docker
    # Editing the variant re-keys the variant only.
    with (recipes / "docker" / "packages.txt").open("a") as fh:
        fh.write("jq\n")
    assert images.image_key("x86_64") == plain
    changed = images.image_key("x86_64", "docker")
    assert changed != docker
    with (recipes / "docker" / "dockerd.sh").open("a") as fh:
        fh.write("# changed\n")
    assert images.image_key("x86_64") == plain
    assert images.image_key("x86_64", "docker") != changed
    # Editing the plain recipe re-keys both.
    with (recipes / "init.sh").open("a") as fh:
        fh.write("# changed\n")
    assert images.image_key("x86_64") != plain
    assert images.image_key("x86_64", "docker") != changed


def test_the_variant_rootfs_and_cache_names_are_separate(recipes: Path) -> None:
    plain = images.load_profile("x86_64")
    docker = images.load_profile("x86_64", "docker")
    assert images.rootfs_key(docker, "docker") != images.rootfs_key(plain)
    assert images.packages("docker")[: len(images.packages())] == images.packages()
    assert "docker.io" in images.packages("docker")
    assert "docker.io" not in images.packages()
    assert "overlay" in images.kernel_modules("docker")
    assert "overlay" not in images.kernel_modules()
    opts = images.mmdebstrap_options(docker, "docker")
    assert any(o.startswith("--include=") and "docker.io" in o for o in opts)
    assert images.image_name("x86_64", "k", "docker") == "x86_64-docker-k"
    assert images.image_name("x86_64", "k") == "x86_64-k"
    assert images.recipe_files("docker")
    assert not set(images.recipe_files()) & set(images.recipe_files("docker"))


def test_the_variant_profile_overrides_memory_disk_and_cmdline() -> None:
    for arch in images.ARCHES:
        plain = images.load_profile(arch)
        docker = images.load_profile(arch, "docker")
        assert docker.memory_mib > plain.memory_mib
        assert docker.disk_mib > plain.disk_mib
        assert docker.cmdline.startswith(plain.cmdline + " ")
        assert (docker.qemu, docker.machine) == (plain.qemu, plain.machine)
    with pytest.raises(ValueError, match="unknown image variant"):
        images.load_profile("x86_64", "podman")


def test_prune_keeps_the_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLEXILAB_CACHE", str(tmp_path))
    keep = images.image_name("x86_64", images.image_key("x86_64", "docker"), "docker")
    stale = tmp_path / "images" / "x86_64-docker-0000"
    for path in (tmp_path / "images" / keep, stale):
        path.mkdir(parents=True)
    assert images.prune() == [stale]
    assert (tmp_path / "images" / keep).is_dir()


# -- the SDK's SSH adapter -------------------------------------------------------------


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME whose ~/.ssh would redirect and re-key every connection."""
    home = tmp_path / "home"
    ssh = home / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "config").write_text(
        "Host *\n  HostName 192.0.2.1\n  User mallory\n  Port 2222\n"
        "  IdentityFile ~/.ssh/other\n  ProxyCommand false\n"
    )
    (ssh / "known_hosts").write_text(
        "[127.0.0.1]:2022 " + HostKeyPair.generate().public_line + "\n"
    )
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PLEXILAB_CACHE", str(tmp_path / "cache"))  # lab key here
    return home


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Record paramiko connects instead of making them (and fake the banner)."""
    calls: list[dict[str, Any]] = []
    pairs: list[socket.socket] = []

    def connect(self: paramiko.SSHClient, *args: Any, **kwargs: Any) -> None:
        calls.append({"client": self, "args": args, **kwargs})

    def banner(host: str, port: int, timeout: float) -> socket.socket:
        a, b = socket.socketpair()
        pairs.extend((a, b))
        return a

    monkeypatch.setattr(paramiko.SSHClient, "connect", connect)
    monkeypatch.setattr(gd, "wait_for_banner", banner)
    yield calls
    for sock in pairs:
        sock.close()


def _snapshot(home: Path) -> dict[str, bytes]:
    files = sorted((home / ".ssh").rglob("*"))
    return {str(p): p.read_bytes() for p in files if p.is_file()}


def test_adapter_uses_the_lab_key_and_the_pinned_host_key_only(
    fake_home: Path, connects: list[dict[str, Any]]
) -> None:
    before = _snapshot(fake_home)
    pinned = HostKeyPair.generate()
    ssh = SSHClient("127.0.0.1", 2022, host_key=pinned.public_pkey(), name="g0")
    adapter = gd.LabSSHAdapter(ssh, timeout=30)
    try:
        (call,) = connects
        assert call["hostname"] == "127.0.0.1"
        assert call["port"] == 2022
        assert call["username"] == "root"
        assert call["pkey"] is ssh.key
        assert call["look_for_keys"] is False
        assert call["allow_agent"] is False
        assert "key_filename" not in call
        assert isinstance(call["sock"], socket.socket)  # banner waited for
        client = call["client"]
        assert client is adapter.ssh_client
        keys = client.get_host_keys()
        assert list(keys.keys()) == [known_hosts_name("127.0.0.1", 2022)]
        entry = keys.lookup(known_hosts_name("127.0.0.1", 2022))
        assert entry is not None
        assert list(entry.values()) == [pinned.public_pkey()]
        assert isinstance(client._policy, paramiko.RejectPolicy)
        assert not client._system_host_keys.keys()  # ~/.ssh/known_hosts unread
    finally:
        adapter.close()
    assert _snapshot(fake_home) == before  # nothing written to ~/.ssh


def test_engine_client_mounts_the_lab_adapter(
    fake_home: Path, connects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import docker.api.client

    monkeypatch.setattr(
        docker.api.client.APIClient,
        "_retrieve_server_version",
        lambda self: "1.41",
    )
    monkeypatch.setenv("PATH", str(fake_home))  # no `ssh` binary could run
    pinned = HostKeyPair.generate()
    ssh = SSHClient("127.0.0.1", 2022, host_key=pinned.public_pkey(), name="g0")
    client = gd.engine_client(ssh, timeout=30)
    try:
        adapter = client.api.get_adapter(f"{gd.SSH_BASE}/v1.41/version")
        assert isinstance(adapter, gd.LabSSHAdapter)
        assert adapter.lab_ssh is ssh
        assert client.api.base_url == gd.SSH_BASE
        assert len(connects) == 1
    finally:
        client.close()


# -- options ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["aarch64", "mixed"])
def test_docker_runtime_refuses_foreign_guests(arch: str, skips) -> None:
    from plexilab.infra.wheels import host_arch

    if host_arch() == "aarch64":
        skips.skip("not-x86_64", "checks the lab host's refusal of aarch64 guests")
    with pytest.raises(ValueError, match=r"--runtime=docker.*aarch64"):
        qc.QemuClusterOptions(nodes=3, arch=arch, runtime="docker")  # type: ignore[arg-type]


def test_bad_runtime_is_refused() -> None:
    with pytest.raises(ValueError, match="--runtime must"):
        qc.QemuClusterOptions(runtime="podman")  # type: ignore[arg-type]


def test_docker_specs_boot_the_variant_without_a_deps_disk() -> None:
    options = qc.QemuClusterOptions(nodes=2, arch="x86_64", runtime="docker")
    specs = qc.guest_specs(options, None)
    assert [s.variant for s in specs] == ["docker", "docker"]
    assert [s.wheelhouse for s in specs] == [None, None]
    plain = qc.guest_specs(
        qc.QemuClusterOptions(nodes=1, arch="x86_64"),
        {"x86_64": (Path("w.whl"), Path("house"))},
    )
    assert plain[0].variant == ""
    assert plain[0].wheelhouse == Path("house")


def test_cli_has_the_runtime_option() -> None:
    from plexilab.cli import qemu as cli

    args = {a.name: a for a in cli.qemu.tasks["cluster"].get_arguments()}
    assert args["runtime"].default == "process"
    assert args["runtime"].kind is str  # (its help: test_qemu_cluster checks all)


# -- a real run ------------------------------------------------------------------------


@pytest.fixture
def ready(skips) -> None:
    from plexilab.infra import engine as containers
    from plexilab.infra import setup_host

    skips.setup("QEMU host set-up", setup_host.ensure)
    skips.setup("Docker engine", containers.ensure_engine).close()


def _bounded(fn: Any) -> Any:
    if importlib.util.find_spec("pytest_timeout") is not None:
        return pytest.mark.timeout(1500)(fn)
    return fn


@_bounded
@pytest.mark.qemu
@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.nightly  # ~8 min warm: docker load of the image under TCG
@pytest.mark.usefixtures("ready")
def test_node_containers_in_docker_guests_lose_nothing(tmp_path: Path) -> None:
    from plexilab.infra import engine as containers

    options = qc.QemuClusterOptions(
        nodes=2,
        arch="x86_64",
        runtime="docker",
        duration=5.0,
        clients=2,
        p2p_count=40,
        results=tmp_path / "run",
        fallback="none",
        name_prefix=f"d{os.getpid() % 100000}-",
    )
    res = qc.run(options)
    json.dumps(res)
    assert (res["provider"], res["runtime"]) == ("qemu", "docker")
    assert res["acked"] > 0
    assert (res["lost"], res["duplicated"], res["reordered"]) == (0, 0, 0)
    assert res["p2p_coverage"] == 1.0
    assert res["leftover_qemu_pids"] == []
    info = res["docker"]
    local = containers.ensure_engine()
    try:
        wanted = local.images.get(containers.IMAGE).id.split(":")[-1]
    finally:
        local.close()
    assert info["image_id"] == wanted
    assert set(info["guests"]) == {n["host"] for n in res["per_node"]}
    for guest in info["guests"].values():
        assert guest["dockerd_s"] > 0
        assert guest["load"]["bytes"] == info["save"]["bytes"] > 0
        assert guest["leftovers"] == 0
    for node in res["per_node"]:
        assert node["backend"]
        assert node["send_latency_ms"]["count"] > 0
