"""A cluster run on container hosts of the lab host's engine (one per node)."""

from __future__ import annotations

from typing import Any

import docker

from plexilab.infra.engine import IMAGE, cleaned, leftovers, new_run_id
from plexilab.providers.container import (
    ContainerHost,
    ContainerProcess,
    wait_healthy,
)
from plexilab.run.cluster import Cluster, run_cluster


def run_container_cluster(
    client: docker.DockerClient,
    config: Any,
    *,
    image: str = IMAGE,
    hosts: int = 0,
    progress: Any = lambda _msg: None,
) -> dict[str, Any]:
    """``run_cluster`` on *hosts* container hosts (one per node).

    Adds ``containers`` to the results: the run id, each node container's
    health when the cluster converged, and what the label cleanup removed
    (it runs on success, failure and Ctrl-C).
    """
    run_id = new_run_id()
    count = hosts or config.nodes
    health: dict[str, str] = {}
    made: list[ContainerHost] = []

    def on_step(name: str, cluster: Cluster) -> None:
        if name == "converged":
            procs = [n.process for n in cluster.nodes]
            health.update(
                wait_healthy([p for p in procs if isinstance(p, ContainerProcess)])
            )

    with cleaned(client, run_id) as removed:
        try:
            for i in range(count):
                made.append(ContainerHost(client, f"c{i}", run_id, image=image))
            progress(f"run {run_id}: {count} container hosts of {image}")
            results = run_cluster(made, config, progress=progress, on_step=on_step)
        finally:
            for host in made:
                host.close()
    results["containers"] = {
        "run_id": run_id,
        "image": image,
        "health": health,
        "removed": removed,
        "leftovers": leftovers(client, run_id),
    }
    return results
