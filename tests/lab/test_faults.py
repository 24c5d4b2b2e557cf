"""Fault plans, availability accounting and the lab link layer (no nodes)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

import pytest

from plexilab.host import Endpoint
from plexilab.infra.links import LinkLayer, source_address
from plexilab.proc import wait_until
from plexilab.providers.local import LocalHost
from plexilab.run import faults


def test_parse_kinds_default_none_and_clear_errors():
    local = faults.supported([LocalHost])
    assert local == ["partition", "kill", "pause", "split"]
    assert faults.parse_kinds("default", local, "local") == local
    assert faults.parse_kinds("none", local, "local") == []
    assert faults.parse_kinds("", local, "local") == []
    assert faults.parse_kinds(" kill, partition,kill", local, "local") == [
        "kill",
        "partition",
    ]
    with pytest.raises(faults.FaultError, match="local provider cannot inject"):
        faults.parse_kinds("partition,poweroff", local, "local")
    with pytest.raises(faults.FaultError, match="unknown fault kind 'flood'"):
        faults.parse_kinds("flood", local, "local")


def test_cli_rejects_poweroff_on_local_before_starting_anything(tmp_path):
    from invoke.context import Context
    from invoke.exceptions import Exit

    from plexilab.cli import local as local_cli

    with pytest.raises(Exit, match="cannot inject 'poweroff'") as info:
        local_cli.cluster(Context(), faults="poweroff", results=str(tmp_path))
    assert info.value.code == 2
    assert not any(tmp_path.iterdir())


def test_availability_splits_buckets_by_fault_windows():
    timeline = [
        {"t_s": 1.0, "acked": 100, "failed": 0},
        {"t_s": 2.0, "acked": 10, "failed": 40},  # middle 1.5: inside 1.2..3.0
        {"t_s": 3.0, "acked": 20, "failed": 30},  # middle 2.5: inside
        {"t_s": 4.0, "acked": 90, "failed": 5},
    ]
    windows = [{"kind": "kill", "target": "n0", "start_s": 1.2, "end_s": 3.0}]
    out = faults.availability(timeline, windows)
    assert out["during_faults"]["ok"] == 30
    assert out["during_faults"]["failed"] == 70
    assert out["during_faults"]["seconds"] == 2.0
    assert out["outside_faults"]["ok"] == 190
    assert out["outside_faults"]["failed"] == 5
    assert out["outside_faults"]["acked_per_s"] == 95.0
    assert out["during_kill"] == out["during_faults"]
    none = faults.availability(timeline, [])
    assert none["during_faults"]["ok"] == 0
    assert none["outside_faults"]["ok"] == 220


def test_healthy_side_and_service_use_the_per_node_counts():
    # node 0 is cut off from 1.0 to 4.0; requests to nodes 1 and 2 fail in
    # the first second of the partition (detection), then succeed
    timeline = [
        {"t_s": 1.0, "acked": 90, "failed": 0, "by_node": [[30, 0]] * 3},
        {"t_s": 2.0, "acked": 10, "failed": 60, "by_node": [[0, 20], [5, 20], [5, 20]]},
        {"t_s": 3.0, "acked": 80, "failed": 10, "by_node": [[0, 10], [40, 0], [40, 0]]},
        {"t_s": 4.0, "acked": 81, "failed": 9, "by_node": [[1, 9], [40, 0], [40, 0]]},
        {"t_s": 5.0, "acked": 90, "failed": 0, "by_node": [[30, 0]] * 3},
    ]
    windows = [
        {"kind": "partition", "nodes": [0], "start_s": 1.0, "end_s": 4.0},
    ]
    out = faults.availability(timeline, windows)
    side = out["during_partition_healthy_side"]
    assert (side["ok"], side["failed"]) == (170, 40)
    assert out["during_partition"]["ok"] == 171
    rows = faults.service(timeline, windows)
    assert rows == [
        {
            "kind": "partition",
            "nodes": [0],
            "start_s": 1.0,
            "healthy_ok": 170,
            "healthy_failed": 40,
            "healthy_ok_share": round(170 / 210, 4),
            "served_after_s": 2.0,
        }
    ]
    # never served within the window: None, not a number
    bad = [dict(r, by_node=[[0, 5], [0, 5], [0, 5]]) for r in timeline]
    assert faults.service(bad, windows)[0]["served_after_s"] is None
    # a timeline without per-node counts has no healthy-side entry
    plain = [{k: v for k, v in r.items() if k != "by_node"} for r in timeline]
    assert "during_partition_healthy_side" not in faults.availability(plain, windows)


@dataclass
class _Node:
    index: int
    node_id: str


@dataclass
class FakeCluster:
    """Records what a nemesis asks for."""

    size: int
    calls: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = [_Node(i, f"n{i}") for i in range(self.size)]

    def kill(self, i: int) -> None:
        self.calls.append(("kill", i))

    def restart(self, i: int) -> None:
        self.calls.append(("restart", i))

    def pause(self, i: int) -> None:
        self.calls.append(("pause", i))

    def resume(self, i: int) -> None:
        self.calls.append(("resume", i))


class FakeNetwork:
    def __init__(self) -> None:
        self.calls: list[object] = []

    def partition(self, *groups: list[int]) -> int:
        self.calls.append([sorted(g) for g in groups])
        return 0

    def heal(self) -> None:
        self.calls.append("heal")


def test_nemesis_plan_rotates_kinds_and_targets():
    nemesis = faults.Nemesis(
        FakeCluster(5),  # type: ignore[arg-type]
        ["partition", "split", "kill"],
        interval=1.0,
        horizon=10.0,
        network=FakeNetwork(),
    )
    plans = [nemesis.plan(i) for i in range(7)]
    assert plans == [
        ("partition", [0]),
        ("split", [0, 1]),  # minority of 5: two nodes
        ("kill", [0]),
        ("partition", [1]),
        ("split", [1, 2]),
        ("kill", [1]),
        ("partition", [2]),
    ]
    assert nemesis.duration == 0.5
    with pytest.raises(faults.FaultError, match="healed before the next"):
        faults.Nemesis(FakeCluster(3), ["kill"], interval=1.0, duration=1.0, horizon=5)  # type: ignore[arg-type]
    with pytest.raises(faults.FaultError, match="network layer"):
        faults.Nemesis(FakeCluster(3), ["partition"], interval=1.0, horizon=5)  # type: ignore[arg-type]


def test_nemesis_applies_heals_and_stops_healed():
    cluster, network = FakeCluster(3), FakeNetwork()
    nemesis = faults.Nemesis(
        cluster,  # type: ignore[arg-type]
        ["kill", "partition", "pause"],
        interval=0.2,
        duration=0.1,
        horizon=0.75,
        network=network,
        first=0.05,
    ).start()
    thread = nemesis._thread
    assert wait_until(lambda: thread is None or not thread.is_alive(), 10, 0.02)
    nemesis.stop()
    # slots at 0.05, 0.25, 0.45, 0.65 (the last heals at 0.75 = the horizon)
    assert [f.kind for f in nemesis.faults] == ["kill", "partition", "pause", "kill"]
    assert cluster.calls == [
        ("kill", 0),
        ("restart", 0),
        ("pause", 0),
        ("resume", 0),
        ("kill", 1),
        ("restart", 1),
    ]
    assert network.calls == [[[0], [1, 2]], "heal"]
    rows = nemesis.timeline(nemesis.started_at)
    assert all(r["end_s"] is not None and r["end_s"] > r["start_s"] for r in rows)
    assert rows[0]["target"] == "n0"
    assert rows[1]["target"] == "n0|n1,n2"
    assert nemesis.errors == []


def test_nemesis_stop_heals_the_fault_in_progress():
    cluster = FakeCluster(3)
    nemesis = faults.Nemesis(
        cluster,  # type: ignore[arg-type]
        ["pause"],
        interval=20.0,
        horizon=60.0,
        first=0.0,
    ).start()
    assert wait_until(lambda: bool(cluster.calls), 10, 0.01)
    nemesis.stop()
    assert cluster.calls == [("pause", 0), ("resume", 0)]
    assert nemesis.faults[0].end is not None


# -- the link layer -----------------------------------------------------------------


@pytest.fixture
def echo_server():
    """A threaded TCP echo server on 127.0.0.1 (the "node")."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield Endpoint("127.0.0.1", server.getsockname()[1])
    stop.set()
    thread.join(5)
    server.close()


def _connect(ep: Endpoint, source: str | None) -> socket.socket:
    src = (source, 0) if source else None
    sock = socket.create_connection((ep.host, ep.port), timeout=5, source_address=src)
    return sock


def _roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _refused(ep: Endpoint, source: str) -> bool:
    """True when the relay closes a new connection before relaying anything."""
    try:
        sock = _connect(ep, source)
        sock.sendall(b"ping")
        data = sock.recv(10)
    except OSError:
        return True
    sock.close()
    return data == b""


def test_link_layer_relays_refuses_cuts_and_heals(echo_server):
    with LinkLayer([echo_server] * 3) as links:
        assert links.sources == [source_address(i) for i in range(3)]
        to_n1 = links.endpoints[1]
        a = _connect(to_n1, source_address(0))
        assert _roundtrip(a, b"hello") == b"hello"
        lab = _connect(to_n1, None)  # not a node: never blocked
        c = _connect(links.endpoints[2], source_address(0))
        assert _roundtrip(c, b"x" * 100_000) == b"x" * 100_000
        counters = links.counters()
        assert counters[(0, 1)].bytes_out == counters[(0, 1)].bytes_in == 5
        assert counters[(0, 2)].bytes_out == 100_000
        assert links.traffic(0, 1) == 10

        assert links.isolate(0) == 2  # both of n0's live connections cut
        assert (1, 0) in links.blocked
        assert (0, 2) in links.blocked
        a.settimeout(5)
        assert a.recv(10) == b""  # the live connection was cut
        assert _refused(to_n1, source_address(0))  # a new one too
        assert _roundtrip(lab, b"still") == b"still"
        n2 = _connect(to_n1, source_address(2))  # n2 -> n1 is not affected
        assert _roundtrip(n2, b"ok") == b"ok"
        assert links.traffic(0, 1) == 10  # nothing crossed while partitioned
        snap = links.counters()
        assert snap[(0, 1)].refused == 1
        assert snap[(0, 1)].cut == 1

        links.heal()
        d = _connect(to_n1, source_address(0))
        assert _roundtrip(d, b"again") == b"again"
        assert links.traffic(0, 1) == 20
        for s in (a, lab, c, n2, d):
            s.close()
    assert links.endpoints  # closed cleanly (the context manager)
