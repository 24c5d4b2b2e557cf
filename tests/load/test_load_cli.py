"""plexichat-load --config: options as a JSON object instead of rebuilt argv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plexichat.load import cli


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "load.json"
    path.write_text(json.dumps(data))
    return path


def test_config_values_become_the_options(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "nodes": "127.0.0.1:1,127.0.0.1:2",
            "clients": 3,
            "rate": 500,
            "mode": "open",
            "journal": str(tmp_path / "j.bin"),
            "quiet": True,
            "seed": None,
        },
    )
    args = cli.parse_args(["--config", str(path)])
    assert args.nodes == "127.0.0.1:1,127.0.0.1:2"
    assert args.clients == 3
    assert args.rate == 500.0
    assert isinstance(args.rate, float)
    assert args.mode == "open"
    assert args.journal == tmp_path / "j.bin"
    assert args.quiet is True
    assert args.inflight == 64  # not in the file: the flag's default


def test_flags_override_the_config(tmp_path: Path) -> None:
    path = _write(tmp_path, {"nodes": "127.0.0.1:1", "clients": 3})
    args = cli.parse_args([f"--config={path}", "--clients", "9"])
    assert args.clients == 9


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nodes": "h:1", "clientz": 3}, "unknown option(s) clientz"),
        ({"nodes": "h:1", "clients": "3"}, "clients must be an integer"),
        ({"nodes": "h:1", "clients": True}, "clients must be an integer"),
        ({"nodes": "h:1", "rate": "fast"}, "rate must be a number"),
        ({"nodes": "h:1", "mode": "half"}, "mode must be one of closed, open"),
        ({"nodes": "h:1", "quiet": 1}, "quiet must be true or false"),
        ({"nodes": 5}, "nodes must be a string"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_bad_config_is_refused_with_the_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    data: object,
    message: str,
) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--config", str(path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unreadable_config_and_missing_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["--config", str(tmp_path / "absent.json")])
    assert "absent.json" in capsys.readouterr().err
    path = _write(tmp_path, {"clients": 2})
    with pytest.raises(SystemExit):
        cli.parse_args(["--config", str(path)])
    assert "--nodes" in capsys.readouterr().err
