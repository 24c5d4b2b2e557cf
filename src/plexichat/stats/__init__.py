"""HdrHistogram-style latency histogram, one API for all backends.

``Histogram(lowest=1, highest=3_600_000_000, significant_figures=3)`` records
integer values (``record``, ``record_many``), answers ``percentile``/
``percentiles``, ``count``/``min``/``max``/``mean``, merges histograms of the
same parameters and serialises to a compact, backend-independent byte format
(``to_bytes``/``from_bytes``).  The active backend is chosen by
:mod:`plexichat.accel`; the layout and format are specified in
:mod:`plexichat.stats._reference`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plexichat import accel
from plexichat.stats._layout import FORMAT_VERSION, MAGIC, MAX_VALUE

if TYPE_CHECKING:
    from plexichat.stats._reference import Histogram
else:
    Histogram = accel.load("stats").Histogram

BACKEND = accel.active("stats")

__all__ = ["BACKEND", "FORMAT_VERSION", "MAGIC", "MAX_VALUE", "Histogram"]
