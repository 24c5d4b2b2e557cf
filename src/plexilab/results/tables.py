"""Every rich table of a run's results (local, container, inventory and QEMU runs).

Every table reads the typed :class:`~plexilab.run.result.RunResult`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from plexilab.infra.engine import BuildResult
from plexilab.run.result import RunResult

# rows of the results table that hold checker counts -> the counts in them
VERDICT_ROWS: dict[str, tuple[str, ...]] = {
    "lost / duplicated / reordered": ("lost", "duplicated", "reordered"),
    "misplaced / shared seq / gaps": ("seq_mismatch", "shared_seq", "gaps"),
    "replica missing / divergence": ("replica_missing", "divergence"),
}


def _count(value: float | None, fmt: str = "{:,}") -> str:
    return "-" if value is None else fmt.format(value)


def results_table(r: RunResult, title: str = "PlexiChat local cluster") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    lat = r.latency_ms or {}
    p2p = r.p2p_latency_ms
    rows: list[tuple[str, str]] = [
        ("nodes / replicas", f"{r.nodes} / {r.replicas}"),
        ("backend", r.backend),
        ("acked", _count(r.acked)),
        ("failures", _count(r.failures)),
        (
            "lost / duplicated / reordered",
            f"{r.lost} / {r.duplicated} / {r.reordered}",
        ),
        (
            "misplaced / shared seq / gaps",
            f"{r.seq_mismatch} / {r.shared_seq} / {r.gaps}",
        ),
        (
            "replica missing / divergence",
            f"{r.replica_missing} / {r.divergence}"
            if r.replicas_checked
            else "not checked",
        ),
        ("throughput (msg/s)", _count(r.throughput_msgs_per_s, "{:,.0f}")),
        (
            "latency p50 / p99 / p99.9 (ms)",
            " / ".join(_num(lat.get(k)) for k in ("p50", "p99", "p99.9")),
        ),
        ("convergence (s)", f"{r.convergence_s:.2f}"),
        (
            "p2p latency p50 / p99 (ms)",
            f"{_num(p2p.get('p50'))} / {_num(p2p.get('p99'))}",
        ),
        ("p2p coverage", _count(r.p2p_coverage, "{:.2%}")),
    ]
    if r.faults:
        counts = r.fault_counts or {}
        rows.append(("faults", ", ".join(f"{k} x{v}" for k, v in counts.items())))
        for window, v in (r.availability or {}).items():
            rows.append(
                (
                    f"{window.replace('_', ' ')}: ok / failed (acked/s)",
                    f"{v['ok']:,} / {v['failed']:,} ({v['acked_per_s']:,.0f})",
                )
            )
        for kind, (served, total, worst) in _served_by_kind(r).items():
            rows.append(
                (
                    f"{kind}: healthy side fully served within the fault",
                    f"{served} of {total} faults (slowest after {worst})",
                )
            )
        rows.append(("recovery after healing (s)", _num(r.recovery_s)))
    for error in r.fault_errors:
        rows.append(("fault error", error))
    for name, value in rows:
        bad = name == "fault error" or any(
            getattr(r, count) for count in VERDICT_ROWS.get(name, ())
        )
        table.add_row(name, value, style="red" if bad else None)
    return table


def _served_by_kind(r: RunResult) -> dict[str, tuple[int, int, str]]:
    """Per fault kind: faults whose healthy side was served, of all, slowest."""
    out: dict[str, tuple[int, int, str]] = {}
    for row in r.fault_service or []:
        served, total, worst = out.get(row["kind"], (0, 0, "-"))
        after = row.get("served_after_s")
        if after is not None:
            served += 1
            if worst == "-" or after > float(worst.rstrip("s")):
                worst = f"{after:g}s"
        out[row["kind"]] = (served, total + 1, worst)
    return out


# -- tables ---------------------------------------------------------------------------


def _ms(summary: Mapping[str, Any] | None, key: str) -> str:
    if not summary or not summary.get("count"):
        return "-"
    return f"{summary[key]:.2f}"


def _num(value: Any, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _table(title: str, columns: Sequence[str]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=i < 3)
    return table


def node_table(result: RunResult) -> Table:
    """Per node: where it ran, what it did, its latencies (ms)."""
    if result.scenario == "p2p":
        return p2p_node_table(result)
    table = _table(
        "per node (latencies in ms, node-side)",
        ["node", "guest", "arch", "boot s", "acked", "send p50", "send p99",
         "relay p50"],
    )  # fmt: skip
    for row in result.per_node:
        send = row.send_latency_ms
        counters = row.counters or {}
        table.add_row(
            row.node_id,
            row.host,
            row.arch,
            _num(row.boot_s, "{:.1f}"),
            f"{counters.get('acked', 0):,}",
            _ms(send, "p50"),
            _ms(send, "p99"),
            _ms(row.relay_latency_ms, "p50"),
        )
    return table


def p2p_node_table(result: RunResult) -> Table:
    table = _table(
        "per node (relay propagation from injection, ms)",
        ["node", "guest", "arch", "boot s", "relays", "p50", "p99", "max"],
    )
    for row in result.per_node:
        relay = row.relay_latency_ms
        table.add_row(
            row.node_id,
            row.host,
            row.arch,
            _num(row.boot_s, "{:.1f}"),
            f"{(row.counters or {}).get('relays', 0):,}",
            _ms(relay, "p50"),
            _ms(relay, "p99"),
            _ms(relay, "max"),
        )
    return table


def vm_table(result: RunResult) -> Table:
    """Per guest: QMP-sampled CPU and memory, clock offset."""
    table = _table(
        "per guest VM (QMP samples; load = from convergence to the end of the load)",
        ["guest", "accel", "load vCPU s", "vCPU use", "QEMU CPU s", "RSS MiB",
         "RSS max", "clock ms"],
    )  # fmt: skip
    for row in result.per_node:
        vm = row.vm or {}
        clock = row.clock or {}
        table.add_row(
            row.host,
            str(row.accel or "-"),
            _num(vm.get("load_vcpu_s"), "{:.1f}"),
            _num(vm.get("load_vcpu_util"), "{:.0%}"),
            _num(vm.get("qemu_cpu_s"), "{:.1f}"),
            _num(vm.get("rss_mib_after_load"), "{:.0f}"),
            _num(vm.get("rss_mib_max"), "{:.0f}"),
            _num(clock.get("offset_after_ms", clock.get("offset_ms")), "{:+.2f}"),
        )
    return table


def arch_table(result: RunResult) -> Table:
    """Per arch: the nodes' SEND and RELAY histograms merged (ms)."""
    if result.scenario == "p2p":
        table = _table(
            "per architecture (relay propagation, ms)",
            ["arch", "nodes", "relays", "p50", "p99", "p99.9", "max"],
        )
        for arch, r in sorted(result.p2p_latency_by_arch.items()):
            table.add_row(
                arch,
                str(r["nodes"]),
                f"{r['count']:,}",
                _ms(r, "p50"),
                _ms(r, "p99"),
                _ms(r, "p99.9"),
                _ms(r, "max"),
            )
        return table
    table = _table(
        "per architecture (node-side histograms merged, ms)",
        ["arch", "nodes", "acked", "send p50", "send p99", "send p99.9",
         "relay p50", "relay p99"],
    )  # fmt: skip
    send = result.latency_by_arch
    relay = result.p2p_latency_by_arch
    for arch in sorted(set(send) | set(relay)):
        rows = [r for r in result.per_node if r.arch == arch]
        acked = sum((r.counters or {}).get("acked", 0) for r in rows)
        s, p = send.get(arch), relay.get(arch)
        table.add_row(
            arch,
            str(len(rows)),
            f"{acked:,}",
            _ms(s, "p50"),
            _ms(s, "p99"),
            _ms(s, "p99.9"),
            _ms(p, "p50"),
            _ms(p, "p99"),
        )
    return table


def phase_table(result: RunResult) -> Table:
    table = _table(f"phases (total {result.total_s:.1f} s)", ["phase", "s"])
    for name, secs in result.phases_s.items():
        table.add_row(name, f"{secs:.2f}")
    return table


def p2p_table(result: RunResult) -> Table:
    p2p = result.p2p or {}
    table = Table(title=f"P2P relay ({result.provider})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    lat = result.p2p_latency_ms
    rows = [
        ("nodes", str(result.nodes)),
        ("relays injected / fanout", f"{p2p['injected']} / {p2p['fanout']}"),
        (
            "deliveries / expected",
            f"{p2p['deliveries']} / {p2p['expected_deliveries']}",
        ),
        ("coverage", _count(result.p2p_coverage, "{:.2%}")),
        ("propagation p50 / p99 / max (ms)",
         f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat.get('max', 0):.2f}"),
        ("convergence (s)", f"{result.convergence_s:.2f}"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_results(result: RunResult, console: Console) -> None:
    """Summary (as local.cluster), per node, per arch and phase tables."""
    if result.scenario == "p2p":
        console.print(p2p_table(result))
    else:
        mode = result.arch_mode or "?"
        title = f"PlexiChat cluster ({result.provider}, {mode})"
        console.print(results_table(result, title))
    console.print(node_table(result))
    if result.guests:
        console.print(vm_table(result))
    console.print(arch_table(result))
    console.print(phase_table(result))
    if result.fallback_reason:
        console.print(
            f"[bold yellow]provider: local (fallback): {result.fallback_reason}"
        )
    if result.leftover_qemu_pids:
        console.print(
            f"[bold red]QEMU processes left behind: {result.leftover_qemu_pids}"
        )


def security_table(summary: Mapping[str, Mapping[str, float]], rounds: int) -> Table:
    """``local.bench-security``: per mode, median msg/s and the cost."""
    table = Table(title=f"security cost ({rounds} rounds, medians)")
    for column in ("mode", "msg/s", "vs insecure", "cost", "p99 ms (median)"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, row in summary.items():
        table.add_row(
            mode,
            f"{row['msgs_per_s']:,.0f}",
            f"{row['ratio']:.3f}",
            f"{1 - row['ratio']:+.1%}",
            f"{row['p99_ms']:.2f}",
        )
    return table


def build_table(results: Sequence[BuildResult], image: str) -> Table:
    """``docker.build``: time, steps, cache hits and size of each build."""
    table = Table(title=f"docker build {image}")
    for name in ("build", "seconds", "steps", "cached steps", "image size"):
        table.add_column(name, justify="right")
    for i, res in enumerate(results, 1):
        table.add_row(
            str(i),
            f"{res.seconds:.1f}",
            str(res.steps),
            str(res.cached_steps),
            f"{res.size / 1e6:.0f} MB",
        )
    return table


def kv_table(title: str, rows: Mapping[str, Any]) -> Table:
    """Two columns, what and value (``qemu.image``, ``qemu.push``...)."""
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, str(value))
    return table
