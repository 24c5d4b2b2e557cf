"""``plexichat-load``: chat load (closed or open loop) or the P2P relay scenario."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plexichat.load import report
from plexichat.load.generator import LoadConfig, run_load
from plexichat.load.p2p import P2PConfig, run_p2p
from plexichat.node import auth
from plexichat.node.server import parse_address


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plexichat-load",
        description="Load a PlexiChat cluster and report Locust-style statistics "
        "(requests, failures, requests/s, latency percentiles) as JSON and CSV.",
    )
    add = parser.add_argument
    add(
        "--config",
        type=Path,
        default=None,
        help="a JSON object of these options by name (clients, secret_file, ...); "
        "flags given as well override it",
    )
    add("--nodes", required=True, help="comma-separated HOST:PORT of the nodes")
    add(
        "--scenario",
        choices=("chat", "p2p"),
        default="chat",
        help="chat: SEND load with a journal; p2p: RELAY fan-out latency",
    )
    add("--clients", type=int, default=8, help="concurrent clients (senders)")
    add(
        "--connections",
        type=int,
        default=0,
        help="connections per node shared by the clients (0: one per client)",
    )
    add(
        "--mode",
        choices=("closed", "open"),
        default="closed",
        help="closed: each client keeps --inflight requests; "
        "open: --rate msgs/s in total",
    )
    add(
        "--inflight",
        type=int,
        default=64,
        help="requests in flight per client (closed loop)",
    )
    add(
        "--rate",
        type=float,
        default=10_000.0,
        help="messages per second (open loop, p2p)",
    )
    add("--count", type=int, default=100_000, help="stop after this many messages")
    add("--duration", type=float, default=30.0, help="stop after this many seconds")
    add("--payload", type=int, default=64, help="payload bytes per message")
    add("--channels", type=int, default=256, help="number of channels")
    add(
        "--distribution",
        choices=("uniform", "zipf"),
        default="uniform",
        help="channel popularity",
    )
    add("--zipf-s", type=float, default=1.1, help="Zipf exponent")
    add(
        "--route",
        choices=("owner", "any"),
        default="owner",
        help="owner: send to the channel owner; any: one node per client (it forwards)",
    )
    add("--journal", type=Path, default=None, help="write acknowledged messages here")
    add("--timeout", type=float, default=10.0, help="per-request timeout (seconds)")
    add("--seed", type=int, default=None, help="seed of the channel choice")
    add("--fanout", type=int, default=2, help="p2p: next hops per node")
    add("--ttl", type=int, default=16, help="p2p: hop limit")
    add("--json", type=Path, default=None, help="write the report as JSON here")
    add("--csv", type=Path, default=None, help="write the Locust-style CSV here")
    add("--quiet", action="store_true", help="do not print the report")
    add("--secret-file", type=Path, default=None, help=auth.SECRET_FILE_HELP)
    add(
        "--tls-ca",
        type=Path,
        default=None,
        help="speak TLS to --nodes (their TLS listeners), trusting this CA",
    )
    return parser


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    nodes = [parse_address(n) for n in args.nodes.split(",") if n.strip()]
    if not nodes:
        raise ValueError("--nodes is empty")
    creds = auth.credentials_from(args.secret_file)
    if args.scenario == "p2p":
        return await run_p2p(
            P2PConfig(
                nodes=nodes,
                count=min(args.count, 100_000),
                rate=args.rate,
                fanout=args.fanout,
                ttl=args.ttl,
                payload=args.payload,
                timeout=args.timeout,
                credentials=creds,
            )
        )
    return await run_load(
        LoadConfig(
            nodes=nodes,
            clients=args.clients,
            connections=args.connections,
            mode=args.mode,
            inflight=args.inflight,
            rate=args.rate,
            count=args.count,
            duration=args.duration,
            payload=args.payload,
            channels=args.channels,
            distribution=args.distribution,
            zipf_s=args.zipf_s,
            route=args.route,
            journal=args.journal,
            timeout=args.timeout,
            seed=args.seed,
            credentials=creds,
            tls_ca=args.tls_ca,
        )
    )


def apply_config(parser: argparse.ArgumentParser, data: object) -> None:
    """Make the options in *data* (a JSON object by option name) *parser*'s
    defaults, checked like flags are; an unknown name is an error."""
    if not isinstance(data, dict):
        parser.error("--config must hold a JSON object")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(data) - set(actions))
    if unknown:
        parser.error(
            f"--config: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(actions))}"
        )
    values: dict[str, Any] = {}
    for name, value in data.items():
        action = actions[name]
        values[name] = _config_value(parser, action, value)
        action.required = False
    parser.set_defaults(**values)


def _config_value(
    parser: argparse.ArgumentParser, action: argparse.Action, value: object
) -> Any:
    name = action.dest
    if value is None:
        return None
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            parser.error(f"--config: {name} must be true or false")
        return value
    kind = action.type
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        parser.error(f"--config: {name} must be an integer, not {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            parser.error(f"--config: {name} must be a number, not {value!r}")
        value = float(value)
    if kind in (None, Path) and not isinstance(value, str):
        parser.error(f"--config: {name} must be a string, not {value!r}")
    if kind is Path:
        value = Path(str(value))
    if action.choices is not None and value not in action.choices:
        shown = ", ".join(map(str, action.choices))
        parser.error(f"--config: {name} must be one of {shown}, not {value!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of *argv*, on top of a ``--config`` JSON file if it names one."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    first, _rest = pre.parse_known_args(argv)
    if first.config is not None:
        try:
            data = json.loads(first.config.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--config {first.config}: {exc}")
        apply_config(parser, data)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    gc.freeze()  # imported modules need no GC scans during the run
    try:
        result = asyncio.run(_run(args))
    except (OSError, ValueError, TimeoutError) as exc:
        print(f"plexichat-load: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.csv is not None and "locust" in result:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        args.csv.write_text(report.to_csv(result["locust"]))
    if not args.quiet:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
