"""``python -m plexichat.accel``: show the backend table, or run the ratio check."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence

from plexichat import accel


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Plain-text table (no third-party dependency on the nodes)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def status_table() -> str:
    rows = []
    for row in accel.status():
        why = "; ".join(f"{b}: {reason}" for b, reason in row.missing.items())
        rows.append(
            [row.family, row.active, row.source, ",".join(row.available), why or "-"]
        )
    header = ["kernel", "active", "chosen by", "available", "missing (why)"]
    return format_table(rows, header)


def status_json() -> dict[str, object]:
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "summary": accel.summary(),
        "families": {
            row.family: {
                "active": row.active,
                "source": row.source,
                "available": list(row.available),
                "missing": {str(k): v for k, v in row.missing.items()},
            }
            for row in accel.status()
        },
    }


def bench_table(results: dict[str, dict[str, object]]) -> str:
    rows = []
    for op, data in results.items():
        seconds = data["seconds"]
        speedups = data["speedup_vs_python"]
        assert isinstance(seconds, dict)
        assert isinstance(speedups, dict)
        for name, secs in seconds.items():
            rows.append(
                [op, name, f"{secs * 1e6:,.2f}", f"{speedups.get(name, 0):.2f}x"]
            )
    return format_table(rows, ["operation", "backend/peer", "us/call", "vs python"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plexichat.accel", description=__doc__
    )
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    parser.add_argument(
        "--require-compiled",
        action="store_true",
        help="exit 1 unless every kernel family runs a compiled backend",
    )
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="time every kernel on every backend")
    bench.add_argument("--json", action="store_true", dest="bench_json")
    bench.add_argument("--family", action="append", choices=list(accel.FAMILIES))
    bench.add_argument("--repeat", type=int, default=5, help="timing rounds")
    bench.add_argument("--min-time", type=float, default=0.05, help="s per round")
    args = parser.parse_args(argv)

    if args.command == "bench":
        from plexichat.accel import bench as bench_module

        results = bench_module.run(
            args.family, repeat=args.repeat, min_time=args.min_time
        )
        if args.bench_json or args.json:
            print(json.dumps(results, indent=2, sort_keys=True))
        else:
            print(bench_table(results))
        return 0

    if args.json:
        print(json.dumps(status_json(), indent=2, sort_keys=True))
    else:
        print(status_table())
    if args.require_compiled and not accel.compiled_everywhere():
        print("error: not every kernel family runs a compiled backend", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
