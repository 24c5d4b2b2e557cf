"""A cluster run on container hosts of the lab host's engine (one per node)."""

from __future__ import annotations

from collections.abc import Callable

import docker

from plexilab.infra.engine import IMAGE
from plexilab.providers.container import ContainerProvider
from plexilab.run import pipeline
from plexilab.run.config import ClusterConfig
from plexilab.run.result import RunResult


def run_container_cluster(
    client: docker.DockerClient,
    config: ClusterConfig,
    *,
    image: str = IMAGE,
    hosts: int = 0,
    progress: Callable[[str], None] = lambda _msg: None,
) -> RunResult:
    """The chat run on *hosts* container hosts (default: one per node).

    ``containers`` in the result: the run id, each node container's health
    when the cluster converged, and what the label cleanup removed (it runs
    on success, failure and Ctrl-C).
    """
    provider = ContainerProvider(client, image=image, hosts=hosts)
    return pipeline.run(provider, config, progress=progress)
