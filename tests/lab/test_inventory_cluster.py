"""The cluster deploy + run path through the SSH inventory provider.

Two guests (x86_64, aarch64) are booted and then described in a ``hosts.toml``
as if they were real machines (SSH port, pinned host key, node ports the lab
reaches, peer addresses the other guest reaches); the hosts loaded from that
file get the wheel pushed and installed and run a short cluster with the same
code as ``invoke qemu.cluster``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from plexilab.infra.depsdisk import DEPS_MOUNT
from plexilab.infra.machine import link_address
from plexilab.infra.sshclient import lab_key
from plexilab.providers.guests import leftover_pids
from plexilab.providers.inventory import (
    InventoryEntry,
    InventoryProvider,
    entries_toml,
    load_inventory,
)
from plexilab.providers.qemu import GuestSpec, QemuHost, QemuLab
from plexilab.run import pipeline
from plexilab.run.config import ClusterConfig

pytestmark = [pytest.mark.qemu]
if importlib.util.find_spec("pytest_timeout") is not None:
    pytestmark.append(pytest.mark.timeout(1800))

ARCHES = ("x86_64", "aarch64")
PORT_BASE = 7100


def describe(host: QemuHost) -> InventoryEntry:
    """An inventory entry for a booted guest, as an operator would write it."""
    m = host.machine
    return InventoryEntry(
        name=f"inv-{host.arch}",
        address="127.0.0.1",
        port=m.ssh_port,
        arch=host.arch,
        key=str(lab_key()[0]),
        host_key=m.host_key.public_line,
        port_base=PORT_BASE,
        peer_address=link_address(host.slot),  # how the other guest reaches it
        deps=DEPS_MOUNT,
        nodes=list(host.nodes),
        lab_ports={PORT_BASE + i: m.forwards[PORT_BASE + i] for i in host.nodes},
    )


def test_inventory_hosts_run_the_cluster(tmp_path: Path, skips) -> None:
    from plexilab.infra import images, setup_host
    from plexilab.infra.artifacts import ensure_artifacts

    skips.setup("QEMU host set-up", setup_host.ensure)
    artifacts = {a: ensure_artifacts(a) for a in ARCHES}
    images.images_for(ARCHES)
    prefix = f"inv{os.getpid() % 100000}-"
    specs = [
        GuestSpec(f"{prefix}{i}", arch, [i], wheelhouse=artifacts[arch][1])
        for i, arch in enumerate(ARCHES)
    ]
    lab = QemuLab(specs, port_base=PORT_BASE, log_dir=tmp_path / "guests")
    with lab:
        pids = [m.pid for m in lab.machines]
        entries = [describe(h) for h in lab.hosts]
        path = tmp_path / "hosts.toml"
        path.write_text(entries_toml(entries))
        assert load_inventory(path) == entries
        # the provider of `invoke inventory.cluster`: it connects (reaping
        # dead labs' nodes), installs the pushed wheels, closes the hosts
        provider = InventoryProvider(path, artifacts=artifacts)
        config = ClusterConfig(
            nodes=2,
            duration=4.0,
            clients=4,
            inflight=32,
            p2p_count=40,
            ping_timeout=2.0,  # TCG guests (as qemu.cluster)
            suspect_timeout=10.0,
            converge_timeout=120.0,
            install="wheel",
            results_dir=tmp_path / "run",
        )
        res = pipeline.run(provider, config).to_dict()
        assert provider.hosts == []  # closed
    assert [n["host"] for n in res["per_node"]] == ["inv-x86_64", "inv-aarch64"]
    assert [n["arch"] for n in res["per_node"]] == list(ARCHES)
    assert [n["lab"] for n in res["per_node"]] == [
        f"127.0.0.1:{e.lab_ports[PORT_BASE + i]}" for i, e in enumerate(entries)
    ]
    assert res["acked"] > 0
    assert (res["lost"], res["duplicated"], res["reordered"]) == (0, 0, 0)
    # no faults: every request answered, every checker count 0, replicas too
    assert res["failures"] == 0
    assert res["replicas_checked"]
    assert res["violations"] == {}, res["check"]["examples"]
    assert res["p2p_coverage"] == 1.0
    assert set(res["host_backends"]) == {"inv-x86_64", "inv-aarch64"}
    assert all(n["install_s"] > 0 for n in res["per_node"])
    assert set(res["latency_by_arch"]) == set(ARCHES)
    assert res["provider"] == "inventory"
    assert leftover_pids(pids) == []
    ps = subprocess.run(
        ["pgrep", "-a", "-f", "qemu-system-"], capture_output=True, text=True
    ).stdout
    assert f"-name {prefix}" not in ps
