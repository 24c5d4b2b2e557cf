"""plexilab.options: one declaration per option; tasks, JSON and schema from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from invoke.collection import Collection
from invoke.context import Context
from invoke.program import Program

from plexilab import options as o

GROUPS = (o.ClusterOptions, o.LoadOptions, o.FaultOptions, o.OutputOptions)


def _make(preset: str, seen: list[o.Chosen]) -> Any:
    @o.task(*GROUPS, preset=preset, name="run", extra={"rounds": (1, "rounds")})
    def run(c: Context, chosen: o.Chosen) -> None:
        """Run something."""
        seen.append(chosen)

    return run


def _invoke(task: Any, *argv: str) -> int:
    program = Program(namespace=Collection("t", task), name="t", binary="t")
    try:
        program.run(["t", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_a_generated_task_passes_typed_groups_with_flags_applied() -> None:
    seen: list[o.Chosen] = []
    task = _make("local", seen)
    assert _invoke(task, "run", "--clients=5", "--fault-interval=4", "--rounds=3") == 0
    chosen = seen[0]
    assert chosen[o.LoadOptions].clients == 5
    assert chosen[o.FaultOptions].fault_interval == 4.0
    assert chosen[o.ClusterOptions].nodes == 3
    assert chosen.extra == {"rounds": 3}


def test_presets_change_defaults_and_the_help_shows_the_one_that_applies() -> None:
    seen: list[o.Chosen] = []
    local, qemu = _make("local", seen), _make("qemu", seen)
    assert "(default 8)" in local.help["clients"]
    assert "(default 4)" in qemu.help["clients"]
    assert _invoke(qemu, "run") == 0
    assert seen[-1][o.LoadOptions].clients == 4
    assert seen[-1][o.ClusterOptions].suspect_timeout == 10.0
    names = {a.name for a in qemu.get_arguments()}
    assert {"clients", "fault_interval", "json", "rounds"} <= names


def test_bad_values_exit_with_code_2_and_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: list[o.Chosen] = []
    task = _make("local", seen)
    assert _invoke(task, "run", "--install=egg") == 2
    assert _invoke(task, "run", "--fault-duration=20") == 2
    assert _invoke(task, "run", "--replicas=0") == 2
    assert seen == []
    checked = o.task(*GROUPS, name="run", check=o.nodes_to_start)(
        lambda c, chosen: seen.append(chosen)
    )
    assert _invoke(checked, "run", "--nodes=0") == 2
    assert _invoke(task, "run", "--nodes=0") == 0  # no check: 0 is allowed


def test_a_flag_cannot_choose_what_only_code_may_set() -> None:
    seen: list[o.Chosen] = []
    task = _make("local", seen)
    assert _invoke(task, "run", "--security=insecure") == 2
    assert o.ClusterOptions(security="insecure").security == "insecure"
    with pytest.raises(o.OptionError, match="security"):
        o.ClusterOptions(security="open")


def test_json_round_trip_and_unknown_keys_are_refused() -> None:
    built = o.build(GROUPS, {"clients": 3, "faults": "kill"})
    text = o.to_json(*built.values())
    again = o.from_json(text, GROUPS)
    assert again == built
    with pytest.raises(o.OptionError, match=r"unknown option.*clientz"):
        o.from_json(json.dumps({"clientz": 3}), GROUPS)
    with pytest.raises(o.OptionError, match="object"):
        o.from_json("[1]", GROUPS)


def test_an_option_name_may_not_repeat_across_groups() -> None:
    with pytest.raises(TypeError, match="also in"):
        o.preset_defaults((o.LoadOptions, o.LoadOptions))


def test_fault_kinds_and_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert o.FaultOptions().kinds == []
    assert o.FaultOptions(faults=" kill, Pause ").kinds == ["kill", "pause"]
    assert o.main([]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["clients"]["group"] == "LoadOptions"
    assert shown["arch"]["choices"] == ["mixed", "x86_64", "aarch64"]
    assert set(shown) == set(o.schema())


def test_a_task_takes_its_options_from_json_and_flags_override(
    tmp_path: Path,
) -> None:
    seen: list[o.Chosen] = []
    task = _make("qemu", seen)
    path = tmp_path / "opts.json"
    path.write_text(json.dumps({"clients": 2, "nodes": 5, "faults": "kill"}))
    assert _invoke(task, "run", f"--options={path}", "--nodes=7") == 0
    chosen = seen[-1]
    assert chosen[o.LoadOptions].clients == 2
    assert chosen[o.ClusterOptions].nodes == 7
    assert chosen[o.FaultOptions].kinds == ["kill"]
    assert chosen[o.LoadOptions].inflight == 32  # the preset's, not in the file
    path.write_text(json.dumps({"arch": "mixed"}))  # not an option of this task
    assert _invoke(task, "run", f"--options={path}") == 2
    assert _invoke(task, "run", f"--options={tmp_path / 'absent.json'}") == 2
    assert len(seen) == 1
