"""``invoke inventory.cluster`` / ``inventory.p2p``: what they refuse before any
host is contacted (the real run: test_inventory_cluster.py, with QEMU guests
described as an inventory)."""

from __future__ import annotations

from pathlib import Path

import pytest
from invoke.context import Context
from invoke.exceptions import Exit

from plexilab.cli import inventory as cli


@pytest.mark.parametrize("task", [cli.cluster, cli.p2p])
def test_hosts_is_required_and_must_exist(task, tmp_path: Path) -> None:
    with pytest.raises(Exit, match="--hosts is required") as info:
        task(Context())
    assert info.value.code == 2
    with pytest.raises(Exit, match="no such file") as info:
        task(Context(), hosts=str(tmp_path / "missing.toml"))
    assert info.value.code == 2


def test_unpinned_or_unknown_inventory_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text('[[host]]\nname = "a"\naddress = "127.0.0.1"\narch = "x86_64"\n')
    with pytest.raises(Exit, match="host_key or known_hosts") as info:
        cli.cluster(Context(), hosts=str(path))
    assert info.value.code == 2
    path.write_text(
        '[[host]]\nname = "a"\naddress = "127.0.0.1"\narch = "x86_64"\n'
        'host_key = "ssh-ed25519 AAAA"\ncolour = "red"\n'
    )
    with pytest.raises(Exit, match="unknown inventory keys: colour"):
        cli.p2p(Context(), hosts=str(path))


def test_real_hosts_take_only_signal_faults(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text("")
    with pytest.raises(Exit, match="cannot inject 'partition'") as info:
        cli.cluster(Context(), hosts=str(path), faults="partition")
    assert info.value.code == 2
    with pytest.raises(Exit, match="--backend"):
        cli.cluster(Context(), hosts=str(path), backend="numba")


@pytest.mark.parametrize("name", ["cluster", "p2p"])
def test_every_task_option_has_help(name: str) -> None:
    task = cli.inventory.tasks[name]
    args = {a.name: a for a in task.get_arguments()}
    assert not [n for n, a in args.items() if not a.help]
    assert args["nodes"].kind is int
    assert args["hosts"].default == ""
