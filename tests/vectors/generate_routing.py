"""Regenerate tests/vectors/routing.json from the reference router.

Run ``python tests/vectors/generate_routing.py`` from the repository root
(with ``src`` on the path); the output is deterministic.  Only regenerate on
a deliberate change of the routing algorithm, and say so in the commit: every
deployed node must route identically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from plexichat.routing import _reference as ref  # noqa: E402
from plexichat.routing._types import MASK64, MIX_C1, MIX_C2  # noqa: E402

OUT = Path(__file__).with_name("routing.json")

NODES = {
    "node-a": 1.0,
    "node-b": 1.0,
    "node-c": 2.0,
    "node-d": 0.5,
    "node-e": 1.5,
    "node-f": 3.0,
    "node-g": 1.0,
    "node-h": 0.25,
}
CHANNELS = 190


def unshift(y: int, s: int) -> int:
    """Invert ``x ^= x >> s`` on 64 bits."""
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x


def unmix64(y: int) -> int:
    """Invert the splitmix64 finalizer (to build keys with chosen hashes)."""
    y = unshift(y, 31)
    y = (y * pow(MIX_C2, -1, 1 << 64)) & MASK64
    y = unshift(y, 27)
    y = (y * pow(MIX_C1, -1, 1 << 64)) & MASK64
    return unshift(y, 30)


def key_for_hash(h: int, seed: int) -> int:
    """A key whose hash against *seed* is exactly *h*."""
    return unmix64(h) ^ seed


def nodes_json(nodes: dict[str, float]) -> dict[str, list[Any]]:
    ids = list(nodes)
    return {
        "ids": ids,
        "seeds": [ref.node_seed(i) for i in ids],
        "weights": [nodes[i] for i in ids],
    }


def owners_json(keys: list[int], seeds: list[int], weights: list[float]) -> Any:
    return {
        str(r): [ref.owners(k, seeds, weights, r) for k in keys] for r in range(1, 4)
    }


def plan_json(
    name: str,
    keys: list[int],
    old: dict[str, float],
    new: dict[str, float],
    replicas: int,
) -> dict[str, Any]:
    o, n = nodes_json(old), nodes_json(new)
    plan = ref.move_plan(
        keys, o["seeds"], o["weights"], n["seeds"], n["weights"], replicas
    )
    return {
        "name": name,
        "old": o,
        "new": n,
        "replicas": replicas,
        "moved": plan.keys.tolist(),
        "old_owners": plan.old_owners.tolist(),
        "new_owners": plan.new_owners.tolist(),
    }


def main() -> None:
    main_nodes = nodes_json(NODES)
    seeds, weights = main_nodes["seeds"], main_nodes["weights"]
    named = [(f"channel-{i}", ref.key_of(f"channel-{i}")) for i in range(CHANNELS)]
    named += [("général", ref.key_of("général")), ("", ref.key_of(""))]
    edge = [
        0,
        1,
        1 << 63,
        MASK64,
        key_for_hash(MASK64, seeds[3]),  # u rounds to 1.0, clamped: node-d wins
        key_for_hash((1 << 11) - 1, seeds[5]),  # smallest u for node-f
        key_for_hash(((1 << 53) - 1) << 11, seeds[7]),  # clamped u for node-h
        key_for_hash(1 << 63, seeds[0]),  # u = 1/2 exactly for node-a
    ]
    keys = [k for _, k in named] + edge
    score_keys = keys[:4] + edge
    ties = {"seeds": [seeds[0], seeds[0], seeds[1], seeds[0]], "weights": [1.0] * 4}
    big = 1.7976931348623157e308
    extreme = {  # outside the bounds shortcut: scores overflow or underflow
        "mixed": [5e-324, 1e-300, 1.0, 1e300, big],
        "huge": [big, 1e308, big, 1e307, 4e307],  # ties at +inf
        "tiny": [5e-324, 1e-323, 5e-324, 2.5e-323, 1e-310],  # ties at 0.0
    }
    vectors = {
        "about": (
            "Weighted rendezvous routing vectors from plexichat.routing._reference;"
            " owners are node indices best first, move plans hold node seeds."
        ),
        "mix64": [[x, ref.mix64(x)] for x in (0, 1, 0x9E3779B97F4A7C15, MASK64)],
        "nodes": main_nodes,
        "keys": [{"name": name, "key": k} for name, k in named]
        + [{"name": None, "key": k} for k in edge],
        "owners": owners_json(keys, seeds, weights),
        "scores": [
            [k, s, w, ref.score(k, s, w).hex()]
            for k in score_keys
            for s, w in zip(seeds, weights, strict=True)
        ],
        "ties": {**ties, "owners": owners_json(keys[:40], **ties)},
        "extreme": [
            {
                "name": name,
                "seeds": seeds[:5],
                "weights": w,
                "owners": owners_json(keys, seeds[:5], w),
            }
            for name, w in extreme.items()
        ],
        "move_plans": [
            plan_json("join", keys, NODES, {**NODES, "node-i": 1.0}, 2),
            plan_json(
                "leave",
                keys,
                NODES,
                {k: v for k, v in NODES.items() if k != "node-c"},
                2,
            ),
            plan_json("reweight", keys, NODES, {**NODES, "node-a": 4.0}, 3),
            plan_json(
                "replace",
                keys,
                NODES,
                {**{k: v for k, v in NODES.items() if k != "node-h"}, "node-z": 0.25},
                1,
            ),
        ],
    }
    OUT.write_text(json.dumps(vectors, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({len(keys)} keys)")


if __name__ == "__main__":
    main()
