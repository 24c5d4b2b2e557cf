"""Stub of the Cython routing backend (same API as ``_reference``)."""

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from plexichat.routing._types import MovePlan

def owners(
    key: int, seeds: Sequence[int], weights: Sequence[float], replicas: int
) -> list[int]: ...
def owners_batch(
    keys: Any, seeds: Any, weights: Any, replicas: int
) -> NDArray[np.int64]: ...
def move_plan(
    keys: Any,
    old_seeds: Any,
    old_weights: Any,
    new_seeds: Any,
    new_weights: Any,
    replicas: int,
) -> MovePlan: ...
