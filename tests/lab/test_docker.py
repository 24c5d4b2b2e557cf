"""The container path against a real Docker engine (marker ``docker``).

The engine is installed and started when needed; on the lab host (root,
Debian 12) an engine that cannot be set up fails the tests, elsewhere they skip
for a listed reason.  The local base images are reused when their recipe is
unchanged (making them takes ~1.5 min once).  The tests build their own image
tag and remove only what they created (by run id): a user's lab images,
containers and volumes on the same engine are left alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from plexilab.host import HostError
from plexilab.infra import engine as containers
from plexilab.providers.container import ContainerHost, wait_healthy
from plexilab.run.cluster import ClusterConfig
from plexilab.run.container import run_container_cluster

pytestmark = [pytest.mark.docker, pytest.mark.slow]
COMMIT = containers.resolve("HEAD")  # both builds use the same sources
TAG = f"plexilab/plexichat:test-{containers.new_run_id()}"  # this run's own image


@pytest.fixture(scope="module")
def client(skips: Any) -> Iterator[Any]:
    engine = skips.setup("Docker engine", containers.ensure_engine)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def user_lab(client: Any) -> Iterator[str]:
    """A volume of another lab run on the same engine; the tests must keep it."""
    rid = containers.new_run_id()
    volume = client.volumes.create(
        name=f"plexilab-{rid}-user", labels=containers.labels(rid)
    )
    yield str(volume.name)
    containers.cleanup(client, rid)


@pytest.fixture(scope="module")
def built(client: Any, user_lab: str) -> Iterator[containers.BuildResult]:
    """The image built into this run's own tag, untagged again at the end.

    Nothing else on the engine is touched: other tags of the image, the parent
    layers (the layer cache) and every container of other runs stay.
    """
    assert not containers.image_ready(client, TAG)
    yield containers.build_image(client, tag=TAG, commit=COMMIT)
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.remove(TAG, noprune=True)


@pytest.fixture
def run_id(client: Any) -> Iterator[str]:
    rid = containers.new_run_id()
    yield rid
    containers.cleanup(client, rid)


def test_image_builds_offline_from_local_bases(
    client: Any, built: containers.BuildResult, run_id: str
) -> None:
    image = client.images.get(TAG)
    config = image.attrs["Config"]
    assert config["User"] == "10001:10001"
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["Labels"][containers.OWNER_LABEL] == containers.OWNER
    assert config["Entrypoint"] == ["plexichat-node"]
    assert {b["tag"] for b in built.bases} == {
        containers.base_tag("base"),
        containers.base_tag("build"),
    }
    assert built.steps > 0
    assert built.size == image.attrs["Size"]
    # The runtime stage has the wheel's compiled kernels but no compiler.
    out = client.containers.run(
        TAG,
        entrypoint=["sh", "-c"],
        command=[
            "python -m plexichat.accel --require-compiled >/dev/null && echo ok;"
            " command -v gcc || echo no-gcc; id -u"
        ],
        network_mode="none",
        remove=True,
        labels=containers.labels(run_id),
    ).decode()
    assert out.split() == ["ok", "no-gcc", "10001"]


def test_second_build_reuses_the_layer_cache(
    client: Any, built: containers.BuildResult
) -> None:
    again = containers.build_image(client, tag=TAG, commit=COMMIT)
    assert again.image_id == built.image_id
    # Every step that can be cached came from the cache: all but FROM and the
    # ARGs before the first FROM (those never print "Using cache").
    steps = [
        (i, line) for i, line in enumerate(again.log) if containers.STEP_RE.match(line)
    ]
    first_from = next(n for n, (_i, line) in enumerate(steps) if " : FROM " in line)
    cacheable = [
        i
        for n, (i, line) in enumerate(steps)
        if n > first_from and " : FROM " not in line
    ]
    assert cacheable
    assert all("Using cache" in again.log[i + 1] for i in cacheable)
    assert again.cached_steps == len(cacheable)
    assert not any("Running in" in line for line in again.log)


def test_node_container_passes_its_health_check(
    client: Any, built: containers.BuildResult, run_id: str
) -> None:
    host = ContainerHost(client, "h", run_id, image=TAG)
    try:
        ep = host.listen_endpoint(0)
        node = host.spawn(
            [
                host.python(),
                "-m",
                "plexichat.node.cli",
                "--node-id",
                "n0",
                "--listen",
                str(ep),
                "--data-dir",
                f"{host.workdir()}/n0",
            ],
            log_path=f"{host.workdir()}/n0.log",
        )
        # A container whose health address has nothing listening must fail.
        idle = host.spawn(
            ["sleep", "60"],
            log_path=f"{host.workdir()}/idle.log",
            env={"PLEXICHAT_HEALTH": str(host.listen_endpoint(1))},
        )
        status = wait_healthy([node, idle], timeout=60)
        assert status == {node.name: "healthy", idle.name: "unhealthy"}
        assert node.alive()
        host.pause(node)  # the fault injector's pause: docker pause
        assert node.state()["Status"] == "paused"
        assert node.alive()
        host.resume(node)
        assert node.state()["Status"] == "running"
        node.stop(timeout=10)
        assert not node.alive()
    finally:
        host.close()


def test_host_run_put_get(
    client: Any, built: containers.BuildResult, run_id: str, tmp_path: Path
) -> None:
    host = ContainerHost(client, "files", run_id, image=TAG)
    try:
        assert host.arch
        src = tmp_path / "in.txt"
        src.write_text("plexichat\n")
        remote = f"{host.workdir()}/a/b/in.txt"
        host.put(src, remote)
        result = host.run(["cat", remote], timeout=30)
        assert result.stdout == "plexichat\n"
        host.get(remote, tmp_path / "out.txt")
        assert (tmp_path / "out.txt").read_text() == "plexichat\n"
        failed = host.run(["sh", "-c", "echo err >&2; exit 3"], timeout=30, check=False)
        assert (failed.returncode, failed.stderr) == (3, "err\n")
        with pytest.raises(HostError):
            host.get(f"{host.workdir()}/missing", tmp_path / "x")
    finally:
        host.close()


def test_cleanup_by_label_after_a_failure(
    client: Any, built: containers.BuildResult, run_id: str
) -> None:
    seen: list[int] = []

    def failing_run() -> None:
        with containers.cleaned(client, run_id):
            ContainerHost(client, "doomed", run_id, image=TAG)
            seen.append(containers.leftovers(client, run_id))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_run()
    assert seen == [2]  # the helper container and the volume existed
    assert containers.leftovers(client, run_id) == 0


def test_three_container_cluster_loses_nothing(
    client: Any, built: containers.BuildResult, tmp_path: Path
) -> None:
    config = ClusterConfig(
        nodes=3, duration=5.0, p2p_count=50, results_dir=tmp_path / "run"
    )
    res = run_container_cluster(client, config, image=TAG).to_dict()
    assert res["provider"] == "container"
    assert res["acked"] > 0
    assert (res["lost"], res["duplicated"], res["reordered"]) == (0, 0, 0)
    # no faults: every request answered, every checker count 0, replicas too
    assert res["failures"] == 0
    assert res["replicas_checked"]
    assert res["violations"] == {}, res["check"]["examples"]
    assert res["p2p_coverage"] == 1.0
    info = res["containers"]
    assert sorted(info["health"].values()) == ["healthy"] * 3
    assert info["leftovers"] == 0
    assert {row["host"] for row in res["per_node"]} == {"c0", "c1", "c2"}


def test_a_users_lab_on_the_same_engine_survives(
    client: Any, built: containers.BuildResult, user_lab: str
) -> None:
    """Runs last: the builds and every run's clean-up left the other lab alone."""
    assert client.volumes.get(user_lab).attrs["Labels"][containers.OWNER_LABEL]
