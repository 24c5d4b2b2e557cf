"""LRU cache: behaviour of every backend, and equivalence with the reference."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plexichat.cache import _reference as ref


def test_eviction_order_and_counters(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(3)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.keys() == ["a", "b", "c"]
    assert cache.get("a") == "A"  # hit: a becomes most recent
    assert cache.keys() == ["b", "c", "a"]
    cache.put("d", "D")  # evicts b, the least recent
    assert cache.keys() == ["c", "a", "d"]
    assert "b" not in cache
    assert cache.get("b") is None
    assert cache.get("b", "default") == "default"
    assert (cache.hits, cache.misses, cache.evictions) == (1, 2, 1)
    assert cache.stats() == {
        "capacity": 3,
        "size": 3,
        "hits": 1,
        "misses": 2,
        "evictions": 1,
    }


def test_update_moves_to_front_without_eviction(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    assert cache.keys() == ["b", "a"]
    assert cache.evictions == 0
    assert cache.peek("a") == 10
    cache.put("c", 3)
    assert cache.keys() == ["a", "c"]
    assert cache.evictions == 1


def test_peek_contains_pop_touch_no_counters(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(4)
    for i in range(4):
        cache.put(i, str(i))
    assert cache.peek(0) == "0"
    assert cache.peek(99) is None
    assert cache.peek(99, "x") == "x"
    assert 1 in cache
    assert 99 not in cache
    assert cache.keys() == [0, 1, 2, 3]
    assert cache.pop(1) == "1"
    assert cache.pop(1) is None
    assert cache.pop(1, "gone") == "gone"
    assert cache.keys() == [0, 2, 3]
    assert len(cache) == 3
    assert (cache.hits, cache.misses, cache.evictions) == (0, 0, 0)
    # a freed slot is reused before anything is evicted
    cache.put(4, "4")
    assert cache.evictions == 0
    cache.put(5, "5")
    assert cache.evictions == 1
    assert cache.keys() == [2, 3, 4, 5]


def test_clear_keeps_counters(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(2)
    cache.put("a", 1)
    cache.get("a")
    cache.get("z")
    cache.put("b", 2)
    cache.put("c", 3)
    cache.clear()
    assert len(cache) == 0
    assert cache.keys() == []
    assert "a" not in cache
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 1)
    cache.put("x", 1)
    cache.put("y", 2)
    cache.put("z", 3)
    assert cache.keys() == ["y", "z"]
    assert cache.evictions == 2


def test_capacity_one(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(1)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.keys() == ["b"]
    assert cache.get("a") is None
    assert cache.get("b") == 2
    assert cache.capacity == 1


def test_none_values_are_stored(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(2)
    cache.put("a", None)
    assert "a" in cache
    assert cache.get("a", "missing") is None
    assert cache.hits == 1


def test_equal_keys_keep_first_object(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(3)
    cache.put(1, "int")
    cache.put(1.0, "float")
    assert len(cache) == 1
    assert cache.get(True) == "float"
    [key] = cache.keys()
    assert type(key) is int


@pytest.mark.parametrize("capacity", [0, -1, ref.MAX_CAPACITY + 1])
def test_capacity_out_of_range(cache_impl: ModuleType, capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity"):
        cache_impl.LRUCache(capacity)


@pytest.mark.parametrize("capacity", [1.5, "3", None])
def test_capacity_not_an_int(cache_impl: ModuleType, capacity: Any) -> None:
    with pytest.raises(TypeError):
        cache_impl.LRUCache(capacity)


def test_large_capacity_allocates_lazily(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(ref.MAX_CAPACITY)
    for i in range(100):
        cache.put(i, i)
    assert len(cache) == 100
    assert cache.capacity == ref.MAX_CAPACITY


def test_unhashable_key_changes_nothing(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(1)
    cache.put("a", 1)
    for call in (cache.get, cache.peek, cache.pop, cache.__contains__):
        with pytest.raises(TypeError):
            call([])
    with pytest.raises(TypeError):
        cache.put([], 2)
    assert cache.keys() == ["a"]
    assert cache.stats() == ref.LRUCache(1).stats() | {"size": 1}


def test_counters_are_read_only(cache_impl: ModuleType) -> None:
    cache = cache_impl.LRUCache(1)
    for name in ("hits", "misses", "evictions", "capacity"):
        with pytest.raises(AttributeError):
            setattr(cache, name, 5)


def test_generic_alias_and_repr(cache_impl: ModuleType) -> None:
    alias = cache_impl.LRUCache[str, int]
    cache = alias(2)
    cache.put("a", 1)
    assert "capacity=2" in repr(cache)
    assert "size=1" in repr(cache)


# -- equivalence with the reference ------------------------------------------

KEYS = st.one_of(
    st.integers(-3, 12),
    st.sampled_from([1.0, 0.0, True, False, "a", "b", (1, 2), None, b"a"]),
)
OPS = st.one_of(
    st.tuples(st.just("get"), KEYS),
    st.tuples(st.just("put"), KEYS, st.integers()),
    st.tuples(st.just("pop"), KEYS),
    st.tuples(st.just("peek"), KEYS),
    st.tuples(st.just("contains"), KEYS),
    st.tuples(st.just("clear")),
)


def apply(cache: Any, op: tuple[Any, ...]) -> object:
    name, *args = op
    if name == "get":
        return cache.get(args[0], "miss")
    if name == "put":
        return cache.put(*args)
    if name == "pop":
        return cache.pop(args[0], "absent")
    if name == "peek":
        return cache.peek(args[0], "absent")
    if name == "contains":
        return args[0] in cache
    return cache.clear()


def observe(cache: Any) -> tuple[object, ...]:
    keys = cache.keys()
    return (keys, [type(k) for k in keys], len(cache), cache.stats())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # modules only
)
@given(capacity=st.integers(1, 6), ops=st.lists(OPS, max_size=80))
def test_matches_reference(
    cache_impl: ModuleType, capacity: int, ops: list, skips: Any
) -> None:
    if cache_impl is ref:
        skips.skip("reference-is-spec")
    cache = cache_impl.LRUCache(capacity)
    spec = ref.LRUCache(capacity)
    for op in ops:
        assert apply(cache, op) == apply(spec, op), op
        assert observe(cache) == observe(spec), op


def test_package_exports_the_active_backend() -> None:
    import plexichat.cache
    from plexichat import accel

    assert accel.active("cache") == plexichat.cache.BACKEND
    assert plexichat.cache.LRUCache is accel.load("cache").LRUCache
