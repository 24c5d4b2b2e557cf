"""Types and constants shared by every routing backend."""

from __future__ import annotations

from typing import Final, NamedTuple

import numpy as np
from numpy.typing import NDArray

MASK64: Final = (1 << 64) - 1
MIX_C1: Final = 0xBF58476D1CE4E5B9
MIX_C2: Final = 0x94D049BB133111EB
U_SCALE: Final = 2.0**-53
#: Largest double below 1.0: ``u`` is clamped to it (see ``_reference``).
U_MAX: Final = 1.0 - 2.0**-53


class MovePlan(NamedTuple):
    """Keys whose owner set changed, with their old and new owners (as seeds).

    ``keys`` is ``uint64[n_moved]`` in input order; ``old_owners`` and
    ``new_owners`` are ``uint64[n_moved, replicas]``, best-ranked first.
    """

    keys: NDArray[np.uint64]
    old_owners: NDArray[np.uint64]
    new_owners: NDArray[np.uint64]
