"""TLS for client connections: the node's second listener, the clients that
trust the run's CA, and those that do not."""

from __future__ import annotations

import ssl

import pytest

from plexichat.load.client import NodeClient
from plexichat.load.generator import Generator, LoadConfig
from plexichat.node import protocol as p
from plexichat.node.auth import client_context
from plexichat.node.testing import InProcessCluster
from plexichat.routing import key_of
from plexilab.infra.tlscerts import make_cluster_tls


def test_clients_speak_tls_to_the_tls_listener(tmp_path, run):
    tls = make_cluster_tls(tmp_path / "tls")
    assert tls.key.stat().st_mode & 0o077 == 0

    async def scenario() -> None:
        async with InProcessCluster(
            tmp_path / "nodes",
            size=1,
            replicas=1,
            tls_listen=("127.0.0.1", 0),
            tls_cert=tls.cert,
            tls_key=tls.key,
        ) as cluster:
            node = cluster.nodes[0]
            assert node.tls_port > 0
            secure = client_context(tls.ca)
            token = cluster.token(6)
            async with NodeClient(
                "127.0.0.1", node.tls_port, token=token, ssl=secure
            ) as client:
                channel = key_of("tls")
                assert await client.send(channel, p.message_id(6, 1), 6, b"x") == 1
                records, _ = await client.fetch(channel)
                assert [r.payload for r in records] == [b"x"]
            # a client that does not trust the run's CA refuses the node
            stranger = make_cluster_tls(tmp_path / "other")
            wrong = NodeClient(
                "127.0.0.1", node.tls_port, token=token, ssl=client_context(stranger.ca)
            )
            with pytest.raises(ssl.SSLCertVerificationError):
                await wrong.connect()
            await wrong.close()
            # plain text to the TLS port gets no protocol answer
            plain = NodeClient("127.0.0.1", node.tls_port, token=token, timeout=1.0)
            with pytest.raises((ConnectionError, TimeoutError, OSError)):
                await plain.connect()
            await plain.close()
            # the load generator over TLS
            config = LoadConfig(
                nodes=[("127.0.0.1", node.tls_port)],
                clients=2,
                count=200,
                duration=20,
                channels=4,
                credentials=cluster.credentials,
                tls_ca=tls.ca,
            )
            result = await Generator(config).run()
            assert (result["acked"], result["failures"]) == (200, 0)

    run(scenario())
