"""The typed, versioned result of a run (``--json`` of every cluster task).

:class:`RunResult` is what the run pipeline (:mod:`plexilab.run.pipeline`)
returns for every provider and scenario; :meth:`RunResult.to_dict` is the
JSON the tasks write (the same keys for every provider: keys that do not
apply to a run are ``null``, ``[]`` or ``{}``), and every table in
:mod:`plexilab.results.tables` reads it.  The JSON schema checked in next to
this module (``run-result.schema.json``) is generated from these dataclasses
by :func:`json_schema` (``python -m plexilab.run.result > ...``; a test keeps
it up to date), so a new metric is one field here plus its producer.

Schema versions: 1 was the untyped dict before issue 13 (keys varied by
provider); 2 adds ``schema_version``, ``provider``, ``scenario`` and gives
every run every key (see the README, "Result JSON").  The raw outputs of the
lab's tools (``load``, ``p2p``, ``check``) and the provider's sections
(``vm``, ``docker``, ``containers``) stay free-form objects.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 2
SCHEMA_FILE = Path(__file__).with_name("run-result.schema.json")
ScenarioName = Literal["cluster", "p2p"]
Json = dict[str, Any]


@dataclass
class NodeResult:
    """One node of a run (``per_node`` rows)."""

    index: int
    node_id: str
    host: str
    arch: str
    listen: str
    advertise: str
    lab: str
    data_dir: str
    log: str
    pid: int | None
    # from the node's STATS at the end (None: it did not answer)
    backend: str | None = None
    counters: Json | None = None
    storage: Json | None = None
    ring: Any = None
    # the node's own histograms (ms)
    send_latency_ms: Json | None = None
    relay_latency_ms: Json | None = None
    # what the provider knows about its host
    install_s: float | None = None
    clock: dict[str, float] | None = None
    guest: str | None = None
    accel: str | None = None
    boot_s: float | None = None
    vm: Json | None = None


@dataclass
class RunResult:
    """A run of any provider and scenario (the ``--json`` document)."""

    schema_version: int = SCHEMA_VERSION
    provider: str = "local"
    scenario: ScenarioName = "cluster"
    runtime: str | None = None
    nodes: int = 0
    replicas: int = 0
    backend: str = ""
    requested_backend: str = ""
    security: str = "auth"
    host_backends: dict[str, str] = field(default_factory=dict)
    # the chat load and the checker (None in a P2P-only run)
    acked: int | None = None
    failures: int | None = None
    lost: int | None = None
    duplicated: int | None = None
    reordered: int | None = None
    seq_mismatch: int | None = None
    shared_seq: int | None = None
    gaps: int | None = None
    replica_missing: int | None = None
    divergence: int | None = None
    replicas_checked: bool | None = None
    checked_channels: int | None = None  # channels whose histories were compared
    violations: dict[str, int] = field(default_factory=dict)
    throughput_msgs_per_s: float | None = None
    latency_ms: Json | None = None
    convergence_s: float = 0.0
    p2p_latency_ms: dict[str, float] = field(default_factory=dict)
    p2p_coverage: float | None = None
    per_node: list[NodeResult] = field(default_factory=list)
    timeline: list[Json] = field(default_factory=list)
    # faults (None without a nemesis)
    faults: list[Json] | None = None
    fault_errors: list[str] = field(default_factory=list)
    fault_counts: dict[str, int] | None = None
    recovery_s: float | None = None
    availability: dict[str, Json] | None = None
    fault_service: list[Json] | None = None
    links: dict[str, Json] | None = None
    # the nodes' histograms merged per arch
    latency_by_arch: dict[str, Json] = field(default_factory=dict)
    p2p_latency_by_arch: dict[str, Json] = field(default_factory=dict)
    # the lab tools' own JSON
    load: Json | None = None
    p2p: Json | None = None
    check: Json | None = None
    config: Json = field(default_factory=dict)
    results_dir: str = ""
    wall_s: float = 0.0
    # the provider's part
    fallback_reason: str | None = None
    arch_mode: str | None = None
    guests: list[Json] = field(default_factory=list)
    leftover_qemu_pids: list[int] = field(default_factory=list)
    phases_s: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    docker: Json | None = None
    containers: Json | None = None
    build: Json | None = None

    def to_dict(self) -> Json:
        """The JSON document (every key, in field order)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: Json) -> RunResult:
        """A result from its JSON (missing keys take their defaults)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"unknown result keys: {', '.join(unknown)}")
        values = dict(doc)
        values["per_node"] = [NodeResult(**row) for row in doc.get("per_node", [])]
        return cls(**values)

    def verdict(self) -> list[str]:
        """Why the run failed (empty when it passed): every checker violation
        (a lost, duplicated, reordered or misplaced message, a gap, two
        messages at one seq, a replica that disagrees), every fault that could
        not be applied or healed, and every QEMU process left behind.  Every
        provider's task exits 1 on any of them."""
        reasons = [
            f"{count:,} {name.replace('_', ' ')}"
            for name, count in self.violations.items()
        ]
        reasons += [f"fault {e}" for e in self.fault_errors]
        if self.leftover_qemu_pids:
            reasons.append(f"QEMU processes left: {self.leftover_qemu_pids}")
        return reasons


# -- the JSON schema -----------------------------------------------------------------


def _schema_of(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return {}
    if tp is type(None):
        return {"type": "null"}
    if tp in (int, float, str, bool):
        names = {int: "integer", float: "number", str: "string", bool: "boolean"}
        return {"type": names[tp]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema_of(a, defs) for a in args]}
    if origin is list:
        return {"type": "array", "items": _schema_of(args[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(args[1], defs)}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # recursion guard
            defs[tp.__name__] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    raise TypeError(f"no JSON schema for {tp!r}")


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    props = {f.name: _schema_of(hints[f.name], defs) for f in fields}
    return {
        "type": "object",
        "description": (cls.__doc__ or "").strip().splitlines()[0],
        "properties": props,
        "required": [f.name for f in fields],
        "additionalProperties": False,
    }


def json_schema() -> dict[str, Any]:
    """The JSON schema of :meth:`RunResult.to_dict` (draft 2020-12)."""
    defs: dict[str, Any] = {}
    root = _object_schema(RunResult, defs)
    root["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"plexilab/run-result/v{SCHEMA_VERSION}",
        "title": "PlexiChat lab run result",
        **root,
        "$defs": defs,
    }


def schema_text() -> str:
    """:func:`json_schema` as the checked-in file holds it."""
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(schema_text())
