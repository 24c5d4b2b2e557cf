"""--load=locust: the HTTP load's journaling (unit) and a short real run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from plexichat.load import journal as jr
from plexichat.load.httpload import (
    CONFIG_VAR,
    HttpLoadConfig,
    Recorder,
    Sender,
    message_id,
)
from plexichat.node.auth import Credentials
from plexichat.routing import key_of
from plexilab.providers.base import Capabilities, StaticProvider
from plexilab.providers.local import LocalHost
from plexilab.run import pipeline
from plexilab.run.cluster import SRC, ClusterConfig, run_cluster
from plexilab.run.config import ClusterError
from plexilab.run.install import Runtime
from plexilab.run.nodes import Cluster

# Locust is pinned and installed with the tests: a missing one fails, never
# skips. It is never imported here (its import monkey-patches the process).


def test_config_comes_from_the_json_file_the_variable_names(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"hosts": ["http://127.0.0.1:1"], "journal": "j.bin"}))
    config = HttpLoadConfig.from_env({CONFIG_VAR: str(path)})
    assert config.hosts == ["http://127.0.0.1:1"]
    assert config.journal == Path("j.bin")
    assert HttpLoadConfig.from_env({}) == HttpLoadConfig()
    assert HttpLoadConfig.from_mapping(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="unknown HTTP load option"):
        HttpLoadConfig.from_mapping({"usres": 3})
    with pytest.raises(ValueError, match="read_ratio"):
        HttpLoadConfig.from_mapping({"read_ratio": 2})


def test_every_201_is_journaled_as_the_checker_reads_it(tmp_path):
    config = HttpLoadConfig(journal=tmp_path / "journal.bin", channels=4)
    creds, _ = Credentials.generate()
    sender = Sender(config, creds, random.Random(1))
    identity = creds.verify_token(sender.token)
    assert identity.sender == sender.sender  # a client token of its own sender
    rec = Recorder(config, nodes=2)
    expected = []
    for seq in (1, 2, 3):
        post = sender.next_post()
        assert post.headers["Authorization"] == f"Bearer {sender.token}"
        key = post.headers["Idempotency-Key"]
        assert post.msg_id == message_id(sender.sender, key)
        assert json.loads(post.body)["sender"] == sender.sender
        answer = {"seq": seq, "msg_id": post.msg_id.hex(), "sender": sender.sender}
        entry = sender.created(post, answer)
        name = post.path.split("/")[2]
        assert entry == jr.Entry(
            post.msg_id, key_of(name), sender.sender, post.counter, seq
        )
        rec.acked(entry, 2_000_000, node=seq % 2)
        expected.append(entry)
    rec.failed("HTTP 503", node=1)
    rec.close()
    assert list(jr.read(config.journal)) == expected
    result = rec.result([], users=1)
    assert (result["acked"], result["failures"], result["sent"]) == (3, 1, 4)
    assert result["errors"] == {"HTTP 503": 1}
    assert result["latency_ms"]["p50"] == pytest.approx(2.0, rel=0.01)
    assert sum(b["acked"] for b in result["timeline"]) == 3
    assert result["timeline"][0]["by_node"] == [[1, 0], [2, 1]]


def test_a_wrong_201_is_not_journaled():
    sender = Sender(HttpLoadConfig(channels=2), None, random.Random(2))
    post = sender.next_post()
    assert "Authorization" not in post.headers  # an insecure cluster: no token
    good = {"seq": 1, "msg_id": post.msg_id.hex(), "sender": sender.sender}
    for bad in (
        {**good, "seq": 0},
        {**good, "msg_id": "00" * 16},
        {**good, "sender": sender.sender + 1},
        ["not", "an", "object"],
    ):
        with pytest.raises(ValueError, match="201"):
            sender.created(post, bad)
    Sender.check_page({"messages": [{"seq": 1}, {"seq": 2}]})
    with pytest.raises(ValueError, match="order"):
        Sender.check_page({"messages": [{"seq": 2}, {"seq": 1}]})


def test_the_locustfile_imports_without_a_node(tmp_path):
    locustfile = SRC / "plexichat" / "load" / "locustfile.py"
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(locustfile), "--list"],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ChatUser" in out.stdout


def test_locust_needs_local_hosts(tmp_path):
    host = LocalHost(workdir=tmp_path / "h")
    config = ClusterConfig(nodes=1, load="locust", install="dev")
    runtime = Runtime(sys.executable, {}, {})
    try:
        with pytest.raises(ClusterError, match="local hosts only"):
            Cluster([host], config, runtime, Capabilities(local_python=False))
        cluster = Cluster([host], config, runtime)
        argv = cluster.node_argv(cluster.nodes[0])
        assert argv[argv.index("--http-listen") + 1].startswith("127.0.0.1:")
        cluster.run_secret.close()
    finally:
        host.close()


def test_locust_on_other_providers_fails_before_anything_starts(tmp_path):
    host = LocalHost(workdir=tmp_path / "h")
    provider = StaticProvider([host], Capabilities(local_python=False), name="qemu")
    config = ClusterConfig(nodes=1, load="locust", install="dev")
    try:
        with pytest.raises(ClusterError, match="local hosts only for now, not on qemu"):
            pipeline.run(provider, config)
    finally:
        host.close()
    assert not (tmp_path / "h" / "node-0").exists()


@pytest.mark.timeout(180)
def test_local_cluster_under_locust_loses_nothing(tmp_path):
    host = LocalHost(workdir=tmp_path / "host")
    config = ClusterConfig(
        nodes=3,
        load="locust",
        users=20,
        spawn_rate=20,
        duration=8,
        channels=32,
        p2p_count=20,
        p2p_rate=200,
        install="dev",
        results_dir=tmp_path / "run",
        gossip_interval=0.1,
    )
    try:
        res = run_cluster([host], config)
    finally:
        host.close()
    assert res["acked"] > 0
    load = res["load"]
    assert load["engine"] == "locust"
    # the checker saw every 201: the journal is complete, nothing lost
    assert res["check"]["acked"] == res["acked"] == load["acked"]
    assert res["violations"] == {}, res["check"]["examples"]
    assert res["check"]["present"] == res["acked"]
    assert res["throughput_msgs_per_s"] > 0
    assert 0 < res["latency_ms"]["p50"] <= res["latency_ms"]["p99"]
    post = load["locust"][0]
    assert post["name"] == "/channels/[channel]/messages"
    assert post["requests"] >= res["acked"] > 0
    assert (tmp_path / "run" / "locust_stats.csv").exists()
    assert sum(b["acked"] for b in res["timeline"]) == res["acked"]
