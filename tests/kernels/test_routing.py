"""Routing kernels: every backend against the reference, plus the Ring wrapper."""

from __future__ import annotations

import importlib
import math
import sys
from collections import Counter
from collections.abc import Callable
from functools import cache
from types import ModuleType

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plexichat import accel
from plexichat.routing import Move, MovePlan, Ring, key_of, node_seed
from plexichat.routing import _reference as ref
from plexichat.routing._types import MASK64, MIX_C1, MIX_C2, U_MAX

U64 = st.integers(0, MASK64)
NORMAL_WEIGHTS = st.floats(0.01, 100.0)
ANY_WEIGHTS = st.floats(
    min_value=5e-324, max_value=1.7976931348623157e308, allow_subnormal=True
)
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# -- helpers -----------------------------------------------------------------


def unshift(y: int, s: int) -> int:
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x


def unmix64(y: int) -> int:
    """Inverse of the splitmix64 finalizer, to build keys with chosen hashes."""
    y = unshift(y, 31)
    y = (y * pow(MIX_C2, -1, 1 << 64)) & MASK64
    y = unshift(y, 27)
    y = (y * pow(MIX_C1, -1, 1 << 64)) & MASK64
    return unshift(y, 30)


def seeds_of(n: int) -> list[int]:
    return [node_seed(f"node-{i}") for i in range(n)]


@st.composite
def node_lists(draw: st.DrawFn, max_nodes: int = 24) -> tuple[list[int], list[float]]:
    n = draw(st.integers(1, max_nodes))
    weights = draw(
        st.one_of(
            st.lists(NORMAL_WEIGHTS, min_size=n, max_size=n),
            st.lists(ANY_WEIGHTS, min_size=n, max_size=n),
            st.lists(st.sampled_from([1.0, 2.0]), min_size=n, max_size=n),
        )
    )
    seeds = draw(
        st.one_of(
            st.lists(U64, min_size=n, max_size=n),
            st.lists(st.sampled_from([0, 7, MASK64]), min_size=n, max_size=n),
        )
    )
    return seeds, weights


def owner_sets(rows: np.ndarray) -> list[frozenset[int]]:
    return [frozenset(row) for row in rows.tolist()]


# -- the reference itself --------------------------------------------------------


def test_mix64_is_the_splitmix64_finalizer() -> None:
    # The first outputs of splitmix64 seeded with 0 (its published sequence).
    golden = 0x9E3779B97F4A7C15
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert [ref.mix64(golden * i & MASK64) for i in (1, 2, 3)] == expected


@given(U64)
def test_unmix64_inverts_mix64(x: int) -> None:
    assert unmix64(ref.mix64(x)) == x


def test_keys_and_seeds_are_xxh3_of_utf8() -> None:
    for name in ["", "general", "général", "チャンネル", "x" * 300]:
        expected = xxhash.xxh3_64(name.encode("utf-8")).intdigest()
        assert key_of(name) == expected
        assert node_seed(name) == expected


def test_unit_is_strictly_inside_zero_one() -> None:
    assert ref.unit(0) == 2.0**-54
    assert ref.unit((1 << 11) - 1) == 2.0**-54
    assert ref.unit(1 << 63) == 0.5
    top = ((1 << 53) - 1) << 11
    assert ((top >> 11) + 0.5) * 2.0**-53 == 1.0  # the rounding that is clamped
    assert ref.unit(top) == U_MAX < 1.0
    assert ref.unit(MASK64) == U_MAX
    # below the rounding region, the mapping is exact
    assert ref.unit(12345 << 11) == (12345 + 0.5) / 2.0**53


@given(U64, U64, NORMAL_WEIGHTS)
def test_score_formula(key: int, seed: int, weight: float) -> None:
    u = ref.unit(ref.mix64(key ^ seed))
    assert ref.score(key, seed, weight) == weight / -math.log(u)
    assert 0.0 < ref.score(key, seed, weight) < math.inf


def test_clamped_hash_wins_with_a_finite_score(routing_impl: ModuleType) -> None:
    seeds = seeds_of(12)
    weights = [1.0] * 12
    for target in (0, 5, 11):
        key = unmix64(MASK64) ^ seeds[target]
        assert ref.mix64(key ^ seeds[target]) == MASK64
        best = ref.score(key, seeds[target], 1.0)
        assert math.isfinite(best)
        assert best > 1e15
        got = routing_impl.owners(key, seeds, weights, 3)
        assert got[0] == target
        assert got == ref.owners(key, seeds, weights, 3)
        assert routing_impl.owners_batch([key], seeds, weights, 3).tolist() == [got]


def test_smallest_hash_loses(routing_impl: ModuleType) -> None:
    seeds = seeds_of(5)
    key = unmix64(0) ^ seeds[2]
    got = routing_impl.owners(key, seeds, [1.0] * 5, 5)
    assert got[-1] == 2
    assert got == ref.owners(key, seeds, [1.0] * 5, 5)


# -- every backend against the reference ------------------------------------


@PROPERTY
@given(nodes=node_lists(), keys=st.lists(U64, max_size=30), data=st.data())
def test_batch_equals_scalar_equals_reference(
    routing_impl: ModuleType,
    nodes: tuple[list[int], list[float]],
    keys: list[int],
    data: st.DataObject,
) -> None:
    seeds, weights = nodes
    replicas = data.draw(st.integers(1, len(seeds)), label="replicas")
    expected = ref.owners_batch(keys, seeds, weights, replicas)
    got = routing_impl.owners_batch(keys, seeds, weights, replicas)
    assert got.dtype == np.int64
    assert got.shape == (len(keys), replicas)
    assert got.tolist() == expected.tolist()
    for key, row in zip(keys, expected.tolist(), strict=True):
        assert routing_impl.owners(key, seeds, weights, replicas) == row


@settings(max_examples=15, deadline=None)
@given(nodes=node_lists(max_nodes=90), keys=st.lists(U64, min_size=1, max_size=8))
def test_many_nodes_and_replicas(
    nodes: tuple[list[int], list[float]], keys: list[int]
) -> None:
    # more than 64 nodes (wider index tags) and R > 4 (the generic network)
    seeds, weights = nodes
    impls = [accel.load_backend("routing", b) for b in accel.available("routing")]
    for replicas in sorted({1, min(5, len(seeds)), len(seeds) // 2 or 1, len(seeds)}):
        expected = ref.owners_batch(keys, seeds, weights, replicas).tolist()
        for impl in impls:
            assert (
                impl.owners_batch(keys, seeds, weights, replicas).tolist() == expected
            )


@cache
def reference_owners(n_nodes: int, replicas: int, weights_kind: str) -> np.ndarray:
    keys, seeds, weights = big_case(n_nodes, weights_kind)
    return ref.owners_batch(keys, seeds, weights, replicas)


def big_case(
    n_nodes: int, weights_kind: str
) -> tuple[np.ndarray, list[int], list[float]]:
    rng = np.random.default_rng(n_nodes)
    keys = rng.integers(0, MASK64, size=6000, dtype=np.uint64, endpoint=True)
    weights = {
        "equal": [1.0] * n_nodes,
        "spread": rng.uniform(0.2, 5.0, n_nodes).tolist(),
        "wide": (10.0 ** rng.uniform(-6, 6, n_nodes)).tolist(),
    }[weights_kind]
    return keys, seeds_of(n_nodes), weights


@pytest.mark.parametrize("weights_kind", ["equal", "spread", "wide"])
@pytest.mark.parametrize(("n_nodes", "replicas"), [(16, 1), (16, 2), (16, 3), (5, 4)])
def test_many_keys_match_reference(
    routing_impl: ModuleType, n_nodes: int, replicas: int, weights_kind: str
) -> None:
    keys, seeds, weights = big_case(n_nodes, weights_kind)
    got = routing_impl.owners_batch(keys, seeds, weights, replicas)
    np.testing.assert_array_equal(
        got, reference_owners(n_nodes, replicas, weights_kind)
    )


def test_array_inputs(routing_impl: ModuleType) -> None:
    keys = np.arange(40, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    seeds = np.array(seeds_of(6), dtype=np.uint64)
    weights = np.linspace(0.5, 3.0, 6)
    expected = ref.owners_batch(keys, seeds, weights, 2)
    for arr in (keys, seeds, weights):
        arr.flags.writeable = False  # read-only buffers are fine
    assert routing_impl.owners_batch(keys, seeds, weights, 2).tolist() == (
        expected.tolist()
    )
    strided = routing_impl.owners_batch(keys[::3], seeds, weights, 2)
    assert strided.tolist() == expected[::3].tolist()
    as_lists = routing_impl.owners_batch(
        keys.tolist(), seeds.tolist(), [1, 2, 3] * 2, 1
    )
    assert as_lists.tolist() == ref.owners_batch(keys, seeds, [1, 2, 3] * 2, 1).tolist()
    empty = routing_impl.owners_batch([], seeds, weights, 3)
    assert empty.shape == (0, 3)
    assert empty.dtype == np.int64
    scalar = routing_impl.owners(np.uint64(keys[5]), seeds.tolist(), weights, 2)
    assert scalar == expected[5].tolist()


def test_distribution_follows_weights(routing_impl: ModuleType) -> None:
    weights = [1.0, 2.0, 3.0, 4.0, 0.5, 5.5]
    seeds = seeds_of(len(weights))
    keys = np.random.default_rng(7).integers(0, MASK64, 200_000, dtype=np.uint64)
    owners = routing_impl.owners_batch(keys, seeds, weights, 1)[:, 0]
    share = np.bincount(owners, minlength=len(weights)) / len(keys)
    expected = np.array(weights) / sum(weights)
    # the standard error of each share is below 0.0011: 0.006 is > 5 sigma
    assert np.abs(share - expected).max() < 0.006


# -- move plans -------------------------------------------------------------


@st.composite
def ring_changes(
    draw: st.DrawFn,
) -> tuple[list[int], list[float], list[int], list[float], str]:
    n = draw(st.integers(2, 12))
    seeds = draw(st.lists(U64, min_size=n, max_size=n, unique=True))
    weights = draw(st.lists(NORMAL_WEIGHTS, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["join", "leave", "reweight"]))
    new_seeds, new_weights = list(seeds), list(weights)
    if kind == "join":
        extra = draw(U64.filter(lambda s: s not in seeds))
        at = draw(st.integers(0, n))
        new_seeds.insert(at, extra)
        new_weights.insert(at, draw(NORMAL_WEIGHTS))
    elif kind == "leave":
        at = draw(st.integers(0, n - 1))
        del new_seeds[at], new_weights[at]
    else:
        at = draw(st.integers(0, n - 1))
        new_weights[at] = draw(NORMAL_WEIGHTS)
    return seeds, weights, new_seeds, new_weights, kind


@PROPERTY
@given(change=ring_changes(), keys=st.lists(U64, max_size=60), data=st.data())
def test_only_keys_that_must_move_move(
    routing_impl: ModuleType,
    change: tuple[list[int], list[float], list[int], list[float], str],
    keys: list[int],
    data: st.DataObject,
) -> None:
    seeds, weights, new_seeds, new_weights, kind = change
    replicas = data.draw(st.integers(1, min(len(seeds), len(new_seeds))))
    plan = routing_impl.move_plan(
        keys, seeds, weights, new_seeds, new_weights, replicas
    )
    assert isinstance(plan, MovePlan)
    expected = ref.move_plan(keys, seeds, weights, new_seeds, new_weights, replicas)
    for got, want in zip(plan, expected, strict=True):
        assert got.dtype == np.uint64
        assert got.tolist() == want.tolist()
    # the plan holds exactly the keys whose owner set changed
    old = np.array(seeds, dtype=np.uint64)[
        ref.owners_batch(keys, seeds, weights, replicas)
    ]
    new = np.array(new_seeds, dtype=np.uint64)[
        ref.owners_batch(keys, new_seeds, new_weights, replicas)
    ]
    changed = [
        k
        for k, a, b in zip(keys, owner_sets(old), owner_sets(new), strict=True)
        if a != b
    ]
    assert plan.keys.tolist() == changed
    assert plan.old_owners.shape == plan.new_owners.shape == (len(changed), replicas)
    if kind == "join":
        (joined,) = set(new_seeds) - set(seeds)
        assert all(joined in row for row in plan.new_owners.tolist())
        assert not any(joined in row for row in plan.old_owners.tolist())
    elif kind == "leave":
        (left,) = set(seeds) - set(new_seeds)
        assert all(left in row for row in plan.old_owners.tolist())
        assert not any(left in row for row in plan.new_owners.tolist())


def test_join_moves_about_its_share(routing_impl: ModuleType) -> None:
    seeds = seeds_of(17)
    keys = np.random.default_rng(3).integers(0, MASK64, 50_000, dtype=np.uint64)
    plan = routing_impl.move_plan(keys, seeds[:16], [1.0] * 16, seeds, [1.0] * 17, 1)
    # a 17th equal node takes 1/17 of the keys, and only those move
    assert abs(len(plan.keys) / len(keys) - 1 / 17) < 0.006
    assert set(plan.new_owners[:, 0].tolist()) == {seeds[16]}


# -- errors ------------------------------------------------------------------

SEEDS = [1, 2, 3]
WEIGHTS = [1.0, 1.0, 1.0]
BAD_CALLS = {
    "no-nodes": ([], [], 1),
    "length-mismatch": ([1, 2], [1.0], 1),
    "zero-weight": (SEEDS, [1.0, 0.0, 1.0], 1),
    "negative-weight": (SEEDS, [1.0, -2.0, 1.0], 1),
    "nan-weight": (SEEDS, [1.0, math.nan, 1.0], 1),
    "inf-weight": (SEEDS, [math.inf, 1.0, 1.0], 1),
    "zero-replicas": (SEEDS, WEIGHTS, 0),
    "too-many-replicas": (SEEDS, WEIGHTS, 4),
}


def message(call: Callable[[], object]) -> str:
    with pytest.raises(ValueError) as info:  # noqa: PT011 (callers compare it)
        call()
    return str(info.value)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_raise_value_error(routing_impl: ModuleType, case: str) -> None:
    seeds, weights, replicas = BAD_CALLS[case]
    want = message(lambda: ref.owners(5, seeds, weights, replicas))
    assert message(lambda: routing_impl.owners(5, seeds, weights, replicas)) == want
    want = message(lambda: ref.owners_batch([5], seeds, weights, replicas))
    assert message(
        lambda: routing_impl.owners_batch([5], seeds, weights, replicas)
    ) == (want)
    plan_args = ([5], seeds, weights, SEEDS, WEIGHTS, replicas)
    want = message(lambda: ref.move_plan(*plan_args))
    assert message(lambda: routing_impl.move_plan(*plan_args)) == want


def test_messages_name_the_problem() -> None:
    assert "replicas=4 exceeds the number of nodes (3)" in message(
        lambda: ref.owners(5, SEEDS, WEIGHTS, 4)
    )
    assert "no nodes" in message(lambda: ref.owners_batch([1], [], [], 1))
    assert "positive and finite" in message(lambda: ref.owners(1, [1], [0.0], 1))


@pytest.mark.parametrize("key", [-1, 1 << 64])
def test_key_out_of_range(routing_impl: ModuleType, key: int) -> None:
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        routing_impl.owners(key, SEEDS, WEIGHTS, 1)


@pytest.mark.parametrize("seed", [-1, 1 << 64])
def test_seed_out_of_range(routing_impl: ModuleType, seed: int) -> None:
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        routing_impl.owners(1, [1, seed], [1.0, 1.0], 1)


def test_non_integer_key_or_replicas(routing_impl: ModuleType) -> None:
    with pytest.raises(TypeError):
        routing_impl.owners(1.5, SEEDS, WEIGHTS, 1)
    with pytest.raises(TypeError):
        routing_impl.owners(1, SEEDS, WEIGHTS, 1.0)
    with pytest.raises(TypeError):
        routing_impl.owners_batch([1], SEEDS, WEIGHTS, 1.0)


def test_keys_must_be_one_dimensional(routing_impl: ModuleType) -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        routing_impl.owners_batch([[1, 2]], SEEDS, WEIGHTS, 1)
    with pytest.raises(ValueError, match="one-dimensional"):
        routing_impl.owners_batch([1], [SEEDS], WEIGHTS, 1)


def test_numba_backend_needs_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numba", None)  # "import numba" now fails
    monkeypatch.delitem(sys.modules, "plexichat.routing._numba", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("plexichat.routing._numba")
    monkeypatch.delitem(sys.modules, "plexichat.routing._numba", raising=False)


# -- Ring ----------------------------------------------------------------------

NODES = {"alpha": 1.0, "bravo": 2.0, "charlie": 0.5, "delta": 1.5}


def test_ring_routes_by_name_through_the_kernel() -> None:
    ring = Ring(NODES)
    assert ring.node_ids == ("alpha", "bravo", "charlie", "delta")
    assert len(ring) == 4
    assert "bravo" in ring
    assert "echo" not in ring
    seeds = [node_seed(i) for i in ring.node_ids]
    weights = [NODES[i] for i in ring.node_ids]
    for name in ["general", "random", "général"]:
        indices = ref.owners(key_of(name), seeds, weights, 3)
        assert ring.owners(name, 3) == [ring.node_ids[i] for i in indices]
        assert ring.owners(key_of(name), 3) == ring.owners(name, 3)
    assert ring.owners("general") == ring.owners("general", 3)[:1]
    keys = [key_of(f"c{i}") for i in range(50)]
    assert (
        ring.owners_batch(keys, 2).tolist()
        == ref.owners_batch(keys, seeds, weights, 2).tolist()
    )
    by_name = ring.owners_batch([f"c{i}" for i in range(50)], 2)
    assert by_name.tolist() == ring.owners_batch(np.array(keys, np.uint64), 2).tolist()


def test_ring_does_not_depend_on_insertion_order() -> None:
    forward = Ring(NODES)
    backward = Ring(dict(reversed(list(NODES.items()))))
    assert forward == backward
    assert hash(forward) == hash(backward)
    assert [forward.owners(i, 2) for i in range(100)] == [
        backward.owners(i, 2) for i in range(100)
    ]


def test_ring_membership_changes() -> None:
    ring = Ring(NODES)
    bigger = ring.with_node("echo", 2.0)
    assert bigger.node_ids[-1] == "echo"
    assert bigger.weight("echo") == 2.0
    assert ring.node_ids == tuple(NODES)  # rings are immutable
    assert bigger.without_node("echo") == ring
    assert ring.with_node("alpha", 3.0).as_dict() == {**NODES, "alpha": 3.0}
    with pytest.raises(KeyError):
        ring.without_node("zulu")
    assert "Ring(" in repr(ring)


def test_ring_moves() -> None:
    ring = Ring(NODES)
    bigger = ring.with_node("echo", 2.0)
    keys = [key_of(f"chan-{i}") for i in range(500)]
    moves = ring.moves(bigger, keys, 2)
    assert moves
    assert all(isinstance(m, Move) for m in moves)
    expected = [
        Move(k, tuple(ring.owners(k, 2)), tuple(bigger.owners(k, 2)))
        for k in keys
        if set(ring.owners(k, 2)) != set(bigger.owners(k, 2))
    ]
    assert moves == expected
    assert all("echo" in m.new and "echo" not in m.old for m in moves)
    back = bigger.moves(ring, keys, 2)
    assert [(m.key, m.old, m.new) for m in back] == [
        (m.key, m.new, m.old) for m in moves
    ]
    assert ring.moves(ring, keys, 2) == []
    by_name = ring.moves(bigger, [f"chan-{i}" for i in range(500)], 2)
    assert by_name == moves


def test_ring_shares_follow_weights() -> None:
    ring = Ring(NODES)
    keys = np.random.default_rng(11).integers(0, MASK64, 40_000, dtype=np.uint64)
    counts = Counter(ring.owners_batch(keys, 1)[:, 0].tolist())
    total = sum(NODES.values())
    for i, node_id in enumerate(ring.node_ids):
        assert abs(counts[i] / len(keys) - NODES[node_id] / total) < 0.015


def test_ring_errors() -> None:
    empty = Ring({})
    assert len(empty) == 0
    assert empty.node_ids == ()
    with pytest.raises(ValueError, match="no nodes"):
        empty.owners("general", 1)
    with pytest.raises(ValueError, match="exceeds"):
        Ring(NODES).owners("general", 5)
    for weight in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="alpha"):
            Ring({"alpha": weight})
    with pytest.raises(TypeError):
        Ring({1: 1.0})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        Ring(NODES).owners(-5, 1)
