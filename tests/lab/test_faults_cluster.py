"""Faults on a real local cluster: each one must really take effect.

A partition must stop the peer traffic (the isolated node declares the others
dead, the link counters stop), a killed process must be gone and come back,
a paused one must stop answering PING; a short cluster run with faults must
lose nothing and report its fault timeline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from plexichat.load.client import NodeClient
from plexilab.infra.links import LinkLayer
from plexilab.proc import wait_until
from plexilab.providers.local import LocalHost
from plexilab.run import faults
from plexilab.run.cluster import Cluster, ClusterConfig, prepare, run_cluster

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="POSIX only")

FAST = {"gossip_interval": 0.1, "ping_timeout": 0.3, "suspect_timeout": 0.8}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes whose peer traffic crosses a lab link layer."""
    tmp = tmp_path_factory.mktemp("faults")
    host = LocalHost(workdir=tmp / "host")
    config = ClusterConfig(nodes=3, **FAST)
    c = Cluster([host], config, prepare([host], "dev"))
    links = LinkLayer([n.lab for n in c.nodes]).start()
    c.route_through(links)
    try:
        c.start()
        c.wait_converged(timeout=30)
        yield c
    finally:
        c.stop()
        links.close()
        host.close()


def _views(cluster):
    return cluster.stats(timeout=2.0)


def _wait(predicate, timeout=15.0, what="condition"):
    if not wait_until(predicate, timeout):
        raise AssertionError(f"{what} not reached in {timeout}s")


def _status(info, node_id):
    return next(m["status"] for m in info["members"] if m["id"] == node_id)


def test_nodes_talk_through_the_link_layer(cluster):
    endpoints = cluster.links.endpoints
    assert all(n.source and n.advertise in endpoints for n in cluster.nodes)
    before = cluster.links.traffic(0, 1)
    _wait(lambda: cluster.links.traffic(0, 1) > before, what="gossip between n0, n1")
    info = _views(cluster)[0]
    assert {m["address"] for m in info["members"]} == {
        str(ep) for ep in cluster.links.endpoints
    }


def test_partition_cuts_peer_traffic_but_not_clients(cluster):
    links = cluster.links
    links.isolate(0)
    try:
        # the majority declares the isolated node dead; the isolated node,
        # having lost the majority, only suspects the others (it would
        # otherwise spread their death after the partition heals)
        _wait(
            lambda: (
                all(_status(_views(cluster)[0], n) == "suspect" for n in ("n1", "n2"))
                and all(_status(_views(cluster)[i], "n0") == "dead" for i in (1, 2))
            ),
            what="the majority declaring n0 dead, n0 suspecting the others",
        )
        time.sleep(1.0)  # longer than the suspicion timeout: still suspects
        views = _views(cluster)
        assert _status(views[0], "n1") == "suspect" == _status(views[0], "n2")
        assert views[0]["ring"] == ["n0", "n1", "n2"]
        assert views[1]["ring"] == views[2]["ring"] == ["n1", "n2"]
        snap = links.counters()
        time.sleep(1.0)  # ten gossip rounds
        later = links.counters()
        for pair in ((0, 1), (1, 0), (0, 2), (2, 0)):
            assert later[pair].bytes_out == snap[pair].bytes_out, pair
            assert later[pair].bytes_in == snap[pair].bytes_in, pair
        assert sum(later[p].refused for p in ((0, 1), (1, 0), (0, 2), (2, 0))) > 0
        assert links.traffic(1, 2) > 0  # the majority still talks
    finally:
        links.heal()
    cluster.wait_converged(timeout=30)


def test_kill_removes_the_process_and_restart_brings_it_back(cluster):
    node = cluster.nodes[2]
    pid = node.process.pid
    cluster.kill(2)
    assert not node.process.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _views(cluster)[2] is None
    cluster.restart(2)
    assert node.process.pid != pid
    cluster.wait_converged(timeout=30)
    assert _views(cluster)[2]["pid"] == node.process.pid


async def _ping(ep, timeout):
    client = NodeClient(ep.host, ep.port, timeout=timeout)
    try:
        await client.link.connect(timeout)
        await client.ping()
    finally:
        await client.close()


def _state(pid):
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def test_pause_stops_answers_until_resumed(cluster):
    ep = cluster.nodes[1].lab
    asyncio.run(_ping(ep, 2.0))
    cluster.pause(1)
    try:
        _wait(lambda: _state(cluster.nodes[1].process.pid) == "T", what="SIGSTOP")
        with pytest.raises(TimeoutError):
            asyncio.run(_ping(ep, 0.5))
    finally:
        cluster.resume(1)
    asyncio.run(_ping(ep, 2.0))
    cluster.wait_converged(timeout=30)


def test_short_run_with_faults_loses_nothing(tmp_path):
    host = LocalHost(workdir=tmp_path / "host")
    config = ClusterConfig(
        nodes=3,
        duration=9.0,
        clients=4,
        inflight=16,
        channels=64,
        p2p_count=50,
        install="dev",
        results_dir=tmp_path / "run",
        faults=["partition", "kill", "pause"],
        fault_interval=2.5,
        **FAST,
    )
    try:
        res = run_cluster([host], config)
    finally:
        host.close()
    assert [f["kind"] for f in res["faults"]] == ["partition", "kill", "pause"]
    assert [f["target"] for f in res["faults"]] == ["n0|n1,n2", "n0", "n0"]
    assert all(f["end_s"] > f["start_s"] > 0 for f in res["faults"])
    assert res["fault_errors"] == []
    assert res["acked"] > 0
    assert (res["lost"], res["duplicated"], res["reordered"]) == (0, 0, 0)
    assert res["replicas_checked"]
    assert res["check"]["ok"] == (res["violations"] == {})
    assert sum(row["acked"] for row in res["timeline"]) == res["acked"]
    during = res["availability"]["during_faults"]
    outside = res["availability"]["outside_faults"]
    assert during["ok"] + during["failed"] > 0
    assert outside["ok"] > 0
    links = res["links"]
    assert links["n0->n1"]["cut"] + links["n1->n0"]["cut"] > 0
    with pytest.raises(faults.FaultError, match="cannot inject 'poweroff'"):
        run_cluster([host], ClusterConfig(faults=["poweroff"]))
    # one order per channel under faults (issue 11): any violation fails
    assert res["violations"] == {}, res["check"]["examples"]
    assert res["check"]["ok"]
