"""``invoke qemu.cluster``: planning, clocks, VM samples, fallback, and real guests.

The tests marked ``qemu`` boot guests (TCG): a 3-node mixed-arch run with a
short load that must lose nothing, and an interrupted run that must leave no
QEMU behind.  The others run anywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from invoke.context import Context
from invoke.exceptions import Exit

from plexilab.guest import clock as clock_server
from plexilab.host import Endpoint
from plexilab.infra.machine import ResourceSample
from plexilab.providers import clock, guests
from plexilab.providers.base import Phases
from plexilab.providers.vmsampler import VmSampler
from plexilab.run import pipeline
from plexilab.run import qemu as qc
from plexilab.run.histograms import by_arch, hist_summary
from plexilab.run.result import RunResult

F = TypeVar("F", bound=Callable[..., Any])


def qemu_test(fn: F) -> F:
    """Mark a test that boots guests (and bound it when pytest-timeout is there)."""
    fn = pytest.mark.usefixtures("qemu_ready")(pytest.mark.qemu(fn))
    if importlib.util.find_spec("pytest_timeout") is not None:
        fn = pytest.mark.timeout(1800)(fn)
    return fn


# -- planning --------------------------------------------------------------------------


def test_mixed_nodes_cycle_one_x86_and_two_arm() -> None:
    assert qc.node_arches(3, "mixed") == ["x86_64", "aarch64", "aarch64"]
    assert qc.node_arches(5, "mixed") == [
        "x86_64", "aarch64", "aarch64", "x86_64", "aarch64",
    ]  # fmt: skip
    assert qc.node_arches(2, "aarch64") == ["aarch64", "aarch64"]


@pytest.mark.parametrize(
    "bad",
    [{"arch": "riscv64"}, {"fallback": "maybe"}, {"nodes": 0}, {"backend": "jit"}],
)
def test_options_reject_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must"):
        qc.QemuClusterOptions(**bad)


def test_guest_specs_one_guest_per_node_with_its_arch_wheelhouse(
    tmp_path: Path,
) -> None:
    artifacts = {
        a: (tmp_path / f"{a}.whl", tmp_path / f"house-{a}")
        for a in ("x86_64", "aarch64")
    }
    options = qc.QemuClusterOptions(nodes=4, port_base=7200, name_prefix="t-")
    specs = qc.guest_specs(options, artifacts)
    assert [s.arch for s in specs] == ["x86_64", "aarch64", "aarch64", "x86_64"]
    assert [s.nodes for s in specs] == [[0], [1], [2], [3]]
    assert len({s.name for s in specs}) == 4
    assert all(s.name.startswith("t-") for s in specs)
    assert all(s.extra_ports == [qc.clock_port(7200)] for s in specs)
    assert qc.clock_port(7200) not in range(7200, 7204)
    assert [s.wheelhouse for s in specs] == [artifacts[s.arch][1] for s in specs]
    config = options.cluster_config(tmp_path)
    assert (config.nodes, config.install, config.results_dir) == (4, "wheel", tmp_path)


def test_phases_accumulate_and_lap() -> None:
    phases = Phases()
    with phases("a"):
        time.sleep(0.01)
    time.sleep(0.01)
    phases.lap("b")
    with phases("a"):
        pass
    assert list(phases.seconds) == ["a", "b"]
    assert phases.seconds["a"] >= 0.01
    assert phases.seconds["b"] >= 0.01
    assert phases.total() >= phases.seconds["a"] + phases.seconds["b"]


# -- clocks (read-only against a local clock server: never set the host clock) ---------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_clock_reading_against_the_same_clock_is_near_zero() -> None:
    port = _free_port()
    # the source the lab ships (importlib.resources), run stand-alone with -I
    source = clock.server_source()
    assert source == Path(clock_server.__file__).read_text()
    server = subprocess.Popen([sys.executable, "-I", "-c", source, str(port)])
    try:
        with clock.connect_clock(Endpoint("127.0.0.1", port), timeout=30) as sock:
            reading = clock.read_clock(sock, rounds=5)
        assert reading.rtt_ns > 0
        assert abs(reading.offset_ns) <= max(reading.rtt_ns, 5_000_000)
        report = clock.measure_clock(Endpoint("127.0.0.1", port))
        assert set(report) == {"offset_ms", "rtt_ms"}
    finally:
        server.kill()
        server.wait()


# -- VM samples and histograms ---------------------------------------------------------


class FakeMachine:
    def __init__(self, name: str, samples: list[tuple[float, float, float, int]]):
        self.name = name
        self._samples = iter(samples)

    def resources(self) -> ResourceSample:
        t, vcpu, cpu, rss = next(self._samples)
        return ResourceSample(t, (vcpu,), cpu, rss)


def test_vm_sampler_summarises_the_load_window() -> None:
    m = FakeMachine(
        "g0",
        [(0.0, 1.0, 2.0, 100 << 20), (10.0, 2.0, 3.5, 200 << 20),
         (20.0, 7.0, 9.0, 300 << 20)],
    )  # fmt: skip
    sampler = VmSampler([m])  # type: ignore[list-item]
    sampler.sample("start")
    sampler.sample("converged")
    sampler.sample("loaded")
    summary = sampler.summary("g0")
    assert summary["samples"] == 3
    assert summary["load_vcpu_s"] == 5.0
    assert summary["load_qemu_cpu_s"] == 5.5
    assert summary["load_vcpu_util"] == 0.5
    assert summary["rss_mib_before_load"] == 200.0
    assert summary["rss_mib_max"] == 300.0
    assert summary["qemu_cpu_s"] == 9.0
    assert VmSampler([]).summary("nobody") == {}


def test_latency_by_arch_merges_node_histograms() -> None:
    from plexichat.stats import Histogram

    def hist(values: list[int]) -> Histogram:
        h = Histogram()
        h.record_many(values)
        return h

    hists = [
        {"send": hist([1000] * 10)},
        {"send": hist([3000] * 10)},
        {"send": hist([5000] * 30)},
        {},  # a node that did not answer
    ]
    out = by_arch(["x86_64", "aarch64", "aarch64", "x86_64"], hists, "send")
    assert out["x86_64"]["nodes"] == 2
    assert out["x86_64"]["count"] == 10
    assert out["x86_64"]["p50"] == pytest.approx(1.0, rel=0.01)
    assert out["aarch64"]["count"] == 40
    assert out["aarch64"]["p50"] == pytest.approx(5.0, rel=0.01)
    assert out["aarch64"]["p99"] >= out["aarch64"]["p50"]
    assert hist_summary(None) == {"count": 0}


# -- degrading -------------------------------------------------------------------------


def test_failed_lists_checker_findings_and_leftovers() -> None:
    assert qc.failed(RunResult(violations={}, leftover_qemu_pids=[])) == []
    reasons = qc.failed(
        RunResult(violations={"lost": 2, "duplicated": 1}, leftover_qemu_pids=[9])
    )
    assert len(reasons) == 3
    # two messages at one seq and replicas that disagree fail the run too
    reasons = qc.failed(RunResult(violations={"shared_seq": 4, "divergence": 2}))
    assert reasons == ["4 shared seq", "2 divergence"]


def test_cli_rejects_bad_options_before_doing_anything() -> None:
    from plexilab.cli import qemu as cli

    with pytest.raises(Exit) as info:
        cli.cluster(Context(), arch="riscv64")
    assert info.value.code == 2


def test_without_qemu_and_fallback_none_the_task_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from plexilab.cli import qemu as cli

    monkeypatch.setattr(guests, "qemu_unavailable", lambda arches: "no qemu (test)")
    with pytest.raises(Exit) as info:
        cli.cluster(Context(), fallback="none")
    assert info.value.code == 1
    assert "no qemu (test)" in str(info.value.message)


def test_without_qemu_the_run_falls_back_to_local_and_records_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(guests, "qemu_unavailable", lambda arches: "no qemu (test)")
    options = qc.QemuClusterOptions(
        nodes=3,
        duration=1.0,
        channels=32,
        p2p_count=20,
        p2p_rate=200.0,
        gossip_interval=0.1,
        ping_timeout=0.5,
        suspect_timeout=3.0,
        results=tmp_path / "run",
        install="dev",
    )
    res = qc.run(options).to_dict()
    assert res["provider"] == "local"
    assert res["fallback_reason"] == "no qemu (test)"
    assert res["acked"] > 0
    assert (res["lost"], res["duplicated"], res["reordered"]) == (0, 0, 0)
    # no faults: every request answered, every checker count 0, replicas too
    assert res["failures"] == 0
    assert res["replicas_checked"]
    assert res["violations"] == {}, res["check"]["examples"]
    assert res["guests"] == []
    assert set(res["latency_by_arch"]) == {os.uname().machine}
    assert {"load", "p2p", "check", "convergence"} <= set(res["phases_s"])
    assert res["phases_s"]["teardown"] >= 0


def test_guests_that_do_not_boot_fall_back_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from plexilab.infra import images, machine

    class BrokenLab:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.machines: list[Any] = []
            self.hosts: list[Any] = []
            self.closed = False

        def start(self) -> None:
            raise machine.MachineError("g0: no SSH within 180 s (test)")

        def close(self) -> None:
            self.closed = True

    labs: list[BrokenLab] = []

    def make_lab(*args: Any, **kwargs: Any) -> BrokenLab:
        labs.append(BrokenLab())
        return labs[-1]

    monkeypatch.setattr(guests, "qemu_unavailable", lambda arches: None)
    monkeypatch.setattr(
        guests, "ensure_artifacts", lambda a, **kw: (tmp_path, tmp_path)
    )
    monkeypatch.setattr(images, "images_for", lambda arches: [])
    monkeypatch.setattr(qc, "QemuLab", make_lab)
    calls: list[str] = []
    monkeypatch.setattr(
        qc, "run_local", lambda options, reason, **kw: calls.append(reason) or {}
    )
    qc.run(qc.QemuClusterOptions(results=tmp_path, install="dev"))
    assert len(calls) == 1
    assert "did not boot" in calls[0]
    assert "no SSH within 180 s (test)" in calls[0]
    assert labs[0].closed
    with pytest.raises(qc.QemuUnavailable, match="did not boot"):
        qc.run(qc.QemuClusterOptions(results=tmp_path, fallback="none", install="dev"))


# -- real guests -----------------------------------------------------------------------


def _our_qemus(prefix: str) -> list[str]:
    out = subprocess.run(
        ["pgrep", "-a", "-f", "qemu-system-"], capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if f"-name {prefix}" in line]


@pytest.fixture
def prefix() -> str:
    return f"t{os.getpid() % 100000}-"


@pytest.fixture
def qemu_ready(skips) -> None:
    from plexilab.infra import setup_host

    skips.setup("QEMU host set-up", setup_host.ensure)


@qemu_test
def test_three_mixed_guests_lose_nothing_and_leave_nothing(
    tmp_path: Path, prefix: str
) -> None:
    options = qc.QemuClusterOptions(
        nodes=3,
        arch="mixed",
        duration=6.0,
        p2p_count=60,
        results=tmp_path / "run",
        fallback="none",
        name_prefix=prefix,
    )
    res = qc.run(options).to_dict()
    json.dumps(res)  # the result is JSON as it is
    assert res["provider"] == "qemu"
    assert res["fallback_reason"] is None
    assert res["acked"] > 0
    assert (res["lost"], res["duplicated"], res["reordered"]) == (0, 0, 0)
    # no faults: every request answered, every checker count 0, replicas too
    assert res["failures"] == 0
    assert res["replicas_checked"]
    assert res["violations"] == {}, res["check"]["examples"]
    assert res["p2p_coverage"] == 1.0
    assert [n["arch"] for n in res["per_node"]] == ["x86_64", "aarch64", "aarch64"]
    for node in res["per_node"]:
        assert node["boot_s"] > 0
        assert node["accel"] in ("tcg", "kvm")
        vm = node["vm"]
        assert vm["qemu_cpu_s"] >= vm["vcpu_s"] > 0
        assert vm["load_vcpu_s"] > 0
        assert vm["rss_mib_max"] > 64
        assert node["send_latency_ms"]["count"] > 0
        assert abs(node["clock"]["offset_ms"]) < 50
    by_arch = res["latency_by_arch"]
    assert set(by_arch) == {"x86_64", "aarch64"}
    assert by_arch["aarch64"]["nodes"] == 2
    assert sum(a["count"] for a in by_arch.values()) == res["acked"]
    assert set(res["p2p_latency_by_arch"]) == {"x86_64", "aarch64"}
    assert {
        "setup", "artifacts", "boot", "install", "host_check", "node_start",
        "convergence", "load", "p2p", "check", "teardown",
    } <= set(res["phases_s"])  # fmt: skip
    assert res["leftover_qemu_pids"] == []
    assert _our_qemus(prefix) == []
    assert sorted(p.name for p in (tmp_path / "run" / "nodes").iterdir()) == [
        "n0.log", "n1.log", "n2.log",
    ]  # fmt: skip


@qemu_test
def test_an_interrupted_run_powers_every_guest_off(
    tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []

    def interrupted(job: Any, hosts: Any, *args: Any, **kwargs: Any) -> None:
        seen.extend(h.machine.pid for h in hosts)
        assert _our_qemus(prefix)  # the guests run right now
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._Run, "on_hosts", interrupted)
    options = qc.QemuClusterOptions(
        nodes=1, arch="x86_64", results=tmp_path, fallback="none", name_prefix=prefix
    )
    with pytest.raises(KeyboardInterrupt):
        qc.run(options)
    assert len(seen) == 1
    assert guests.leftover_pids(seen, timeout=5) == []
    assert _our_qemus(prefix) == []


@pytest.mark.parametrize("name", ["cluster", "p2p"])
def test_every_task_option_has_help_and_a_type(name: str) -> None:
    from plexilab.cli import qemu as cli

    task = cli.qemu.tasks[name]
    args = {a.name: a for a in task.get_arguments()}
    assert not [n for n, a in args.items() if not a.help]
    assert args["nodes"].kind is int
    assert args["arch"].default == "mixed"
    assert args["fallback"].default == "local"
