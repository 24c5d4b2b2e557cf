"""Invoke namespace ``docker``: the PlexiChat image and a cluster of containers.

* ``invoke docker.base`` makes the local base images (mmdebstrap | docker
  import; cached by recipe hash).
* ``invoke docker.build`` builds ``Dockerfile`` offline and prints time, size
  and cache hits (``--twice`` builds again to show the layer cache).
* ``invoke docker.cluster --nodes=3 --duration=30 --json PATH`` runs the same
  load, P2P scenario and checker as ``local.cluster`` against node containers
  on host networking (127.0.0.1 ports), then removes every labelled
  container and volume.  Exits 1 on any checker violation.
* ``invoke docker.clean`` removes whatever a run left behind (by label);
  ``invoke docker.engine`` starts (or ``--stop``\\s) the engine.

The engine is started (and docker.io installed) when needed.
"""

from __future__ import annotations

import json as jsonlib
import logging
from pathlib import Path
from typing import Any

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task
from rich.console import Console

from plexilab import options
from plexilab.infra import engine as containers
from plexilab.options import ClusterOptions, LoadOptions, OutputOptions
from plexilab.results.tables import build_table, results_table
from plexilab.run.config import ClusterConfig
from plexilab.run.container import run_container_cluster

console = Console()


def _client() -> Any:
    try:
        return containers.ensure_engine()
    except (containers.ContainerError, PermissionError, RuntimeError) as exc:
        raise Exit(f"no Docker engine: {exc}", code=1) from None


def _write(path: str, doc: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(jsonlib.dumps(doc, indent=2) + "\n")
        console.log(f"wrote {path}")


@task(help={"rebuild": "make the base images again even if the recipe is unchanged"})
def base(c: Context, rebuild: bool = False) -> None:
    """Make the local Debian base images (mmdebstrap | docker import)."""
    client = _client()
    for kind in ("base", "build"):
        res = containers.ensure_base(client, kind, rebuild=rebuild)
        state = f"built in {res.seconds:.1f} s" if res.built else "cached"
        console.print(f"{res.tag}: {res.size / 1e6:.0f} MB, {state} (recipe {res.key})")


@task(
    help={
        "nocache": "ignore the layer cache",
        "twice": "build a second time right after (shows the layer cache)",
        "json": "write timings, size and cache hits as JSON to this path",
        "verbose": "print the build output",
        "worktree": "build the working tree (with uncommitted edits) instead of "
        "the committed HEAD",
    }
)
def build(
    c: Context,
    nocache: bool = False,
    twice: bool = False,
    json: str = "",
    verbose: bool = False,
    worktree: bool = False,
) -> None:
    """Build the PlexiChat image offline; report time, size and cache hits."""
    client = _client()
    source = "worktree" if worktree else "head"
    runs = [
        containers.build_image(client, nocache=nocache, progress=verbose, source=source)
    ]
    if twice:
        runs.append(containers.build_image(client, progress=verbose, source=source))
    console.print(build_table(runs, containers.IMAGE))
    _write(json, {"builds": [r.as_dict() for r in runs]})


@options.task(
    ClusterOptions,
    LoadOptions,
    OutputOptions,
    preset="docker",
    check=options.nodes_to_start,
    name="cluster",
    extra={
        "rebuild": (False, "build the image even when one exists"),
        "worktree": (False, "with --rebuild: build the working tree, not HEAD"),
    },
)
def cluster(c: Context, chosen: options.Chosen) -> None:
    """Run a PlexiChat cluster of node containers under load; check nothing was lost."""
    logging.basicConfig(level=logging.WARNING)
    client = _client()
    build_doc = None
    if chosen.extra["rebuild"] or not containers.image_ready(client):
        source = "worktree" if chosen.extra["worktree"] else "head"
        built = containers.build_image(client, source=source)
        console.print(build_table([built], containers.IMAGE))
        build_doc = built.as_dict()
    config = ClusterConfig.from_chosen(chosen)
    res = run_container_cluster(
        client, config, progress=lambda msg: console.log(f"[cyan]{msg}")
    )
    res.build = build_doc
    console.print(results_table(res, f"PlexiChat cluster: {config.nodes} containers"))
    info = res.containers or {}
    console.print(
        f"health: {info.get('health')}\nremoved by label: {info.get('removed')}, "
        f"left over: {info.get('leftovers')}"
    )
    _write(chosen[OutputOptions].json, res.to_dict())
    reasons = res.verdict()
    if reasons:
        raise Exit("the run failed: " + "; ".join(reasons), code=1)


@task(
    help={
        "images": "also remove the plexichat image (bases stay)",
        "prune": "also prune dangling images: old builds' layers, including the "
        "builder-stage cache (the next build compiles again)",
    }
)
def clean(c: Context, images: bool = False, prune: bool = False) -> None:
    """Remove every container, network and volume the lab labelled."""
    client = _client()
    console.print(f"removed: {containers.cleanup(client)}")
    if images and containers.image_ready(client):
        client.images.remove(containers.IMAGE, force=True)
        console.print(f"removed {containers.IMAGE}")
    if prune:
        pruned = client.images.prune(filters={"dangling": True})
        freed = (pruned.get("SpaceReclaimed") or 0) / 1e6
        console.print(f"pruned dangling images: {freed:.0f} MB")


@task(help={"stop": "stop the dockerd this lab started"})
def engine(c: Context, stop: bool = False) -> None:
    """Start the Docker engine when it is not running (or --stop it)."""
    if stop:
        console.print("stopped" if containers.stop_engine() else "no lab dockerd")
        return
    client = _client()
    version = client.version()
    console.print(f"engine {version['Version']} (API {version['ApiVersion']}) ready")


docker = Collection("docker", base, build, cluster, clean, engine)
