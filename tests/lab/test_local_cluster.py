"""Local-process hosts and the full cluster run (nodes, load, P2P, checker)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from invoke.context import Context
from invoke.exceptions import Exit

from plexichat.load.checker import VIOLATIONS
from plexilab.cli import local as local_cli
from plexilab.host import HostError
from plexilab.providers.local import LocalHost, free_ports
from plexilab.run.cluster import (
    SRC,
    Cluster,
    ClusterConfig,
    prepare,
    run_cluster,
    run_lab,
    tail,
)
from plexilab.run.result import RunResult


def test_local_host_runs_spawns_and_copies(tmp_path):
    host = LocalHost("h1", workdir=tmp_path / "w", ports=3)
    try:
        assert host.workdir() == str(tmp_path / "w")
        assert host.python() == sys.executable
        eps = [host.listen_endpoint(i) for i in range(3)]
        assert len({e.port for e in eps}) == 3
        assert all(e.host == "127.0.0.1" for e in eps)
        assert host.lab_endpoint(1) == host.peer_endpoint(1, host) == eps[1]
        with pytest.raises(HostError):
            host.listen_endpoint(3)
        result = host.run(
            [sys.executable, "-c", "import os; print(os.getcwd())"], timeout=30
        )
        assert result.stdout.strip() == str(tmp_path / "w")
        failed = host.run(
            [sys.executable, "-c", "raise SystemExit(3)"], timeout=30, check=False
        )
        assert failed.returncode == 3
        with pytest.raises(HostError, match="exited 3"):
            failed.check()
        with pytest.raises(HostError, match="timed out"):
            host.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)
        with pytest.raises(HostError):
            host.run(["/nonexistent/binary"], timeout=5)
        src = tmp_path / "a.txt"
        src.write_text("hello")
        host.put(src, str(tmp_path / "w" / "sub" / "b.txt"))
        host.get(str(tmp_path / "w" / "sub" / "b.txt"), tmp_path / "c.txt")
        assert (tmp_path / "c.txt").read_text() == "hello"
        with pytest.raises(HostError):
            host.get(str(tmp_path / "missing"), tmp_path / "d.txt")
        # a spawned process is its own process group; stop() ends it
        code = "import sys, time; print('up', flush=True); time.sleep(60)"
        proc = host.spawn(
            [sys.executable, "-c", code],
            log_path=str(tmp_path / "p.log"),
            env={"X": "1"},
        )
        assert proc.alive()
        assert os.getpgid(proc.pid) == proc.pid
        while "up" not in (tmp_path / "p.log").read_text():
            assert proc.wait(0.02) is None
        assert proc.stop(timeout=5) == -signal.SIGTERM
        assert not proc.alive()
        proc.send_signal(signal.SIGTERM)  # no error once it is gone
        stubborn = host.spawn(
            [
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(60)",
            ],
            log_path=str(tmp_path / "s.log"),
        )
        while "ready" not in (tmp_path / "s.log").read_text():
            stubborn.wait(0.02)
        assert stubborn.stop(timeout=0.3) == -signal.SIGKILL
        with pytest.raises(HostError):
            host.spawn(["/nonexistent/binary"], log_path=str(tmp_path / "x.log"))
    finally:
        host.close()
    assert len(set(free_ports(5))) == 5


def expected_backend() -> str:
    """What every node must report under the environment this test runs in.

    ``PLEXICHAT_BACKEND=python`` (no per-family override): python; auto or
    unset on a build with every compiled extension: compiled; anything else:
    what ``plexichat.accel`` picks in a fresh process with the same environment.
    """
    wanted = os.environ.get("PLEXICHAT_BACKEND", "").strip().lower() or "auto"
    overrides = [
        k for k, v in os.environ.items() if k.startswith("PLEXICHAT_BACKEND_") and v
    ]
    code = "from plexichat import accel; print(accel.summary())"
    if not overrides and wanted == "python":
        return "python"
    if not overrides and wanted == "auto":
        code = (
            "from plexichat import accel; "
            "print('compiled' if all(accel.available(f)[0] == 'cython' "
            "for f in accel.FAMILIES) else accel.summary())"
        )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_backend_follows_the_lab_environment(monkeypatch):
    for key in [k for k in os.environ if k.startswith("PLEXICHAT_BACKEND")]:
        monkeypatch.delenv(key)
    assert ClusterConfig().backend_env() == {"PLEXICHAT_BACKEND": "auto"}
    assert ClusterConfig().requested_backend == "auto"
    monkeypatch.setenv("PLEXICHAT_BACKEND", "python")
    monkeypatch.setenv("PLEXICHAT_BACKEND_WIRE", "cython")
    config = ClusterConfig()
    assert config.backend_env() == {
        "PLEXICHAT_BACKEND": "python",
        "PLEXICHAT_BACKEND_WIRE": "cython",
    }
    assert config.requested_backend == "python (wire=cython)"
    # an explicit backend wins over the environment, overrides included
    explicit = ClusterConfig(backend="auto")
    assert explicit.backend_env() == {
        "PLEXICHAT_BACKEND": "auto",
        "PLEXICHAT_BACKEND_WIRE": "",
    }
    assert explicit.requested_backend == "auto"


def test_run_lab_kills_the_group_on_timeout():
    import subprocess

    with pytest.raises(subprocess.TimeoutExpired):
        run_lab(
            [sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.3, env={}
        )
    done = run_lab([sys.executable, "-c", "print('x')"], timeout=30, env={"A": "1"})
    assert (done.returncode, done.stdout) == (0, "x\n")


def test_cluster_run_reports_zero_loss_and_stops_every_node(tmp_path):
    host = LocalHost(workdir=tmp_path / "host")
    config = ClusterConfig(
        nodes=3,
        duration=1.5,
        clients=4,
        inflight=16,
        channels=32,
        p2p_count=20,
        p2p_rate=200,
        check_replicas=True,
        install="dev",
        results_dir=tmp_path / "run",
        gossip_interval=0.1,
    )
    try:
        res = run_cluster([host], config)
    finally:
        host.close()
    assert res["nodes"] == 3
    assert res["security"] == "auth"  # the default: never an open cluster
    assert res["acked"] > 0
    assert (res["lost"], res["duplicated"], res["reordered"]) == (0, 0, 0)
    # no faults: every request answered, every checker count 0, replicas too
    assert res["failures"] == 0
    assert res["replicas_checked"]
    assert res["violations"] == {}, res["check"]["examples"]
    assert res["check"]["replica_missing"] == 0
    assert res["throughput_msgs_per_s"] > 0
    assert (
        0
        < res["latency_ms"]["p50"]
        <= res["latency_ms"]["p99"]
        <= res["latency_ms"]["p99.9"]
    )
    assert res["convergence_s"] > 0
    assert res["p2p_coverage"] == 1.0
    assert res["p2p_latency_ms"]["p50"] > 0
    # the nodes run what the environment asked for (the nox python pass too)
    backend = expected_backend()
    assert res["backend"] == backend
    assert [n["backend"] for n in res["per_node"]] == [backend] * 3
    assert set(res["host_backends"].values()) == {backend}
    assert set(res["host_backends"]) == {"local"}
    assert len(res["per_node"]) == 3
    assert sum(n["counters"]["acked"] for n in res["per_node"]) == res["acked"]
    assert (tmp_path / "run" / "load.csv").exists()
    assert all(not p.alive() for p in host.processes) or not host.processes
    for row in res["per_node"]:
        with pytest.raises(ProcessLookupError):
            os.kill(row["pid"], 0)


def test_invoke_task_writes_json_and_table(tmp_path, monkeypatch, capsys):
    out = tmp_path / "res.json"
    local_cli.cluster(
        Context(),
        nodes=3,
        duration=1.0,
        json=str(out),
        install="dev",
        clients=2,
        inflight=8,
        gossip_interval=0.1,
        p2p_count=10,
        results=str(tmp_path / "r"),
    )
    doc = json.loads(out.read_text())
    assert doc["lost"] == 0
    printed = capsys.readouterr().out
    assert "throughput" in printed
    with pytest.raises(Exit):
        local_cli.cluster(Context(), backend="numba")
    with pytest.raises(Exit):
        local_cli.cluster(Context(), install="docker")
    with pytest.raises(Exit, match="'auth', 'tls'"):
        local_cli.cluster(Context(), security="insecure")


def test_tail_of_a_missing_log(tmp_path):
    from plexilab.host import Endpoint
    from plexilab.run.cluster import NodeHandle

    host = LocalHost(workdir=tmp_path)
    ep = Endpoint("127.0.0.1", 1)
    node = NodeHandle(
        0, "n0", host, 0, ep, ep, ep, str(tmp_path), str(tmp_path / "none")
    )
    assert tail(node) == "(no log)"


def fake_result(throughput: float = 100.0, **violations: int) -> RunResult:
    """A cluster result as the pipeline returns it (checker counts all 0 unless
    given as *violations*)."""
    counts = {k: violations.get(k, 0) for k in VIOLATIONS}
    return RunResult.from_dict({
        "nodes": 3, "replicas": 2, "acked": 10, "failures": 0, **counts,
        "replicas_checked": True, "violations": {k: v for k, v in counts.items() if v},
        "backend": "compiled", "throughput_msgs_per_s": throughput,
        "convergence_s": 0.1, "latency_ms": {"p50": 1.0, "p99": 2.0, "p99.9": 3.0},
        "p2p_latency_ms": {"p50": 1.0, "p99": 2.0}, "p2p_coverage": 1.0,
    })  # fmt: skip


def test_bench_reports_the_median_ratio(tmp_path, monkeypatch, capsys):
    speeds = iter([300.0, 100.0, 200.0, 100.0, 100.0, 100.0])
    seen = []

    def fake_run(config):
        seen.append(config.backend)
        result = fake_result(next(speeds))
        result.backend = "compiled" if config.backend == "auto" else "python"
        return result

    monkeypatch.setattr(local_cli, "_run", fake_run)
    out = tmp_path / "bench.json"
    local_cli.bench(Context(), rounds=3, json=str(out), results=str(tmp_path))
    assert seen == ["auto", "python"] * 3
    doc = json.loads(out.read_text())
    assert (doc["compiled"], doc["python"], doc["ratio"]) == (200.0, 100.0, 2.0)
    assert "ratio 2.00x" in capsys.readouterr().out


def test_prune_keeps_the_newest_cache_entries(tmp_path):
    from plexilab.run.cluster import prune

    for age, name in enumerate(["new", "mid", "old"]):
        entry = tmp_path / name
        entry.mkdir()
        os.utime(entry, (1_000_000 - age, 1_000_000 - age))
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid", "new"]
    prune(tmp_path / "missing")


@pytest.mark.parametrize(
    "violation", ["shared_seq", "seq_mismatch", "gaps", "replica_missing", "divergence"]
)
def test_every_checker_violation_fails_the_run(violation, monkeypatch, capsys):
    """Two messages at one seq or replicas that disagree fail the task like a
    lost message does (they used to be informational)."""
    monkeypatch.setattr(local_cli, "_run", lambda config: fake_result(**{violation: 3}))
    with pytest.raises(Exit) as info:
        local_cli.cluster(Context(), duration=1)
    assert info.value.code == 1
    assert f"3 {violation.replace('_', ' ')}" in str(info.value)
    monkeypatch.setattr(local_cli, "_run", lambda config: fake_result())
    local_cli.cluster(Context(), duration=1)  # all 0: passes
    out = capsys.readouterr().out
    assert "misplaced / shared seq / gaps" in out
    assert "replica missing / divergence" in out
    monkeypatch.setattr(local_cli, "_run", lambda config: fake_result(**{violation: 1}))
    with pytest.raises(Exit):
        local_cli.bench(Context(), rounds=1)


def test_each_run_gets_its_own_secret_delivered_privately(tmp_path):
    host = LocalHost(workdir=tmp_path / "host")
    runtime = prepare([host], "dev")
    try:
        with Cluster([host], ClusterConfig(nodes=2), runtime) as first:
            node = first.nodes[0]
            first.deliver_secret(host)
            path = Path(first.host_secret(host))
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert first.secret is not None
            assert path.read_text().strip() == first.secret.hex()
            argv = first.node_argv(node)
            assert argv[argv.index("--secret-file") + 1] == str(path)
            assert "--insecure" not in argv
            assert first.tool_secret_args() == ["--secret-file", str(first.secret_file)]
            lab_copy = first.secret_file
            assert stat.S_IMODE(lab_copy.stat().st_mode) == 0o600
            with Cluster([host], ClusterConfig(nodes=2), runtime) as second:
                assert second.secret != first.secret
        assert not lab_copy.exists()  # the lab's copy goes with the run
    finally:
        host.close()


def test_tls_and_insecure_runs_pass_their_own_arguments(tmp_path):
    host = LocalHost(workdir=tmp_path / "host")
    runtime = prepare([host], "dev")
    try:
        with Cluster([host], ClusterConfig(nodes=2, security="tls"), runtime) as tls:
            assert tls.tls is not None
            argv = tls.node_argv(tls.nodes[1])
            listen = argv[argv.index("--tls-listen") + 1]
            assert listen == f"127.0.0.1:{tls.tls_ports[1]}"
            assert argv[argv.index("--tls-key") + 1] == str(tls.tls.key)
            load = tls.load_endpoints()
            assert load["tls_ca"] == str(tls.tls.ca)
            assert str(tls.tls_ports[0]) in load["nodes"]
        config = ClusterConfig(nodes=2, security="insecure")
        with Cluster([host], config, runtime) as open_:
            assert open_.secret is None
            assert "--insecure" in open_.node_argv(open_.nodes[0])
            assert "--secret-file" not in open_.node_argv(open_.nodes[0])
            assert open_.tool_secret_args() == []
    finally:
        host.close()


def test_bench_security_prices_auth_and_tls(tmp_path, monkeypatch, capsys):
    speeds = {"insecure": iter([100.0, 120.0, 110.0]), "auth": iter([95.0] * 3)}
    speeds["tls"] = iter([80.0, 90.0, 70.0])
    seen = []

    def fake_run(config):
        seen.append(config.security)
        return fake_result(next(speeds[config.security]))

    monkeypatch.setattr(local_cli, "_run", fake_run)
    out = tmp_path / "sec.json"
    local_cli.bench_security(Context(), rounds=3, json=str(out))
    assert seen == ["insecure", "auth", "tls"] * 3
    medians = json.loads(out.read_text())["medians"]
    assert medians["insecure"]["msgs_per_s"] == 110.0
    assert medians["auth"]["ratio"] == pytest.approx(95 / 110)
    assert medians["tls"]["ratio"] == pytest.approx(80 / 110)
    assert "security cost" in capsys.readouterr().out
