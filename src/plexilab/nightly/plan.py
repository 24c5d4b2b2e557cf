"""The cluster step: which task the checkout has and what to hand it.

The checkout says it in structured form only, never in help prose:

* its task names: ``invoke --list --list-format=json``;
* each cluster task's flags: invoke's own parser (``invoke --complete --
  invoke TASK --``, the list shell completion uses, one flag a line);
* its options: ``python -m plexilab.options`` run from the checkout's
  ``src/`` (JSON: option name -> group, type, default, help, choices).

:func:`cluster_plan` sets only options the schema lists (and the task takes).
A task made from the options model takes ``--options FILE.json``: the
options are then handed over as that JSON file (``<run>/cluster-options.json``,
values typed as the schema says); any other task gets them as flags.  A
checkout without a schema (older than the options model) gets ``--nodes`` and
``--json`` only, which every cluster task has had.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plexilab.nightly.config import NightlyError, NightlyOptions

CLUSTER_TASKS = ("qemu.cluster", "local.cluster")
OPTIONS_FLAG = "options"  # plexilab.options.OPTIONS_FLAG of generated tasks
OPTIONS_FILE = "cluster-options.json"
LEGACY = ("nodes", "json")  # what a cluster task without a schema is given
TIMEOUT = 120.0

Schema = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Checkout:
    """What the nightly learnt about the checkout it runs."""

    tasks: Mapping[str, frozenset[str]]  # cluster task -> its options (names)
    schema: Schema | None  # None: the checkout has no options model


def flag(name: str) -> str:
    """Option *name* as a flag (``fault_interval`` -> ``fault-interval``)."""
    return name.replace("_", "-")


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=TIMEOUT
    )


def task_names(python: str, repo: Path) -> list[str]:
    """Every task of the checkout (``invoke --list --list-format=json``)."""
    proc = _run([python, "-m", "invoke", "--list", "--list-format=json"], repo)
    if proc.returncode != 0:
        raise NightlyError(f"invoke --list failed: {proc.stderr.strip()[-500:]}")
    names: list[str] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        names.extend(prefix + t["name"] for t in node.get("tasks", []))
        for sub in node.get("collections", []):
            walk(sub, f"{prefix}{sub['name']}.")

    walk(json.loads(proc.stdout), "")
    return names


def task_options(python: str, repo: Path, task: str) -> frozenset[str]:
    """The options *task* takes, as invoke's parser knows them (``--complete``)."""
    proc = _run(
        [python, "-m", "invoke", "--complete", "--", "invoke", task, "--"], repo
    )
    if proc.returncode != 0:
        raise NightlyError(
            f"invoke --complete {task} failed: {proc.stderr.strip()[-500:]}"
        )
    return frozenset(
        line[2:].replace("-", "_")
        for line in proc.stdout.split()
        if line.startswith("--") and len(line) > 2
    )


def options_schema(python: str, repo: Path) -> dict[str, dict[str, Any]] | None:
    """``python -m plexilab.options`` of the checkout (None: it has none).

    Run from ``repo/src`` so the checkout's own ``plexilab`` answers, not the
    one this nightly was started from.
    """
    src = repo / "src"
    if not (src / "plexilab" / "options.py").is_file():
        return None
    proc = _run([python, "-m", "plexilab.options"], src)
    if proc.returncode != 0:
        raise NightlyError(
            f"python -m plexilab.options failed: {proc.stderr.strip()[-500:]}"
        )
    try:
        schema = json.loads(proc.stdout)
    except ValueError as exc:
        raise NightlyError(f"python -m plexilab.options: not JSON ({exc})") from None
    if not isinstance(schema, dict) or not all(
        isinstance(v, dict) for v in schema.values()
    ):
        raise NightlyError("python -m plexilab.options: not an object of options")
    return schema


def inspect_checkout(python: str, repo: Path) -> Checkout:
    """The checkout's cluster tasks (with their options) and options schema."""
    names = set(task_names(python, repo))
    tasks = {
        task: task_options(python, repo, task)
        for task in CLUSTER_TASKS
        if task in names
    }
    return Checkout(tasks, options_schema(python, repo))


def _typed(value: Any, spec: Mapping[str, Any]) -> Any:
    """*value* as the schema's type of the option (int, float, str, bool)."""
    kind = spec.get("type")
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return bool(value)
    return str(value) if kind == "str" else value


def _as_flag(name: str, value: Any) -> str:
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"--{flag(name)}={shown}"


def cluster_plan(
    checkout: Checkout, options: NightlyOptions, run_dir: Path
) -> dict[str, Any]:
    """Which cluster task to run, with which arguments, and what to report.

    Writes ``run_dir/cluster-options.json`` when the task takes ``--options``.
    """
    plan: dict[str, Any] = {"requested": "qemu", "faults": None}
    if "qemu.cluster" in checkout.tasks:
        task, provider = "qemu.cluster", "qemu"
    elif "local.cluster" in checkout.tasks:
        task, provider = "local.cluster", "local"
        plan["fallback_reason"] = (
            "this checkout has no `invoke qemu.cluster` task yet: ran "
            "`invoke local.cluster` (local processes, host arch only) instead"
        )
    else:
        raise NightlyError("neither qemu.cluster nor local.cluster exists")
    takes = checkout.tasks[task]
    wanted: dict[str, Any] = {
        "nodes": options.nodes,
        "json": str(run_dir / "cluster.json"),
        "duration": options.cluster_duration,
        "results": str(run_dir / "cluster"),
    }
    if options.faults:
        wanted["faults"] = options.faults
        wanted["fault_interval"] = options.cluster_fault_interval
    schema = checkout.schema
    if schema is None:
        known = set(LEGACY)
        plan["schema_note"] = (
            "this checkout has no options schema (python -m plexilab.options): "
            "ran with --nodes and --json only"
        )
    else:
        known = set(schema)
    given = {
        k: (_typed(v, schema[k]) if schema is not None else v)
        for k, v in wanted.items()
        if k in known and k in takes
    }
    if options.faults:
        if "faults" in given:
            plan["faults"] = options.faults
            if "fault_interval" in given:
                plan["fault_interval_s"] = options.cluster_fault_interval
        elif "faults" not in known:
            plan["faults_note"] = (
                "this checkout's options schema has no faults option: ran without "
                f"faults (requested: {options.faults!r})"
            )
        else:
            plan["faults_note"] = (
                f"`invoke {task}` has no --faults option yet: ran without faults "
                f"(requested: {options.faults!r})"
            )
    if schema is not None and OPTIONS_FLAG in takes:
        path = run_dir / OPTIONS_FILE
        path.write_text(json.dumps(given, indent=2, sort_keys=True) + "\n")
        args = [f"--{OPTIONS_FLAG}={path}"]
        plan["handover"] = "json"
    else:
        args = [_as_flag(k, v) for k, v in given.items()]
        plan["handover"] = "flags"
    plan.update(
        task=task,
        provider=provider,
        options=given,
        argv=[options.python, "-m", "invoke", task, *args],
        fallback=provider != "qemu",
    )
    return plan
