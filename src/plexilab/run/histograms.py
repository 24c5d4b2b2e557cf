"""The nodes' own latency histograms, summarised per node and merged per arch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def hist_summary(hist: Any) -> dict[str, Any]:
    """count and p50/p99/p99.9/max in ms of a microsecond histogram."""
    from plexichat.load.report import percentiles_ms  # lab side: plexichat from src

    if hist is None or hist.count == 0:
        return {"count": 0}
    pct = percentiles_ms(hist)
    return {
        "count": int(hist.count),
        "p50": pct["50%"],
        "p99": pct["99%"],
        "p99.9": pct["99.9%"],
        "max": pct["100%"],
    }


def by_arch(
    arches: Sequence[str], hists: Sequence[Mapping[str, Any]], name: str
) -> dict[str, Any]:
    """Histogram *name* of the nodes merged per arch, summarised."""
    from plexichat.stats import Histogram  # lab side: plexichat from src

    merged: dict[str, Any] = {}
    nodes: dict[str, int] = {}
    for arch, node_hists in zip(arches, hists, strict=True):
        nodes[arch] = nodes.get(arch, 0) + 1
        hist = merged.setdefault(arch, Histogram())
        if name in node_hists:
            hist.merge(node_hists[name])
    return {
        arch: {"nodes": nodes[arch], **hist_summary(merged[arch])}
        for arch in sorted(merged)
    }
