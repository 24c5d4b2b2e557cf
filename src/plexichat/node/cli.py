"""``plexichat-node``: run one PlexiChat node until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plexichat.node import logs
from plexichat.node.auth import Credentials, ensure_local_credentials, read_secret
from plexichat.node.membership import GossipConfig
from plexichat.node.server import Node, NodeConfig, parse_address
from plexichat.node.store import ENGINES

log = logging.getLogger("plexichat.node")


def _default(name: str) -> Any:
    """The default of NodeConfig field *name* (one source for both)."""
    return next(f.default for f in dataclasses.fields(NodeConfig) if f.name == name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plexichat-node",
        description="Run a PlexiChat chat node (framed TCP protocol, SWIM membership, "
        "replicated SQLite storage).  Logs JSON lines to stderr.",
    )
    add = parser.add_argument
    add("--node-id", required=True, help="unique id of this node in the cluster")
    add(
        "--listen",
        default="127.0.0.1:0",
        help="HOST:PORT to listen on (default %(default)s)",
    )
    add(
        "--advertise",
        default=None,
        help="HOST:PORT that peers use to reach this node (default: --listen)",
    )
    add(
        "--source-address",
        default=None,
        help="local address to bind outgoing peer connections to (lets a lab "
        "link layer tell nodes apart; default: chosen by the OS)",
    )
    add(
        "--seeds", default="", help="comma-separated HOST:PORT of nodes to join through"
    )
    add(
        "--data-dir",
        required=True,
        type=Path,
        help="directory of the node's files (the SQLite database, placement state)",
    )
    add(
        "--replicas",
        type=int,
        default=2,
        help="copies of every message before it is acknowledged (default %(default)s)",
    )
    add(
        "--weight", type=float, default=1.0, help="routing weight (default %(default)s)"
    )
    add("--gossip-interval", type=float, default=0.5, help="seconds between probes")
    add("--ping-timeout", type=float, default=0.5, help="seconds to wait for a PONG")
    add(
        "--suspect-timeout",
        type=float,
        default=3.0,
        help="seconds a suspect has to refute before it is declared dead",
    )
    add(
        "--max-members",
        type=int,
        default=GossipConfig.max_members,
        help="members a node keeps in its table, itself included; gossip about "
        "more is dropped (default %(default)s)",
    )
    add(
        "--forget-after",
        type=float,
        default=GossipConfig.forget_after,
        help="seconds a dead or left member stays in the table (default %(default)s)",
    )
    add(
        "--indirect-pings",
        type=int,
        default=2,
        help="members asked to probe indirectly",
    )
    add(
        "--replicate-timeout",
        type=float,
        default=5.0,
        help="seconds to wait for replicas",
    )
    add(
        "--max-message",
        type=int,
        default=_default("max_message"),
        help="largest message payload (bytes; at most --max-frame - 4096)",
    )
    # Limits (docs/protocol.md "Limits")
    add(
        "--read-timeout",
        type=float,
        default=_default("read_timeout"),
        help="seconds a frame may take to arrive whole from its first byte (the "
        "first frame: from the accept); then ERROR TIMEOUT and the connection "
        "is closed (default %(default)s)",
    )
    add(
        "--idle-timeout",
        type=float,
        default=_default("idle_timeout"),
        help="close a connection that sent no frame for this many seconds, "
        "unless it is a peer link or holds a subscription; 0: never "
        "(default %(default)s)",
    )
    add(
        "--max-connections",
        type=int,
        default=_default("max_connections"),
        help="open connections; one more gets ERROR UNAVAILABLE and is closed "
        "(default %(default)s)",
    )
    add(
        "--max-inflight",
        type=int,
        default=_default("max_inflight"),
        help="requests of one connection read and not yet answered; beyond it "
        "the node stops reading that connection until half are answered "
        "(default %(default)s)",
    )
    add(
        "--max-output",
        type=int,
        default=_default("max_output"),
        help="reply bytes one connection may leave unread before the node "
        "drops it (default %(default)s)",
    )
    add(
        "--max-fetches",
        type=int,
        default=_default("max_fetches"),
        help="FETCH store reads at once, all connections together; more wait "
        "(default %(default)s)",
    )
    add(
        "--max-unauthenticated",
        type=int,
        default=_default("max_unauthenticated"),
        help="connections that have not authenticated yet; a new one closes "
        "the oldest (default %(default)s)",
    )
    add(
        "--auth-timeout",
        type=float,
        default=_default("auth_timeout"),
        help="seconds a connection may stay unauthenticated (default %(default)s)",
    )
    add(
        "--max-frame",
        type=int,
        default=_default("max_frame"),
        help="largest frame payload the node reads or sends (bytes, at most "
        "16 MiB; default %(default)s)",
    )
    add(
        "--sync",
        choices=("normal", "full"),
        default="normal",
        help="SQLite synchronous mode: normal survives a process crash, "
        "full a power loss",
    )
    add(
        "--store",
        choices=ENGINES,
        default="sqlite",
        help="message store engine (default %(default)s): sqlite in --data-dir, "
        "or memory, which is NOT durable (lost when the process ends) and meant "
        "for tests and simulations",
    )
    add(
        "--commit-interval",
        type=float,
        default=0.002,
        help="group commit: minimum seconds between SQLite commits (default "
        "%(default)s); larger batches cost less CPU per message, add latency",
    )
    add(
        "--secret-file",
        type=Path,
        default=None,
        help="file holding the cluster secret (hex, mode 600; every node of a "
        "cluster reads the same one).  Without it the node makes its own in "
        "DATA_DIR/auth/ with an admin token beside it, and says where",
    )
    add(
        "--tls-listen",
        default=None,
        help="HOST:PORT of a second listener for clients that speaks the "
        "protocol inside TLS 1.3 (needs --tls-cert and --tls-key)",
    )
    add("--tls-cert", type=Path, default=None, help="PEM certificate chain for TLS")
    add("--tls-key", type=Path, default=None, help="PEM private key for TLS")
    add(
        "--insecure",
        action="store_true",
        help="run open: no peer or client authentication (never for a cluster "
        "other processes can reach)",
    )
    add("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_http_arguments(parser)
    return parser


# -- the HTTP/WebSocket API (plexichat.api; docs/http-api.md) ---------------------
# Imported only with --http-listen: without it the node runs on its core
# dependencies (fastapi and uvicorn come with the ``api`` extra).


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("HTTP and WebSocket API (docs/http-api.md)")
    group.add_argument(
        "--http-listen",
        default=None,
        help="HOST:PORT to serve the HTTP/WebSocket API on, next to the binary "
        "port and in the same process (needs the api extra; default: no API)",
    )
    group.add_argument(
        "--http-ws-queue",
        type=int,
        default=1024,
        help="live messages buffered per WebSocket before a slow client is "
        "closed with code 4008 (default %(default)s)",
    )


async def start_http(args: argparse.Namespace, node: Any) -> Any:
    """Serve the API of *node* when ``--http-listen`` asks for it; the
    :class:`plexichat.api.server.HttpServer` (None without the flag)."""
    if getattr(args, "http_listen", None) is None:
        return None
    from plexichat.api.app import node_app
    from plexichat.api.server import HttpServer

    host, port = parse_address(args.http_listen)
    server = HttpServer(node_app(node, ws_queue=args.http_ws_queue), host, port)
    bound = await server.start()
    log.info(
        "HTTP API listening",
        extra={"event": "http-ready", "listen": f"{host}:{bound}"},
    )
    return server


def credentials_from_args(args: argparse.Namespace) -> Credentials | None:
    """The cluster's credentials: from --secret-file, or made in the data dir."""
    if args.insecure:
        if args.secret_file is not None:
            raise ValueError("--insecure and --secret-file exclude each other")
        log.warning(
            "running insecure: anyone who reaches the port is a client and a peer",
            extra={"event": "insecure"},
        )
        return None
    if args.secret_file is not None:
        return Credentials(read_secret(args.secret_file))
    creds, secret_path, token_path = ensure_local_credentials(args.data_dir)
    print(
        f"plexichat-node: no --secret-file given; this node's cluster secret is "
        f"{secret_path} and an admin token is in {token_path}",
        file=sys.stderr,
        flush=True,
    )
    return creds


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    listen_host, listen_port = parse_address(args.listen)
    advertise = parse_address(args.advertise) if args.advertise else (None, None)
    seeds = [parse_address(s) for s in args.seeds.split(",") if s.strip()]
    return NodeConfig(
        node_id=args.node_id,
        data_dir=args.data_dir,
        listen_host=listen_host,
        listen_port=listen_port,
        advertise_host=advertise[0],
        advertise_port=advertise[1],
        source_address=args.source_address,
        seeds=seeds,
        replicas=args.replicas,
        weight=args.weight,
        gossip=GossipConfig(
            interval=args.gossip_interval,
            ping_timeout=args.ping_timeout,
            suspect_timeout=args.suspect_timeout,
            indirect=args.indirect_pings,
            max_members=args.max_members,
            forget_after=args.forget_after,
        ),
        replicate_timeout=args.replicate_timeout,
        read_timeout=args.read_timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_inflight=args.max_inflight,
        max_output=args.max_output,
        max_fetches=args.max_fetches,
        max_unauthenticated=args.max_unauthenticated,
        auth_timeout=args.auth_timeout,
        max_frame=args.max_frame,
        max_message=args.max_message,
        synchronous=args.sync,
        commit_interval=args.commit_interval,
        store=args.store,
        credentials=credentials_from_args(args),
        tls_listen=parse_address(args.tls_listen) if args.tls_listen else None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        insecure=args.insecure,
    )


async def serve(config: NodeConfig, args: argparse.Namespace | None = None) -> int:
    """Run a node until SIGTERM or SIGINT, then stop it cleanly (exit status
    0); or until something it cannot run without fails (a background loop,
    the storage writer: see ``Node.fatal``), then leave the ring (status 1)."""
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await node.start()
    try:
        http = None if args is None else await start_http(args, node)
    except BaseException:
        await node.stop()
        raise
    gc.freeze()  # start-up objects never need scanning again: shorter GC pauses
    print(f"ready {node.id} {config.listen_host}:{node.listen_port}", flush=True)
    if http is not None and args is not None:  # (after "ready": read first)
        print(f"http {args.http_listen.rpartition(':')[0]}:{http.port}", flush=True)
    waits = {
        asyncio.ensure_future(stop.wait()),
        asyncio.ensure_future(node.failed.wait()),
    }
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    if node.failure is None:
        log.info("signal received, stopping", extra={"event": "stopping"})
    if http is not None:
        await http.stop()
    await node.stop()
    return 0 if node.failure is None else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.node_id)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"plexichat-node: {exc}", file=sys.stderr)
        return 2
    if args.http_listen is not None:
        try:
            parse_address(args.http_listen)
            import plexichat.api  # noqa: F401  (the api extra is installed)
        except (ValueError, ImportError) as exc:
            print(f"plexichat-node: --http-listen: {exc}", file=sys.stderr)
            return 2
    return asyncio.run(serve(config, args))


if __name__ == "__main__":
    sys.exit(main())
