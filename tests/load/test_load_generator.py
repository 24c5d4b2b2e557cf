"""Load generator, P2P scenario and the command-line tools against a live cluster."""

from __future__ import annotations

import asyncio
import csv
import json
import sqlite3
import threading

import pytest

from plexichat.load import checker, cli
from plexichat.load import journal as jr
from plexichat.load.generator import Generator, LoadConfig
from plexichat.load.report import CSV_HEADER, PERCENTILES
from plexichat.node.testing import InProcessCluster


class ThreadedCluster:
    """An in-process cluster on its own event loop thread (so CLIs can asyncio.run)."""

    def __init__(self, base, size=3):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cluster = InProcessCluster(base, size)
        self.call(self.cluster.start())

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    @property
    def secret_file(self) -> str:
        return str(self.cluster.secret_file())

    @property
    def tool_args(self) -> list[str]:
        return ["--nodes", self.nodes_arg, "--secret-file", self.secret_file]

    @property
    def nodes_arg(self) -> str:
        return ",".join(f"127.0.0.1:{n.listen_port}" for n in self.cluster.nodes)

    def close(self):
        self.call(self.cluster.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    cluster = ThreadedCluster(tmp_path_factory.mktemp("nodes"))
    yield cluster
    cluster.close()


def test_cli_chat_run_writes_json_csv_and_a_clean_journal(live, tmp_path, capsys):
    out, table, journal = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "j.bin"
    code = cli.main(
        [
            "--nodes",
            live.nodes_arg,
            "--secret-file",
            live.secret_file,
            "--clients",
            "4",
            "--inflight",
            "8",
            "--count",
            "2000",
            "--duration",
            "30",
            "--channels",
            "16",
            "--journal",
            str(journal),
            "--json",
            str(out),
            "--csv",
            str(table),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert (result["acked"], result["failures"], result["sent"]) == (2000, 0, 2000)
    assert result["throughput_msgs_per_s"] > 0
    assert set(result["locust"][0]["percentiles_ms"]) == {
        f"{q:g}%" for q in PERCENTILES
    }
    rows = list(csv.reader(table.read_text().splitlines()))
    assert rows[0] == CSV_HEADER
    assert rows[1][:4] == ["SEND", "chat", "2000", "0"]
    entries = list(jr.read(journal))
    assert len(entries) == 2000
    assert len({e.msg_id for e in entries}) == 2000
    # every sender's counters 1..n were all acknowledged
    senders = {e.sender for e in entries}
    assert len(senders) == 4
    code = checker.main([*live.tool_args, "--journal", str(journal), "--replicas"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (report["acked"], report["lost"], report["duplicated"]) == (2000, 0, 0)
    assert report["replica_missing"] == 0

    # plant a loss on the owner of one message: the checker exits 1
    victim = entries[0]
    for node in live.cluster.nodes:
        if node.owners(victim.channel)[0] == node.id:
            with sqlite3.connect(node.storage.path) as db:
                db.execute("DELETE FROM messages WHERE msg_id = ?", (victim.msg_id,))
    verdict = tmp_path / "check.json"
    code = checker.main(
        [*live.tool_args, "--journal", str(journal), "--json", str(verdict)]
    )
    assert code == 1
    assert json.loads(verdict.read_text())["lost"] == 1


def test_open_loop_zipf_through_any_node(live):
    config = LoadConfig(
        nodes=[("127.0.0.1", n.listen_port) for n in live.cluster.nodes],
        credentials=live.cluster.credentials,
        clients=3,
        mode="open",
        rate=2000,
        count=400,
        duration=20,
        channels=50,
        distribution="zipf",
        zipf_s=1.2,
        route="any",
        seed=7,
    )
    gen = Generator(config)
    picks = [gen.pick() for _ in range(5000)]
    assert picks.count(0) > picks.count(10) > 0  # Zipf: low ranks dominate
    result = asyncio.run(Generator(config).run())
    assert (result["acked"], result["failures"]) == (400, 0)
    assert result["route"] == "any"
    forwarded = sum(n.counters["forwarded"] for n in live.cluster.nodes)
    assert forwarded > 0


def test_duration_bounds_a_run(live):
    config = LoadConfig(
        nodes=[("127.0.0.1", n.listen_port) for n in live.cluster.nodes],
        credentials=live.cluster.credentials,
        clients=2,
        inflight=2,
        count=10**9,
        duration=0.3,
        channels=4,
    )
    result = asyncio.run(Generator(config).run())
    assert 0 < result["acked"] < 10**9
    assert result["acked"] == result["sent"]


def test_p2p_scenario_reaches_every_node(live, tmp_path, capsys):
    out = tmp_path / "p2p.json"
    code = cli.main(
        [
            "--nodes",
            live.nodes_arg,
            "--secret-file",
            live.secret_file,
            "--scenario",
            "p2p",
            "--count",
            "30",
            "--rate",
            "300",
            "--fanout",
            "1",
            "--json",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    assert capsys.readouterr().out == ""
    result = json.loads(out.read_text())
    assert result["coverage"] == 1.0
    assert result["deliveries"] == 90
    assert result["samples"] == 60  # the roots record no propagation latency
    assert 0 < result["p2p_latency_ms"]["p50"] <= result["p2p_latency_ms"]["p99"]


def test_tools_report_unreachable_nodes(tmp_path, capsys):
    jr.write(tmp_path / "j.bin", [])
    assert cli.main(["--nodes", "127.0.0.1:1", "--timeout", "1"]) == 2
    assert (
        checker.main(["--nodes", "127.0.0.1:1", "--journal", str(tmp_path / "j.bin")])
        == 2
    )
    assert cli.main(["--nodes", ","]) == 2
    err = capsys.readouterr().err
    assert "plexichat-load" in err
    assert "plexichat-check" in err


def offline_generator(channels: int) -> tuple[Generator, list[int], list, object]:
    """A generator on three fake connections (no sockets): node 0 owns every
    channel; ``sent`` records the node index of every SEND."""
    from plexichat.load.generator import _Client, _Conn

    config = LoadConfig(
        nodes=[("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3)],
        channels=channels,
        mode="open",
        detour=30.0,
    )
    gen = Generator(config)
    sent: list[int] = []
    conns = [_Conn(gen, i) for i in range(3)]
    for conn in conns:
        conn.send = lambda t, rid, body, i=conn.index: sent.append(i)
    client = _Client(
        1,
        [conns[0]] * channels,
        conns,
        route=[None] * channels,
        busy=[0] * channels,
        detour=[0] * channels,
        detour_until=[0.0] * channels,
        detour_s=config.detour,
    )
    gen.clients.append(client)
    return gen, sent, conns, client


def test_a_failed_channel_detours_through_the_next_node_then_returns():
    import time

    from plexichat import wire
    from plexichat.node import protocol as p

    async def scenario() -> None:
        gen, sent, conns, client = offline_generator(1)
        assert gen.issue(client)
        assert sent == [0]  # the owner's connection first
        (rid,) = conns[0].pending
        error = p.encode_error(p.ErrorCode.UNAVAILABLE, "replica: cut")
        gen.on_frames(conns[0], [wire.Frame(wire.MessageType.ERROR, rid, error)])
        # every message until the detour ends goes to the next node
        assert gen.issue(client)
        assert sent[-1] == 1
        (rid,) = conns[1].pending
        ack = p.ACK_BODY.pack(1, 1)
        gen.on_frames(conns[1], [wire.Frame(wire.MessageType.ACK, rid, ack)])
        assert gen.issue(client)
        assert sent[-1] == 1
        # a second failure moves it on again; once the detour is over the
        # channel is back on its owner
        (rid,) = conns[1].pending
        gen.on_frames(conns[1], [wire.Frame(wire.MessageType.ERROR, rid, error)])
        for conn in conns:
            conn.pending.clear()
        client.busy[0] = 0
        assert gen.issue(client)
        assert sent[-1] == 2
        conns[2].pending.clear()
        client.busy[0] = 0
        client.detour_until[0] = time.monotonic() - 1
        assert gen.issue(client)
        assert sent[-1] == 0
        # per-node counts: one failure on node 0 and node 1, one ack on node 1
        bucket = gen.tl_node[0]
        assert bucket == [[0, 1], [1, 1], [0, 0]]

    asyncio.run(scenario())


def test_a_node_that_stopped_answering_is_avoided_by_every_channel():
    import time

    async def scenario() -> None:
        gen, sent, conns, client = offline_generator(2)
        gen._mark_down(0)  # e.g. its requests timed out: it is paused
        for _ in range(6):
            assert gen.issue(client)
            for conn in conns:
                conn.pending.clear()
            client.busy = [0, 0]
        assert set(sent) == {1}
        gen.node_down[0] = gen.down_until = time.monotonic() - 1  # over
        assert gen.issue(client)
        assert sent[-1] == 0

    asyncio.run(scenario())
