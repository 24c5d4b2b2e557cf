"""Shard routing by weighted rendezvous hashing, one API for all backends.

A channel key (u64, ``key_of(name)``) is owned by the node with the highest
score and replicated on the next ``replicas - 1`` nodes (``_reference``
documents the exact algorithm).  The kernels work on node seeds and weights:

* ``owners(key, seeds, weights, replicas)``: node indices, owner first;
* ``owners_batch(keys, seeds, weights, replicas)``: ``int64[len(keys), R]``;
* ``move_plan(keys, old_seeds, old_weights, new_seeds, new_weights, R)``:
  the keys whose owner set changes, with old and new owners as seeds.

:class:`Ring` wraps them for the chat node: nodes by id and weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from plexichat import accel
from plexichat.routing._common import as_u64, check_key
from plexichat.routing._reference import key_of, mix64, node_seed, score, unit
from plexichat.routing._types import MovePlan

if TYPE_CHECKING:
    from plexichat.routing._reference import move_plan, owners, owners_batch
else:
    _impl = accel.load("routing")
    move_plan = _impl.move_plan
    owners = _impl.owners
    owners_batch = _impl.owners_batch

BACKEND = accel.active("routing")

__all__ = [
    "BACKEND",
    "Move",
    "MovePlan",
    "Ring",
    "key_of",
    "mix64",
    "move_plan",
    "node_seed",
    "owners",
    "owners_batch",
    "score",
    "unit",
]


class Move(NamedTuple):
    """One key whose owners change: old and new owners by node id, best first."""

    key: int
    old: tuple[str, ...]
    new: tuple[str, ...]


def _key(channel: str | int) -> int:
    return key_of(channel) if isinstance(channel, str) else check_key(channel)


def _keys(keys: Iterable[str | int] | NDArray[Any]) -> NDArray[np.uint64]:
    if isinstance(keys, np.ndarray):
        return as_u64(keys, "keys")
    return np.fromiter((_key(k) for k in keys), dtype=np.uint64)


class Ring:
    """An immutable set of weighted nodes, routed by the active kernel.

    Node ids are kept sorted, so two rings built from the same mapping in
    any order route identically; ``owners_batch`` returns indices into
    :attr:`node_ids`.  A ring may be empty, but routing on it raises
    ``ValueError``, as does asking for more replicas than it has nodes.
    """

    __slots__ = ("_ids", "_index", "_seed_list", "_seeds", "_weight_list", "_weights")

    def __init__(self, nodes: Mapping[str, float]) -> None:
        ids = sorted(nodes)
        for node_id in ids:
            if not isinstance(node_id, str):
                raise TypeError(f"node ids must be str, not {type(node_id).__name__}")
        weights = [float(nodes[node_id]) for node_id in ids]
        for node_id, weight in zip(ids, weights, strict=True):
            if not (weight > 0.0 and math.isfinite(weight)):
                raise ValueError(
                    f"weight of node {node_id!r} must be positive and finite,"
                    f" got {weight!r}"
                )
        seeds = [node_seed(node_id) for node_id in ids]
        if len(set(seeds)) != len(seeds):
            raise ValueError("two node ids hash to the same seed")
        self._ids: tuple[str, ...] = tuple(ids)
        self._index = {node_id: i for i, node_id in enumerate(ids)}
        self._seed_list = seeds
        self._weight_list = weights
        self._seeds = np.array(seeds, dtype=np.uint64)
        self._weights = np.array(weights, dtype=np.float64)
        self._seeds.flags.writeable = False
        self._weights.flags.writeable = False

    @property
    def node_ids(self) -> tuple[str, ...]:
        """Node ids in index order (sorted)."""
        return self._ids

    @property
    def seeds(self) -> NDArray[np.uint64]:
        """Node seeds in index order (read-only)."""
        return self._seeds

    @property
    def weights(self) -> NDArray[np.float64]:
        """Node weights in index order (read-only)."""
        return self._weights

    def weight(self, node_id: str) -> float:
        """Weight of one node (``KeyError`` if absent)."""
        return float(self._weights[self._index[node_id]])

    def as_dict(self) -> dict[str, float]:
        """``{node id: weight}``."""
        return dict(zip(self._ids, self._weights.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._index

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return self._ids == other._ids and bool(
            np.array_equal(self._weights, other._weights)
        )

    def __hash__(self) -> int:
        return hash((self._ids, self._weights.tobytes()))

    def __repr__(self) -> str:
        return f"Ring({self.as_dict()!r})"

    def owners(self, channel: str | int, replicas: int = 1) -> list[str]:
        """Owner then replicas of a channel (its name or its u64 key)."""
        indices = owners(_key(channel), self._seed_list, self._weight_list, replicas)
        return [self._ids[i] for i in indices]

    def owners_batch(
        self, keys: Iterable[str | int] | NDArray[Any], replicas: int = 1
    ) -> NDArray[np.int64]:
        """Owner indices (into :attr:`node_ids`) of many keys: ``int64[n, R]``."""
        return owners_batch(_keys(keys), self._seeds, self._weights, replicas)

    def moves(
        self,
        new_ring: Ring,
        keys: Iterable[str | int] | NDArray[Any],
        replicas: int = 1,
    ) -> list[Move]:
        """Keys whose set of owners differs on *new_ring*, in input order."""
        plan = move_plan(
            _keys(keys),
            self._seeds,
            self._weights,
            new_ring._seeds,
            new_ring._weights,
            replicas,
        )
        by_seed = dict(zip(self._seeds.tolist(), self._ids, strict=True))
        by_seed.update(zip(new_ring._seeds.tolist(), new_ring._ids, strict=True))
        return [
            Move(key, tuple(by_seed[s] for s in old), tuple(by_seed[s] for s in new))
            for key, old, new in zip(
                plan.keys.tolist(),
                plan.old_owners.tolist(),
                plan.new_owners.tolist(),
                strict=True,
            )
        ]

    def with_node(self, node_id: str, weight: float = 1.0) -> Ring:
        """A ring with *node_id* added (or its weight replaced)."""
        nodes = self.as_dict()
        nodes[node_id] = weight
        return Ring(nodes)

    def without_node(self, node_id: str) -> Ring:
        """A ring without *node_id* (``KeyError`` if it is not a member)."""
        nodes = self.as_dict()
        del nodes[node_id]
        return Ring(nodes)
