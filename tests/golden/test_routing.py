"""Golden vectors of weighted rendezvous routing, checked on every backend.

The vectors (tests/vectors/routing.json) were produced by the reference
router (tests/vectors/generate_routing.py).  This module must not import
hypothesis: it runs inside minimal guests that only have pytest.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from plexichat.routing import _reference as ref

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "routing.json"
V: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
NODES = V["nodes"]
KEYS: list[int] = [entry["key"] for entry in V["keys"]]
REPLICAS = ["1", "2", "3"]
PLANS = V["move_plans"]
EXTREME = V["extreme"]


def test_node_seeds_and_channel_keys() -> None:
    assert [ref.node_seed(i) for i in NODES["ids"]] == NODES["seeds"]
    named = [e for e in V["keys"] if e["name"] is not None]
    assert [ref.key_of(e["name"]) for e in named] == [e["key"] for e in named]


def test_mix64_and_scores() -> None:
    for x, mixed in V["mix64"]:
        assert ref.mix64(x) == mixed
    for key, seed, weight, expected in V["scores"]:
        assert ref.score(key, seed, weight).hex() == expected


@pytest.mark.parametrize("replicas", REPLICAS)
def test_owners_batch(routing_impl: ModuleType, replicas: str) -> None:
    got = routing_impl.owners_batch(
        KEYS, NODES["seeds"], NODES["weights"], int(replicas)
    )
    assert got.tolist() == V["owners"][replicas]


@pytest.mark.parametrize("replicas", REPLICAS)
def test_owners_scalar(routing_impl: ModuleType, replicas: str) -> None:
    seeds, weights = NODES["seeds"], NODES["weights"]
    got = [routing_impl.owners(k, seeds, weights, int(replicas)) for k in KEYS]
    assert got == V["owners"][replicas]


@pytest.mark.parametrize("replicas", REPLICAS)
def test_exact_ties_go_to_the_lower_index(
    routing_impl: ModuleType, replicas: str
) -> None:
    ties = V["ties"]
    keys = KEYS[:40]
    got = routing_impl.owners_batch(keys, ties["seeds"], ties["weights"], int(replicas))
    assert got.tolist() == ties["owners"][replicas]


@pytest.mark.parametrize("case", EXTREME, ids=[c["name"] for c in EXTREME])
@pytest.mark.parametrize("replicas", REPLICAS)
def test_extreme_weights(
    routing_impl: ModuleType, case: dict[str, Any], replicas: str
) -> None:
    seeds, weights = case["seeds"], case["weights"]
    got = routing_impl.owners_batch(KEYS, seeds, weights, int(replicas))
    assert got.tolist() == case["owners"][replicas]
    one = [routing_impl.owners(k, seeds, weights, int(replicas)) for k in KEYS[:20]]
    assert one == case["owners"][replicas][:20]


@pytest.mark.parametrize("plan", PLANS, ids=[p["name"] for p in PLANS])
def test_move_plan(routing_impl: ModuleType, plan: dict[str, Any]) -> None:
    old, new = plan["old"], plan["new"]
    got = routing_impl.move_plan(
        KEYS,
        old["seeds"],
        old["weights"],
        new["seeds"],
        new["weights"],
        plan["replicas"],
    )
    assert got.keys.tolist() == plan["moved"]
    assert got.old_owners.tolist() == plan["old_owners"]
    assert got.new_owners.tolist() == plan["new_owners"]
    assert got.old_owners.shape == (len(plan["moved"]), plan["replicas"])
