"""Invoke namespace ``qemu``: guest images, guests, pushing the wheel, guest tests.

* ``invoke qemu.image --arch=x86_64|aarch64|all [--rebuild]`` builds the cached image.
* ``invoke qemu.up --arch=aarch64`` boots a guest and holds it until Ctrl-C
  (prints an ssh command); ``qemu.push``/``qemu.test``/``qemu.ssh`` use it.
* ``invoke qemu.push --arch=aarch64`` builds the wheel + wheelhouse when stale,
  boots a guest (or uses a running one), pushes and installs them, and shows
  ``python -m plexichat.accel --require-compiled`` from the guest.
* ``invoke qemu.test --arch=aarch64`` does the same, then runs the golden-vector
  tests (tests/golden, tests/vectors) in the guest against the installed wheel.
* ``invoke qemu.boot-bench --arch=x86_64 --runs=5`` measures boot-to-SSH.
* ``invoke qemu.reap [--all]`` kills leftovers of dead lab runs (by recorded PID).
* ``invoke qemu.kvm`` shows (or re-probes) the KVM verdict.
* ``invoke qemu.cluster --nodes=3 [--arch=mixed]`` runs a cluster in guests
  (one per node): load, P2P, checker, per-node/per-arch tables, JSON.
* ``invoke qemu.cluster --runtime=docker --arch=x86_64`` runs the nodes as
  containers in the guests' Docker engines (docker image variant).
* ``invoke qemu.p2p --nodes=3`` runs the P2P relay scenario alone.

Every task runs ``invoke setup``'s checks first.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Literal

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task
from rich.console import Console

from plexilab import options
from plexilab.infra import images, machine, rundir, setup_host, wheels
from plexilab.infra import kvm as kvmlib
from plexilab.infra.artifacts import DIST, ensure_artifacts
from plexilab.infra.sshclient import lab_key
from plexilab.options import (
    ClusterOptions,
    FaultOptions,
    OutputOptions,
    P2POptions,
    QemuOptions,
)
from plexilab.providers.docker_in_guests import DOCKER_IN_GUESTS
from plexilab.providers.qemu import (
    QEMU,
    GuestSpec,
    QemuLab,
    guest,
    push_to,
    run_golden,
)
from plexilab.results import tables
from plexilab.run import faults as faultlib
from plexilab.run import qemu as qemu_cluster
from plexilab.run.config import RUN_GROUPS
from plexilab.run.result import RunResult

console = Console()


def _arches(arch: str) -> tuple[str, ...]:
    if arch == "all":
        return images.ARCHES
    if arch not in images.ARCHES:
        raise Exit(f"unknown arch {arch!r} (x86_64, aarch64 or all)", code=2)
    return (arch,)


def _setup() -> None:
    try:
        setup_host.ensure()
    except setup_host.HostSetupError as exc:
        raise Exit(str(exc), code=1) from None


def _show(title: str, rows: dict[str, Any]) -> None:
    console.print(tables.kv_table(title, rows))


@task(
    help={
        "arch": "x86_64, aarch64 or all (default all)",
        "rebuild": "rebuild the image",
        "prune": "remove cached images/rootfs layers of older recipes",
        "variant": "image variant: docker (adds Debian's docker.io); default plain",
    }
)
def image(
    c: Context,
    arch: str = "all",
    rebuild: bool = False,
    prune: bool = False,
    variant: str = "",
) -> None:
    """Build (or show) the cached guest image."""
    _setup()
    try:
        images.check_variant(variant)
    except ValueError as exc:
        raise Exit(str(exc), code=2) from None
    if prune:
        for path in images.prune():
            console.print(f"removed {path}")
    for a in _arches(arch):
        if rebuild:
            img = images.build_image(a, rebuild=True, variant=variant)
        else:
            img = images.image(a, variant=variant)
        _show(f"image {a}", {"dir": img.directory, **img.manifest})


@task(help={"arch": "x86_64 or aarch64", "out": "output directory (default dist/)"})
def wheel(c: Context, arch: str = "aarch64", out: str = str(DIST)) -> None:
    """Build the plexichat wheel and the runtime wheelhouse for an arch."""
    _setup()
    for a in _arches(arch):
        res = wheels.build(a, Path(out))
        _show(f"wheel {a}", res.as_dict())


@task(
    help={
        "arch": "x86_64 or aarch64",
        "name": "guest name",
        "deps": "attach the deps disk",
    }
)
def up(c: Context, arch: str = "x86_64", name: str = "", deps: bool = True) -> None:
    """Boot a guest and keep it until Ctrl-C (other qemu tasks then use it)."""
    _setup()
    house = ensure_artifacts(arch, progress=console.print)[1] if deps else None
    spec = GuestSpec(name or f"{arch}-up", arch, [], wheelhouse=house)
    with QemuLab([spec]) as lab:
        m = lab.machines[0]
        key = lab_key()[0]
        console.print(
            f"{spec.name} up in {lab.boot_seconds[spec.name]:.1f} s ({m.accel}); ssh:"
        )
        console.print(
            f"  ssh -i {key} -p {m.ssh_port} "
            f"-o UserKnownHostsFile={m.dir / 'known_hosts'} "
            "root@127.0.0.1",
            soft_wrap=True,
        )
        console.print("Ctrl-C powers it off.")
        try:
            while m.running():
                time.sleep(1)
        except (KeyboardInterrupt, SystemExit):
            console.print("powering off")
    console.print(f"{spec.name} exited")


PUSH_HELP = {
    "arch": "x86_64 or aarch64 (or all)",
    "rebuild": "rebuild the wheel",
    "numba": "add numba (and llvmlite) to the wheelhouse",
    "disk": "fresh guests get the deps on a disk (default); --no-disk pushes the "
    "whole wheelhouse over SFTP and installs it in the guest",
}


@task(help={**PUSH_HELP, "json": "write the timings to this file"})
def push(
    c: Context,
    arch: str = "aarch64",
    rebuild: bool = False,
    json: str = "",
    numba: bool = False,
    disk: bool = True,
) -> None:
    """Push the wheel + deps to a guest, install offline, show the accel table."""
    _setup()
    results = {}
    for a in _arches(arch):
        whl, house = ensure_artifacts(
            a, rebuild=rebuild, numba=numba, progress=console.print
        )
        with guest(
            a, deps_disk=house if disk else None, progress=console.print
        ) as host:
            results[a] = push_to(host, whl, house)
        _show(f"push {a}", results[a])
    if json:
        Path(json).write_text(jsonlib_dumps(results))
    if any(r["require_compiled_rc"] != 0 for r in results.values()):
        raise Exit("not every kernel family runs compiled code in the guest", code=1)


@task(help=PUSH_HELP)
def golden(
    c: Context,
    arch: str = "aarch64",
    rebuild: bool = False,
    numba: bool = False,
    disk: bool = True,
) -> None:
    """Run the golden-vector tests inside a guest against the installed wheel."""
    _setup()
    failed = []
    for a in _arches(arch):
        whl, house = ensure_artifacts(
            a, rebuild=rebuild, numba=numba, progress=console.print
        )
        with guest(
            a, deps_disk=house if disk else None, progress=console.print
        ) as host:
            push_to(host, whl, house)
            start = time.monotonic()
            code, output = run_golden(host)
        print(output.rstrip(), flush=True)
        console.print(
            f"golden tests on {a}: exit {code} in {time.monotonic() - start:.1f} s"
        )
        if code != 0:
            failed.append(a)
    if failed:
        raise Exit(f"golden-vector tests failed on {', '.join(failed)}", code=1)


@task(
    help={
        "arch": "x86_64 or aarch64",
        "runs": "boots (default 5)",
        "accel": "auto|tcg|kvm",
    }
)
def boot_bench(
    c: Context, arch: str = "x86_64", runs: int = 5, accel: str = "auto"
) -> None:
    """Median boot-to-SSH (launch to first successful command) over several boots."""
    _setup()
    for a in _arches(arch):
        images.image(a)
        times = []
        for i in range(runs):
            cfg = machine.MachineConfig(arch=a, name=f"{a}-bench{i}", accel=accel)
            with machine.Machine(cfg) as m:
                assert m.times.to_ssh is not None
                times.append(m.times.to_ssh)
                mode = m.accel
            console.print(f"{a} boot {i + 1}: {times[-1]:.2f} s ({mode})")
        _show(
            f"boot-to-SSH {a}",
            {
                "runs": runs,
                "median_s": round(statistics.median(times), 2),
                "min_s": round(min(times), 2),
                "max_s": round(max(times), 2),
            },
        )


@task(help={"arch": "x86_64 or aarch64", "command": "shell command to run"})
def ssh(c: Context, arch: str = "x86_64", command: str = "uname -a") -> None:
    """Run a command in a running guest (``qemu.up``) or a fresh one."""
    _setup()
    with guest(arch, deps_disk=None, progress=console.print) as host:
        res = host.ssh.run(command, timeout=600, check=False)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    if res.returncode:
        raise Exit(code=res.returncode)


@task(help={"all": "also kill guests of live lab processes"})
def reap(c: Context, all: bool = False) -> None:
    """Kill QEMU and relay processes left by dead lab runs (by recorded PID)."""
    killed = rundir.reap(everything=all)
    for line in killed:
        console.print(f"killed {line}")
    console.print(f"reaped {len(killed)} process(es)")


@task(help={"arch": "x86_64 or aarch64", "reprobe": "forget the cached verdict"})
def kvm(c: Context, arch: str = "x86_64", reprobe: bool = False) -> None:
    """Show whether KVM works here (a short bounded probe boot, cached)."""
    _setup()
    if reprobe:
        kvmlib.kvm_cache_path().unlink(missing_ok=True)
    for a in _arches(arch):
        img = images.image(a)
        verdict = kvmlib.choose_accel(a, img.kernel, log=console.print)
        console.print(f"{a}: {verdict}")


def jsonlib_dumps(data: object) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


qemu = Collection("qemu", image, wheel, up, push, boot_bench, ssh, reap, kvm)
qemu.add_task(golden, name="test")


# -- cluster runs in guests (src/plexilab/run/qemu.py) ----------------------------

QEMU_GROUPS = (*RUN_GROUPS, QemuOptions, OutputOptions)


def _cluster_options(chosen: options.Chosen) -> Any:
    values = options.flat(chosen, *RUN_GROUPS, QemuOptions)
    results = chosen[OutputOptions].results
    try:
        return qemu_cluster.QemuClusterOptions(
            **values, results=Path(results) if results else None
        )
    except ValueError as exc:
        raise Exit(str(exc), code=2) from None


def finish_run(result: RunResult, json_path: str, what: str = "qemu") -> None:
    """Print the tables, write the JSON, exit 1 when the run failed."""
    tables.print_results(result, console)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        console.log(f"wrote {json_path}")
    reasons = result.verdict()
    if reasons:
        raise Exit(f"{what} cluster run failed: " + "; ".join(reasons), code=1)


def _run_cluster(options: Any, scenario: Literal["cluster", "p2p"]) -> RunResult:
    try:
        return qemu_cluster.run(options, scenario=scenario, console=console)
    except qemu_cluster.QemuUnavailable as exc:
        raise Exit(f"QEMU cannot run here: {exc}", code=1) from None


@options.task(*QEMU_GROUPS, preset="qemu", check=options.nodes_to_start, name="cluster")
def cluster(c: Context, chosen: options.Chosen) -> None:
    """Run a PlexiChat cluster in QEMU guests (one per node): load, P2P, checker."""
    faults = chosen[FaultOptions]
    caps = DOCKER_IN_GUESTS if chosen[QemuOptions].runtime == "docker" else QEMU
    try:  # "default" is resolved by the provider that runs (QEMU or the fallback)
        if faults.kinds != ["default"]:
            faults.faults = faultlib.parse_kinds(
                faults.kinds, caps.supported_faults(), "qemu"
            )
    except faultlib.FaultError as exc:
        raise Exit(f"--faults: {exc}", code=2) from None
    run_opts = _cluster_options(chosen)
    finish_run(_run_cluster(run_opts, "cluster"), chosen[OutputOptions].json)


@options.task(
    ClusterOptions,
    P2POptions,
    QemuOptions,
    OutputOptions,
    preset="qemu",
    check=options.nodes_to_start,
    name="p2p",
    defaults={"p2p_count": 500},
)
def p2p(c: Context, chosen: options.Chosen) -> None:
    """The P2P relay scenario alone across guests: propagation latency per arch."""
    run_opts = _cluster_options(chosen)
    finish_run(_run_cluster(run_opts, "p2p"), chosen[OutputOptions].json)


qemu.add_task(cluster)
qemu.add_task(p2p)
