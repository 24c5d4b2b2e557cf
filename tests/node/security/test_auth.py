"""Authentication from an attacker's side: raw sockets against real nodes.

Each test is one finding of the security review (issue 12): before the
fix, a process that reached the port could do what the test tries.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from plexichat import wire
from plexichat.load.client import NodeClient
from plexichat.node import auth, cli
from plexichat.node import protocol as p
from plexichat.node.auth import AuthError, Credentials
from plexichat.node.peers import peer_handshake
from plexichat.node.server import Node, NodeConfig
from plexichat.node.testing import InProcessCluster
from plexichat.node.transport import Link, RemoteError
from plexichat.routing import key_of
from plexilab.providers.local import free_ports

T = wire.MessageType


class Raw:
    """A raw protocol connection: frames out, frames in, nothing else."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.decoder = wire.FrameDecoder()
        self.frames: list[wire.Frame] = []

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def write(self, type: int, rid: int, payload: bytes) -> None:
        self.writer.write(wire.encode_frame(type, rid, payload))

    async def read(self) -> wire.Frame:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            if not data:
                raise ConnectionError("closed")
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    async def call(self, type: int, rid: int, payload: bytes) -> wire.Frame:
        self.write(type, rid, payload)
        return await self.read()

    async def closed(self) -> bool:
        """True once the node has closed the connection (EOF within 5 s)."""
        try:
            while True:
                data = await asyncio.wait_for(self.reader.read(65536), 5)
                if not data:
                    return True
        except (ConnectionError, TimeoutError):
            return False

    def close(self) -> None:
        self.writer.close()


def hello(**fields: Any) -> bytes:
    return p.encode_json({"version": p.PROTOCOL_VERSION, **fields})


def code_of(frame: wire.Frame) -> int:
    assert frame.type == T.ERROR, frame
    return p.decode_error(frame.payload)[0]


async def authed(port: int, token: str) -> Raw:
    conn = await Raw.open(port)
    welcome = await conn.call(T.HELLO, 1, hello(role="client", token=token))
    assert welcome.type == T.WELCOME, welcome
    return conn


def owned_channel(cluster: InProcessCluster, node: Node, prefix: str) -> int:
    return next(
        c
        for c in (key_of(f"{prefix}-{i}") for i in range(10_000))
        if cluster.owners(c)[0] == node.id
    )


# -- unauthenticated connections ---------------------------------------------------


def test_an_unauthenticated_connection_may_only_hello_and_ping(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2) as cluster:
            node = cluster.nodes[0]
            channel = owned_channel(cluster, node, "anon")
            conn = await Raw.open(node.listen_port)
            send = p.encode_send(channel, p.message_id(7, 1), 7, b"spoof")
            frames = {
                T.SEND: send,
                T.FETCH: p.encode_fetch(channel, 0, 10),
                T.SUBSCRIBE: p.encode_channel(channel),
                T.STATS: b"{}",
                T.GOSSIP: b"{}",
                T.REPLICATE: b"\x00" * 8,
                T.HANDOFF: b"\x06{}",
            }
            for rid, (ftype, body) in enumerate(frames.items(), start=10):
                reply = await conn.call(ftype, rid, body)
                assert code_of(reply) == p.ErrorCode.UNAUTHENTICATED, ftype
                assert reply.request_id == rid
            pong = await conn.call(T.PING, 2, b"")
            assert pong.type == T.PONG
            welcome = await conn.call(T.HELLO, 3, hello(role="client"))
            assert welcome.type == T.WELCOME  # a HELLO without a token: still anon
            assert code_of(await conn.call(T.SEND, 4, send)) == (
                p.ErrorCode.UNAUTHENTICATED
            )
            conn.close()
            assert await node.storage.fetch(channel, 0, 10) == []
            assert node.counters["refused_ops"] == len(frames) + 1

    run(scenario())


def test_a_ping_from_a_client_never_reaches_membership(tmp_path, run):
    """A membership PING body (gossip piggyback) from a non-peer is ignored."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2) as cluster:
            node = cluster.nodes[0]
            assert node.membership is not None
            before = set(node.membership.members)
            conn = await Raw.open(node.listen_port)
            fake = ["fake", "127.0.0.1", 9, 1, "alive", 1.0]  # a member update
            body = {"from": "fake", "updates": [fake]}
            pong = await conn.call(T.PING, 1, p.encode_json(body))
            assert (pong.type, pong.payload) == (T.PONG, b"")
            conn.close()
            assert set(node.membership.members) == before

    run(scenario())


# -- client tokens -------------------------------------------------------------------


def test_tokens_that_do_not_verify_are_refused_and_the_connection_closed(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=1, replicas=1) as cluster:
            port = cluster.nodes[0].listen_port
            other = Credentials.generate()[0]
            good = cluster.token(5)
            head, body, _sig = good.split(".")
            claims = json.loads(base64.urlsafe_b64decode(body + "=="))
            admin = base64.urlsafe_b64encode(
                json.dumps({**claims, "role": "admin"}).encode()
            ).rstrip(b"=")
            none_head = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=")
            bad = {
                "another cluster's": other.token(5),
                "tampered claims": f"{head}.{admin.decode()}.{_sig}",
                "alg none": f"{none_head.decode()}.{body}.",
                "expired": cluster.credentials.token(5, ttl=1, now=time.time() - 10),
                "garbage": "x.y.z",
                "not a string": 12345,
            }
            for reason, token in bad.items():
                conn = await Raw.open(port)
                reply = await conn.call(T.HELLO, 1, hello(role="client", token=token))
                assert code_of(reply) == p.ErrorCode.UNAUTHENTICATED, reason
                assert await conn.closed(), reason
            assert cluster.nodes[0].counters["auth_failures"] == len(bad)

    run(scenario())


def test_a_client_sends_only_as_itself(tmp_path, run):
    """Sender spoofing and msg_id pre-claim: a client token names one sender,
    and its msg_ids must carry that sender."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2) as cluster:
            node = cluster.nodes[0]
            channel = owned_channel(cluster, node, "spoof")
            victim, attacker = 1001, 666
            conn = await authed(node.listen_port, cluster.token(attacker))
            # 1. the attacker claims to be the victim
            spoof = p.encode_send(channel, p.message_id(victim, 1), victim, b"evil")
            assert code_of(await conn.call(T.SEND, 2, spoof)) == p.ErrorCode.FORBIDDEN
            # 2. the attacker pre-claims the victim's next msg_id as itself
            claim = p.encode_send(channel, p.message_id(victim, 2), attacker, b"evil")
            assert code_of(await conn.call(T.SEND, 3, claim)) == p.ErrorCode.FORBIDDEN
            # its own messages go through
            own = p.encode_send(channel, p.message_id(attacker, 1), attacker, b"mine")
            assert (await conn.call(T.SEND, 4, own)).type == T.ACK
            conn.close()
            # the victim's message is stored with the victim's text
            client = cluster.client(node, victim)
            async with client:
                seq = await client.send(channel, p.message_id(victim, 2), victim, b"hi")
                records, _ = await client.fetch(channel)
            assert [(r.seq, r.sender, r.payload) for r in records] == [
                (1, attacker, b"mine"),
                (seq, victim, b"hi"),
            ]

    run(scenario())


def test_a_service_token_sends_for_any_sender_but_cannot_reset_stats(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2) as cluster:
            node = cluster.nodes[0]
            channel = owned_channel(cluster, node, "service")
            token = cluster.credentials.token(9, role="service")
            conn = await authed(node.listen_port, token)
            for sender in (31, 32):
                body = p.encode_send(channel, p.message_id(sender, 1), sender, b"x")
                assert (await conn.call(T.SEND, sender, body)).type == T.ACK
            reset = p.encode_json({"reset": ["send"]})
            assert code_of(await conn.call(T.STATS, 7, reset)) == p.ErrorCode.FORBIDDEN
            conn.close()

    run(scenario())


def test_only_an_admin_resets_histograms(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2) as cluster:
            node = cluster.nodes[0]
            channel = owned_channel(cluster, node, "stats")
            async with cluster.client(node, 4) as client:
                await client.send(channel, p.message_id(4, 1), 4, b"x")
                with pytest.raises(RemoteError) as info:
                    await client.stats(reset=["send"])
                assert info.value.code == p.ErrorCode.FORBIDDEN
            assert node.hist["send"].count == 1  # untouched
            async with cluster.client(node, admin=True) as admin:
                _, hists = await admin.stats(reset=["send"])
            assert hists["send"].count == 1  # the reply holds them before the reset
            assert node.hist["send"].count == 0

    run(scenario())


# -- peers ----------------------------------------------------------------------------


def test_a_client_that_says_it_is_a_peer_cannot_replicate_or_hand_off(tmp_path, run):
    """The finding: a plain client declared itself a peer and sent REPLICATE
    and HANDOFF; the node took them (forged records at existing seqs)."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2) as cluster:
            node = cluster.nodes[1]
            # the old peer HELLO: no nonce, no proof
            conn = await Raw.open(node.listen_port)
            reply = await conn.call(T.HELLO, 1, hello(role="peer", node_id="n0"))
            assert code_of(reply) == p.ErrorCode.UNAUTHENTICATED
            assert await conn.closed()
            # a client with a valid client token is still not a peer
            conn = await authed(node.listen_port, cluster.token(3))
            for rid, (ftype, body) in enumerate(
                {
                    T.REPLICATE: b"\x00" * 8,
                    T.HANDOFF: b"\x06{}",
                    T.GOSSIP: p.encode_json({"members": []}),
                }.items(),
                start=2,
            ):
                assert code_of(await conn.call(ftype, rid, body)) == (
                    p.ErrorCode.FORBIDDEN
                ), ftype
            # a RELAY with a root is node-to-node: refused from a client
            forged = p.Relay(77, time.time_ns(), 3, 2, "n0", b"x")
            reply = await conn.call(T.RELAY, 9, p.encode_relay(forged))
            assert code_of(reply) == p.ErrorCode.FORBIDDEN
            conn.close()

    run(scenario())


def test_a_peer_of_another_cluster_fails_the_handshake(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2) as cluster:
            node = cluster.nodes[0]
            stranger = Credentials.generate()[0]
            link = Link(
                "127.0.0.1",
                node.listen_port,
                handshake=peer_handshake(stranger, "n9"),
            )
            with pytest.raises(AuthError, match="peer proof"):
                await link.connect(5)  # the node's proof does not verify for us
            assert not link.connected
            link.close()
            # and an impostor that skips the check is refused at its own proof
            conn = await Raw.open(node.listen_port)
            nonce = auth.new_nonce()
            reply = await conn.call(
                T.HELLO, 1, hello(role="peer", node_id="n9", nonce=nonce.hex())
            )
            welcome = p.decode_json(reply.payload)
            server_nonce = bytes.fromhex(welcome["nonce"])
            ids = auth.peer_ids("n9", node.id)
            proof = stranger.client_proof(nonce, server_nonce, ids)
            reply = await conn.call(
                T.HELLO, 2, hello(role="peer", node_id="n9", proof=proof)
            )
            assert code_of(reply) == p.ErrorCode.UNAUTHENTICATED
            assert await conn.closed()
            assert node.counters["auth_failures"] == 1

    run(scenario())


def test_a_recorded_peer_proof_cannot_be_replayed(tmp_path, run):
    """The node picks a fresh nonce per connection: the proof of one
    handshake does not admit another connection."""

    async def scenario() -> None:
        async with InProcessCluster(tmp_path, size=2) as cluster:
            node = cluster.nodes[0]
            creds = cluster.credentials
            nonce = auth.new_nonce()
            first = await Raw.open(node.listen_port)
            reply = await first.call(
                T.HELLO, 1, hello(role="peer", node_id="n7", nonce=nonce.hex())
            )
            server_nonce = bytes.fromhex(p.decode_json(reply.payload)["nonce"])
            proof = creds.client_proof(
                nonce, server_nonce, auth.peer_ids("n7", node.id)
            )
            admitted = await first.call(
                T.HELLO, 2, hello(role="peer", node_id="n7", proof=proof)
            )
            assert p.decode_json(admitted.payload)["peer"] is True
            first.close()
            # replay the same two HELLOs on a new connection
            second = await Raw.open(node.listen_port)
            again = hello(role="peer", node_id="n7", nonce=nonce.hex())
            assert (await second.call(T.HELLO, 1, again)).type == T.WELCOME
            reply = await second.call(
                T.HELLO, 2, hello(role="peer", node_id="n7", proof=proof)
            )
            assert code_of(reply) == p.ErrorCode.UNAUTHENTICATED
            # a proof without the first step is refused too
            third = await Raw.open(node.listen_port)
            reply = await third.call(
                T.HELLO, 1, hello(role="peer", node_id="n7", proof=proof)
            )
            assert code_of(reply) == p.ErrorCode.UNAUTHENTICATED

    run(scenario())


def test_nodes_of_different_clusters_do_not_join(tmp_path, run):
    async def scenario() -> None:
        async with InProcessCluster(tmp_path / "a", size=1, replicas=1) as a:
            stranger = InProcessCluster(tmp_path / "b", size=0, replicas=1)
            config = stranger.config("x0")
            config.seeds = [("127.0.0.1", a.nodes[0].listen_port)]
            node = Node(config, clock=stranger.clock)
            await node.start()
            try:
                await asyncio.sleep(1.0)  # many gossip rounds at test speed
                assert a.nodes[0].membership is not None
                assert set(a.nodes[0].membership.members) == {"n0"}
                assert set(node.ring_members) == {"x0"}
            finally:
                await node.stop(leave=False)

    run(scenario())


# -- starting without credentials ---------------------------------------------------


def test_a_node_without_credentials_refuses_to_run_open(tmp_path):
    with pytest.raises(ValueError, match="credentials"):
        Node(NodeConfig(node_id="n0", data_dir=tmp_path))
    # open only when asked, explicitly
    node = Node(NodeConfig(node_id="n0", data_dir=tmp_path, insecure=True))
    assert node.credentials is None


def test_the_cli_makes_its_own_credentials_and_says_where(tmp_path, capsys):
    args = cli.build_parser().parse_args(
        ["--node-id", "a", "--data-dir", str(tmp_path)]
    )
    config = cli.config_from_args(args)
    err = capsys.readouterr().err
    secret = tmp_path / "auth" / "cluster.secret"
    token = tmp_path / "auth" / "admin.token"
    assert str(secret) in err
    assert str(token) in err
    for path in (secret, token):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.credentials is not None
    identity = config.credentials.verify_token(token.read_text().strip())
    assert identity.admin
    # a second start reuses them
    again = cli.config_from_args(args)
    assert again.credentials is not None
    assert again.credentials.token_key == config.credentials.token_key


def test_a_secret_file_others_can_read_is_refused(tmp_path, capsys):
    path = tmp_path / "cluster.secret"
    auth.write_secret(path, os.urandom(32))
    os.chmod(path, 0o644)
    argv = ["--node-id", "a", "--data-dir", str(tmp_path), "--secret-file", str(path)]
    assert cli.main(argv) == 2
    assert "readable by others" in capsys.readouterr().err
    assert cli.main([*argv, "--insecure"]) == 2  # the two exclude each other


def test_a_node_process_serves_authenticated_clients_only(tmp_path, run):
    """The whole CLI path: a node started with a secret file serves a client
    with a token of that secret and refuses one without."""
    (port,) = free_ports(1)
    secret = tmp_path / "cluster.secret"
    creds_secret = os.urandom(32)
    auth.write_secret(secret, creds_secret)
    creds = Credentials(creds_secret)
    argv = [sys.executable, "-m", "plexichat.node.cli", "--node-id", "solo"]
    argv += ["--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d")]
    argv += ["--replicas", "1", "--secret-file", str(secret)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3] / "src")}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"ready solo")

        async def scenario() -> None:
            async with NodeClient("127.0.0.1", port, token=creds.token(8)) as client:
                assert await client.send(3, p.message_id(8, 1), 8, b"ok") == 1
            anon = NodeClient("127.0.0.1", port)
            async with anon:
                with pytest.raises(RemoteError) as info:
                    await anon.send(3, p.message_id(8, 2), 8, b"no")
                assert info.value.code == p.ErrorCode.UNAUTHENTICATED

        run(scenario(), 30)
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


# -- the credentials module ---------------------------------------------------------


def test_token_round_trip_and_claims():
    creds = Credentials(b"k" * 32)
    assert creds.verify_token(creds.token(2**64 - 1)) == auth.Identity(
        2**64 - 1, "client"
    )
    assert creds.verify_token(creds.token(3, role="service")).any_sender
    assert creds.verify_token(creds.token(3, admin=True)).admin
    assert creds.verify_token(creds.token(3, ttl=60)).sender == 3
    for sender in (0, 2**64):
        with pytest.raises(ValueError, match="sender"):
            creds.token(sender)
    with pytest.raises(ValueError, match="role"):
        creds.token(3, role="root")
    with pytest.raises(AuthError, match="longer"):
        creds.verify_token("a" * (auth.MAX_TOKEN + 1))
    with pytest.raises(ValueError, match="16 bytes"):
        Credentials(b"short")


def test_unauthenticated_connections_cannot_crowd_out_clients(tmp_path, run):
    """A process without credentials holds at most max_unauthenticated
    connections (a new one closes the oldest) and none for longer than
    auth_timeout; clients that authenticate keep being served."""

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path,
            size=1,
            replicas=1,
            max_connections=12,
            max_unauthenticated=4,
            auth_timeout=0.5,
        ) as cluster:
            node = cluster.nodes[0]
            port = node.listen_port
            flood = [await Raw.open(port) for _ in range(10)]
            await asyncio.sleep(0.05)
            assert len(node._anonymous) == 4
            assert node.counters["unauthenticated_closed"] >= 6
            # a client still gets in and is served (the flood is at the cap)
            client = cluster.client(node, 5)
            async with client:
                channel = key_of("crowd")
                assert await client.send(channel, p.message_id(5, 1), 5, b"x") == 1
                # the survivors of the flood are closed after auth_timeout;
                # the authenticated client is not
                assert all([await conn.closed() for conn in flood])
                assert await client.send(channel, p.message_id(5, 2), 5, b"y") == 2
            assert node._anonymous == {}

    run(scenario())
