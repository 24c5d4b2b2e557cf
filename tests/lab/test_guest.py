"""plexilab.guest: the stand-alone scripts the lab ships to guests and relays.

They run where plexilab is not installed, with the standard library only
(plus ``installer`` from its wheel): checked here, and their functions are
exercised in-process (the relay's bridging is covered end to end in
``test_qemu_units.py`` and ``test_faults_qemu.py``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from plexilab import guest, proc
from plexilab.guest import install, relay, stage_deps
from plexilab.infra import wheels

MODULES = ("relay.py", "install.py", "stage_deps.py")


@pytest.mark.parametrize("name", MODULES)
def test_guest_modules_import_only_the_standard_library(name: str) -> None:
    tree = ast.parse(guest.source(name))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


@pytest.mark.parametrize("name", MODULES)
def test_guest_source_is_the_module_file(name: str) -> None:
    module = {"relay.py": relay, "install.py": install, "stage_deps.py": stage_deps}
    assert module[name].__file__ is not None
    assert guest.source_bytes(name) == Path(module[name].__file__).read_bytes()
    assert guest.source(name) == guest.source_bytes(name).decode()


def test_guest_scripts_run_stand_alone(tmp_path: Path) -> None:
    """Isolated (-I -S), out of the source tree: a usage error, no ImportError."""
    for name in MODULES:
        script = tmp_path / name
        script.write_bytes(guest.source_bytes(name))
        res = subprocess.run(
            [sys.executable, "-I", "-S", str(script)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=False,
        )
        assert "ImportError" not in res.stderr, res.stderr
        assert "ModuleNotFoundError" not in res.stderr, res.stderr


# -- relay ---------------------------------------------------------------------------


def test_relay_starttime_matches_proc() -> None:
    me = os.getpid()
    assert relay.starttime(me) == proc.proc_starttime(me)
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert relay.starttime(dead.pid) is None


def test_relay_follows_the_blocked_file(tmp_path: Path) -> None:
    path = tmp_path / "blocked"
    blocked = relay.Blocked(str(path), 7101)
    assert not blocked()  # no file: nothing blocked
    path.write_text("7100\n7101\n")
    assert blocked()
    path.write_text("7100\n")
    os.utime(path, ns=(1, 1))  # a new stamp even within the clock's resolution
    assert not blocked()
    path.unlink()
    assert not blocked()


def test_relay_watches_the_qemu_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "qemu.pid"
    assert not relay.qemu_alive(str(pidfile))
    proc.write_pidfile(pidfile, os.getpid(), "qemu")
    assert relay.qemu_alive(str(pidfile))
    data = json.loads(pidfile.read_text())
    data["starttime"] += 1  # a recycled pid
    pidfile.write_text(json.dumps(data))
    assert not relay.qemu_alive(str(pidfile))
    pidfile.write_text("garbage")
    assert not relay.qemu_alive(str(pidfile))


def test_relay_records_itself_like_the_lab(tmp_path: Path) -> None:
    path = relay.record_self(str(tmp_path))
    assert path == str(tmp_path / f"relay-{os.getpid()}.pid")
    rec = proc.read_pidfile(Path(path))
    assert rec is not None
    assert (rec.pid, rec.kind, rec.starttime) == (
        os.getpid(),
        "relay",
        proc.proc_starttime(os.getpid()),
    )
    assert relay.record_self(str(tmp_path / "missing")) is None


def test_relay_refuses_when_qemu_is_gone(tmp_path: Path) -> None:
    (tmp_path / "relays").mkdir()
    script = tmp_path / "relay.py"
    script.write_bytes(guest.source_bytes("relay.py"))
    res = subprocess.run(
        [
            sys.executable,
            "-S",
            "-E",
            str(script),
            "1",
            str(tmp_path / "relays"),
            str(tmp_path / "qemu.pid"),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert res.returncode == 1
    assert list((tmp_path / "relays").iterdir()) == []  # its record is gone


# -- installers ----------------------------------------------------------------------


def _tiny_wheel(house: Path, name: str, version: str = "1.0") -> Path:
    path = house / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}.py", f"VERSION = {version!r}\n")
        zf.writestr(
            f"{info}/METADATA",
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        )
        zf.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture(scope="module")
def installer_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installer wheel the wheelhouses carry (fetched when dist/ has none)."""
    found = sorted(Path("dist").glob("*/wheelhouse/installer-*.whl"))
    if found:
        return found[0]
    fetched = tmp_path_factory.mktemp("fetched")
    wheels.download_wheelhouse(wheels.host_arch(), fetched, ["installer"])
    return sorted(fetched.glob("installer-*.whl"))[0]


@pytest.fixture
def isolated_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The installers put the installer wheel on sys.path: undo it afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [
        m for m in sys.modules if m == "installer" or m.startswith("installer.")
    ]:
        monkeypatch.delitem(sys.modules, name)


def test_norm_and_infos(tmp_path: Path) -> None:
    assert install.norm("Foo.Bar-baz") == "foo_bar_baz"
    (tmp_path / "foo_bar-1.2.dist-info").mkdir()
    (tmp_path / "other").mkdir()
    assert install.infos(str(tmp_path)) == {
        str(tmp_path / "foo_bar-1.2.dist-info"): ["foo_bar", "1.2"]
    }


@pytest.mark.usefixtures("isolated_path")
def test_install_wheels_into_a_venv(tmp_path: Path, installer_wheel: Path) -> None:
    venv = tmp_path / "venv"
    house = tmp_path / "house"
    house.mkdir()
    (house / installer_wheel.name).write_bytes(installer_wheel.read_bytes())
    _tiny_wheel(house, "tinydep")
    _tiny_wheel(house, "plexichat", "9.9")
    site = Path(
        sysconfig.get_paths("venv", vars={"base": venv, "platbase": venv})["purelib"]
    )
    site.mkdir(parents=True)
    done = install.install_wheels(str(venv), str(house), "-", ["plexichat"])
    assert sorted(done) == sorted(
        [
            "tinydep-1.0",
            "plexichat-9.9",
            f"installer-{installer_wheel.name.split('-')[1]}",
        ]
    )
    assert (site / "tinydep.py").read_text() == "VERSION = '1.0'\n"
    assert not list(site.rglob("*.pyc"))  # no bytecode compilation
    # again: what is installed at the same version is skipped, plexichat is not
    assert install.install_wheels(str(venv), str(house), "-", ["plexichat"]) == [
        "plexichat-9.9"
    ]
    # a new version replaces the old one (its files go with it)
    (house / "tinydep-1.0-py3-none-any.whl").unlink()
    _tiny_wheel(house, "tinydep", "2.0")
    assert "tinydep-2.0" in install.install_wheels(str(venv), str(house), "-", [])
    assert sorted(p.name for p in site.glob("tinydep-*")) == ["tinydep-2.0.dist-info"]
    assert (site / "tinydep.py").read_text() == "VERSION = '2.0'\n"


@pytest.mark.usefixtures("isolated_path")
def test_install_skips_what_the_deps_disk_provides(
    tmp_path: Path, installer_wheel: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    venv = tmp_path / "venv"
    deps = tmp_path / "deps"
    (deps / "site-packages" / "tinydep-1.0.dist-info").mkdir(parents=True)
    house = tmp_path / "house"
    house.mkdir()
    (house / installer_wheel.name).write_bytes(installer_wheel.read_bytes())
    _tiny_wheel(house, "tinydep")
    site = Path(
        sysconfig.get_paths("venv", vars={"base": venv, "platbase": venv})["purelib"]
    )
    site.mkdir(parents=True)
    assert install.main([str(venv), str(house), str(deps)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("installed 1 in ")  # the installer wheel only
    assert "tinydep" not in out
    pth = site / install.PTH_NAME
    assert pth.read_text() == f"{deps / 'site-packages'}\n"


@pytest.mark.usefixtures("isolated_path")
def test_stage_deps_lays_out_the_guest_tree(
    tmp_path: Path, installer_wheel: Path
) -> None:
    stage = tmp_path / "stage"
    wheel = _tiny_wheel(tmp_path, "tinydep")
    assert (
        stage_deps.main(
            [str(stage), "/opt/plexichat", str(installer_wheel), str(wheel)]
        )
        == 0
    )
    site = stage / "site-packages"
    assert (site / "tinydep.py").is_file()
    assert (site / "tinydep-1.0.dist-info").is_dir()
    assert list(site.rglob("tinydep*.pyc"))  # byte-compiled on the lab host
    assert stage_deps.scheme("/s")["scripts"] == "/s/bin"
