"""The typed run result, its checked-in JSON schema, and the one run pipeline.

The schema file is generated from the dataclasses (``python -m
plexilab.run.result``); a real local run's JSON -- the chat run and the P2P
scenario alone -- must validate against the checked-in file.  The validator
below is a small subset of JSON Schema (type, enum, const, properties,
required, additionalProperties, items, anyOf, $ref): what the generator emits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from plexilab.host import Host
from plexilab.providers import base
from plexilab.providers.base import (
    Capabilities,
    Phases,
    Provider,
    Sampler,
    capabilities_of,
)
from plexilab.providers.container import CONTAINERS, ContainerHost
from plexilab.providers.docker_in_guests import DOCKER_IN_GUESTS, GuestContainerHost
from plexilab.providers.inventory import INVENTORY, InventoryHost
from plexilab.providers.local import LOCAL, LocalHost, LocalProvider
from plexilab.providers.qemu import QEMU, QemuHost
from plexilab.run import faults, pipeline
from plexilab.run.config import ClusterConfig
from plexilab.run.install import is_local
from plexilab.run.result import (
    SCHEMA_FILE,
    SCHEMA_VERSION,
    NodeResult,
    RunResult,
    schema_text,
)
from plexilab.run.scenarios import p2p_scenarios

TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def errors(
    doc: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "$"
) -> list[str]:
    """Where *doc* breaks *schema* (empty: it validates)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return errors(doc, root["$defs"][name], root, at)
    if "anyOf" in schema:
        options = [errors(doc, s, root, at) for s in schema["anyOf"]]
        return [] if any(not o for o in options) else [f"{at}: no anyOf matches"]
    out: list[str] = []
    if "const" in schema and doc != schema["const"]:
        out.append(f"{at}: {doc!r} is not {schema['const']!r}")
    if "enum" in schema and doc not in schema["enum"]:
        out.append(f"{at}: {doc!r} not in {schema['enum']}")
    kind = schema.get("type")
    if kind == "integer":
        if isinstance(doc, bool) or not isinstance(doc, int):
            return [*out, f"{at}: {doc!r} is not an integer"]
    elif kind == "number":
        if isinstance(doc, bool) or not isinstance(doc, (int, float)):
            return [*out, f"{at}: {doc!r} is not a number"]
    elif kind is not None and not isinstance(doc, TYPES[kind]):
        return [*out, f"{at}: {type(doc).__name__} is not {kind}"]
    if isinstance(doc, dict):
        props = schema.get("properties", {})
        out += [
            f"{at}: {k} missing" for k in schema.get("required", []) if k not in doc
        ]
        extra = schema.get("additionalProperties", True)
        for key, value in doc.items():
            if key in props:
                out += errors(value, props[key], root, f"{at}.{key}")
            elif extra is False:
                out.append(f"{at}: unexpected key {key}")
            elif isinstance(extra, dict):
                out += errors(value, extra, root, f"{at}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            out += errors(item, schema["items"], root, f"{at}[{i}]")
    return out


def validate(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA_FILE.read_text())
    return errors(doc, schema, schema)


def test_the_checked_in_schema_is_generated_from_the_dataclasses() -> None:
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "run-result.schema.json is stale: "
        "python -m plexilab.run.result > src/plexilab/run/run-result.schema.json"
    )
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION}
    assert set(schema["required"]) == set(RunResult().to_dict())


def test_the_validator_rejects_what_the_schema_forbids() -> None:
    good = RunResult(nodes=3, backend="compiled").to_dict()
    assert validate(good) == []
    assert validate({**good, "nodes": "3"}) == ["$.nodes: '3' is not an integer"]
    assert validate({**good, "nodes": True}) == ["$.nodes: True is not an integer"]
    assert validate({**good, "surprise": 1}) == ["$: unexpected key surprise"]
    missing = dict(good)
    del missing["acked"]
    assert validate(missing) == ["$: acked missing"]
    assert validate({**good, "schema_version": 1}) == ["$.schema_version: 1 is not 2"]
    assert validate({**good, "scenario": "soak"})
    row = NodeResult(0, "n0", "h", "x86_64", "a:1", "a:1", "a:1", "/d", "/l", None)
    assert validate({**good, "per_node": [{**row.__dict__, "pid": "x"}]})


def test_to_dict_and_from_dict_round_trip() -> None:
    row = NodeResult(0, "n0", "h", "x86_64", "a:1", "a:1", "a:1", "/d", "/l", 7)
    result = RunResult(nodes=1, acked=5, per_node=[row], violations={"lost": 1})
    again = RunResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    assert again.verdict() == ["1 lost"]
    with pytest.raises(ValueError, match="unknown result keys: bogus"):
        RunResult.from_dict({"bogus": 1})


def _short(tmp_path: Path, **kw: Any) -> ClusterConfig:
    return ClusterConfig(
        nodes=3, duration=1.0, clients=2, inflight=8, channels=32, p2p_count=20,
        p2p_rate=200, install="dev", results_dir=tmp_path / "run",
        gossip_interval=0.1, **kw,
    )  # fmt: skip


def test_a_real_local_run_validates_against_the_schema(tmp_path: Path) -> None:
    result = pipeline.run(LocalProvider(workdir=tmp_path / "host"), _short(tmp_path))
    doc = json.loads(json.dumps(result.to_dict()))
    assert validate(doc) == []
    assert (doc["provider"], doc["scenario"], doc["schema_version"]) == (
        "local", "cluster", SCHEMA_VERSION,
    )  # fmt: skip
    assert doc["acked"] > 0
    assert result.verdict() == [], doc["check"]["examples"]
    assert {"host_check", "node_start", "convergence", "load", "p2p", "check",
            "node_stop", "teardown"} <= set(doc["phases_s"])  # fmt: skip
    assert sum(a["count"] for a in doc["latency_by_arch"].values()) == doc["acked"]
    assert all(row["send_latency_ms"]["count"] > 0 for row in doc["per_node"])
    assert sorted(p.name for p in (tmp_path / "run" / "nodes").iterdir()) == [
        "n0.log", "n1.log", "n2.log",
    ]  # fmt: skip


def test_p2p_alone_is_the_same_pipeline_with_other_scenarios(tmp_path: Path) -> None:
    result = pipeline.run(
        LocalProvider(workdir=tmp_path / "host"),
        _short(tmp_path),
        p2p_scenarios(),
        scenario="p2p",
    )
    doc = result.to_dict()
    assert validate(json.loads(json.dumps(doc))) == []
    assert doc["scenario"] == "p2p"
    assert doc["acked"] is None  # no chat load, no checker
    assert doc["p2p_coverage"] == 1.0
    assert {"p50", "p99", "max"} <= set(doc["p2p_latency_ms"])
    assert "load" not in doc["phases_s"]
    assert set(doc["p2p_latency_by_arch"]) == {row.arch for row in result.per_node}
    assert all(row["backend"] for row in doc["per_node"])
    assert result.verdict() == []


# -- providers: declared capabilities -------------------------------------------------


def test_capabilities_are_declared_by_the_providers_not_sniffed() -> None:
    assert capabilities_of(LocalHost) is LOCAL
    assert capabilities_of(QemuHost) is QEMU
    assert capabilities_of(InventoryHost) is INVENTORY
    assert capabilities_of(ContainerHost) is CONTAINERS
    assert capabilities_of(GuestContainerHost) is DOCKER_IN_GUESTS
    assert (LOCAL.local_python, LOCAL.power_control) == (True, False)
    assert (QEMU.local_python, QEMU.power_control) == (False, True)
    assert faults.supported([QemuHost]) == list(faults.KINDS)
    assert faults.supported([LocalHost, QemuHost]) == [
        "partition",
        "kill",
        "pause",
        "split",
    ]
    assert INVENTORY.supported_faults() == ["kill", "pause"]

    class Sniffable(Host):
        """A host that has set_python but whose provider declares nothing."""

        def set_python(self, python: str) -> None:
            raise AssertionError("never called")

    assert capabilities_of(Sniffable) == base.DEFAULT_CAPABILITIES
    assert not capabilities_of(Sniffable).local_python


def test_is_local_follows_the_declaration(tmp_path: Path) -> None:
    host = LocalHost(workdir=tmp_path)
    try:
        assert is_local(host)
    finally:
        host.close()


class Recorder(Provider):
    """A provider that records the pipeline's calls and fails where told."""

    name = "recorder"
    capabilities = Capabilities(local_python=True)

    def __init__(self, tmp_path: Path, fail_in: str = "") -> None:
        self.calls: list[str] = []
        self.fail_in = fail_in
        self.tmp_path = tmp_path
        self.hosts: list[LocalHost] = []
        self.steps = StepLog()

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_in:
            raise RuntimeError(f"{name} failed (test)")

    def preflight(self, phases: Phases, progress: Any) -> None:
        self._call("preflight")

    def artifacts(self, phases: Phases, progress: Any) -> None:
        self._call("artifacts")

    def provision(self, nodes: int, phases: Phases, progress: Any) -> list[Host]:
        self._call("provision")
        self.hosts = [LocalHost(workdir=self.tmp_path / "host")]
        return list(self.hosts)

    def install(self, hosts: Any, phases: Phases, progress: Any) -> dict[str, float]:
        self._call("install")
        return {h.name: 0.5 for h in hosts}

    def samplers(self) -> list[Sampler]:
        return [self.steps]

    def teardown(self) -> None:
        self.calls.append("teardown")
        for host in self.hosts:
            host.close()


class StepLog:
    """A sampler that records the steps it is told about."""

    def __init__(self) -> None:
        self.steps: list[str] = []
        self.stopped = False

    def on_step(self, step: str) -> None:
        self.steps.append(step)

    def stop(self) -> None:
        self.stopped = True


def test_every_provider_goes_through_the_same_steps(tmp_path: Path) -> None:
    provider = Recorder(tmp_path)
    result = pipeline.run(provider, _short(tmp_path))
    assert provider.calls == [
        "preflight", "artifacts", "provision", "install", "teardown",
    ]  # fmt: skip
    assert provider.steps.steps == [
        "prepared", "started", "converged", "loaded", "p2p", "checked",
        "stopped", "end",
    ]  # fmt: skip
    assert provider.steps.stopped
    assert result.provider == "recorder"
    assert [row.install_s for row in result.per_node] == [0.5] * 3
    assert list(result.phases_s)[:2] == ["setup", "artifacts"]
    assert result.verdict() == []


@pytest.mark.parametrize("fail_in", ["preflight", "provision", "install"])
def test_the_pipeline_always_tears_the_provider_down(
    tmp_path: Path, fail_in: str
) -> None:
    provider = Recorder(tmp_path, fail_in)
    with pytest.raises(RuntimeError, match=f"{fail_in} failed"):
        pipeline.run(provider, _short(tmp_path))
    assert provider.calls[-1] == "teardown"
    assert provider.calls.count("teardown") == 1


def test_unsupported_faults_fail_before_the_provider_starts(tmp_path: Path) -> None:
    provider = Recorder(tmp_path)
    with pytest.raises(faults.FaultError, match="recorder provider cannot inject"):
        pipeline.run(provider, _short(tmp_path, faults=["poweroff"]))
    assert provider.calls == []
