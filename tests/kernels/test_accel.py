"""The backend registry: selection rules, env overrides and the CLI table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from plexichat import accel
from plexichat.accel import __main__ as accel_cli

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "src")


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in accel.FAMILIES:
        monkeypatch.delenv(accel.env_name(name), raising=False)
    monkeypatch.delenv(accel.ENV_GLOBAL, raising=False)
    accel.reset()
    yield
    accel.reset()


def test_auto_takes_first_available_in_preference_order() -> None:
    for name, spec in accel.FAMILIES.items():
        assert accel.active(name) == accel.available(name)[0]
        assert accel.available(name) == [
            b for b in spec.preference if b in accel.available(name)
        ]
        assert accel.selection(name).source == "auto"


def test_reference_backend_always_available() -> None:
    for name in accel.FAMILIES:
        assert "python" in accel.available(name)


def test_global_python_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEXICHAT_BACKEND", "python")
    for name in accel.FAMILIES:
        assert accel.active(name) == "python"
        assert accel.selection(name).source == "PLEXICHAT_BACKEND"
    assert accel.summary() == "python"
    assert not accel.compiled_everywhere()


def test_global_backend_a_family_lacks_falls_back_to_auto(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLEXICHAT_BACKEND", "numba")
    assert "numba" not in accel.FAMILIES["wire"].modules
    assert accel.selection("wire").source == "auto"


def test_per_family_override_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEXICHAT_BACKEND", "auto")
    monkeypatch.setenv("PLEXICHAT_BACKEND_CACHE", "python")
    assert accel.active("cache") == "python"
    assert accel.selection("cache").source == "PLEXICHAT_BACKEND_CACHE"


def test_strict_override_of_missing_backend_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLEXICHAT_BACKEND_WIRE", "numba")
    with pytest.raises(accel.BackendUnavailable, match="wire backend 'numba'"):
        accel.load("wire")


def test_unknown_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLEXICHAT_BACKEND", "fortran")
    with pytest.raises(ValueError, match="PLEXICHAT_BACKEND='fortran'"):
        accel.load("wire")


def test_unknown_family() -> None:
    with pytest.raises(KeyError, match="unknown kernel family 'nope'"):
        accel.family("nope")


def test_unloadable_module_reports_why() -> None:
    accel.FAMILIES["_broken"] = accel.KernelFamily(
        "_broken", {"cython": "plexichat._does_not_exist", "python": "json"}
    )
    try:
        assert accel.available("_broken") == ["python"]
        assert "ModuleNotFoundError" in str(accel.probe("_broken", "cython"))
        row = next(r for r in accel.status() if r.family == "_broken")
        assert row.active == "python"
        assert "cython" in row.missing
    finally:
        del accel.FAMILIES["_broken"]


def test_table_and_json_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert accel_cli.main([]) == 0
    table = capsys.readouterr().out
    for name in accel.FAMILIES:
        assert name in table
    assert accel_cli.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["families"]) == set(accel.FAMILIES)
    assert data["summary"] in {"compiled", "python", "mixed"}


def test_require_compiled_fails_under_python_backend() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "plexichat.accel", "--require-compiled"],
        env={**os.environ, "PLEXICHAT_BACKEND": "python", "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "not every kernel family" in result.stderr


def test_bench_json_reports_speedups(capsys: pytest.CaptureFixture[str]) -> None:
    code = accel_cli.main(
        ["bench", "--json", "--family", "wire", "--repeat", "1", "--min-time", "0.001"]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data, "the wire family must contribute bench cases"
    for result in data.values():
        assert result["seconds"]["python"] > 0
        assert result["speedup_vs_python"]["python"] == pytest.approx(1.0)
