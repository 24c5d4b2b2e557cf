"""Fresh-machine checks: what the lab runs works with what the lab installed.

CI runs on a developer's machine, whose system Python may carry hand installs
(xxhash, numpy, ...).  A venv that sees the system site-packages then passes
here and fails on a fresh machine.  These tests prove, whatever this machine
has installed, that every environment the lab creates sees only its own
packages at the locked versions, and that the host-side node, load and
checker paths run from an interpreter started isolated (``-I``, empty
``HOME``, no caches, no inherited environment).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from plexilab import deps
from plexilab.proc import wait_until
from plexilab.run import cluster

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def system_site_dirs() -> set[str]:
    """Site-packages of the interpreter the venvs are made from, plus Debian's."""
    base = sys.base_prefix
    paths = sysconfig.get_paths(vars={"base": base, "platbase": base})
    found = {paths["purelib"], paths["platlib"]}
    found |= {
        "/usr/lib/python3/dist-packages",
        f"/usr/local/lib/python{sys.version_info[0]}.{sys.version_info[1]}"
        "/dist-packages",
    }
    return {os.path.realpath(p) for p in found}


def interpreter_facts(python: str, env: dict[str, str] | None = None) -> dict:
    """``sys.path`` and the installed distributions of *python*, started with -I."""
    script = (
        "import json, sys, importlib.metadata as md;"
        "print(json.dumps({'path': sys.path, 'dists': sorted("
        "(d.metadata['Name'], d.version)"
        " for d in md.distributions())}))"
    )
    proc = subprocess.run(
        [python, "-I", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    facts = json.loads(proc.stdout)
    facts["dists"] = [(deps.canonical(n), v) for n, v in facts["dists"]]
    return facts


def leaked_system_paths(facts: dict) -> list[str]:
    system = system_site_dirs()
    return [p for p in facts["path"] if p and os.path.realpath(p) in system]


def isolated_env(home: Path) -> dict[str, str]:
    """What a stranger's shell would pass: a PATH, an empty HOME, nothing else."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home)}


def test_the_suite_itself_runs_without_the_system_site_packages():
    """The nox session venv must not see what the machine happens to have."""
    assert sys.prefix != sys.base_prefix, "the suite must run in a venv (nox)"
    assert leaked_system_paths(interpreter_facts(sys.executable)) == []


def test_lab_tool_venv_is_hermetic_and_pinned(tmp_path):
    """``./lab``'s .venv: no system site-packages; locked versions only."""
    subprocess.run([str(REPO / "lab"), "python", "-c", "pass"], check=True, timeout=900)
    python = str(REPO / ".venv" / "bin" / "python")
    facts = interpreter_facts(python, isolated_env(tmp_path))
    assert leaked_system_paths(facts) == []
    pins = deps.pins()
    wrong = {
        name: (version, pins.get(name))
        for name, version in facts["dists"]
        if name in pins and pins[name] != version
    }
    assert wrong == {}, f"versions other than the lock: {wrong}"
    unlocked = [name for name, _ in facts["dists"] if name not in pins]
    assert unlocked == [], f"installed but not in the lock: {unlocked}"


@pytest.fixture(scope="module")
def load_tools_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The host-side venv of the load tools as qemu.cluster makes it, made anew."""
    cache = tmp_path_factory.mktemp("local-cache")
    return cluster.local_venv(cluster.build_wheel(), cache=cache)


def test_load_tools_venv_has_only_the_wheel_and_its_locked_dependencies(
    load_tools_python, tmp_path
):
    facts = interpreter_facts(load_tools_python, isolated_env(tmp_path))
    assert leaked_system_paths(facts) == []
    installed = dict(facts["dists"])
    expected = {deps.requirement_name(r) for r in deps.requirements("runtime")}
    # what `python -m venv` itself puts there (pip; setuptools on 3.11)
    bootstrap = {"pip", "setuptools"}
    assert set(installed) - bootstrap == {"plexichat", *expected}
    pins = deps.pins()
    assert {n: installed[n] for n in expected} == {n: pins[n] for n in expected}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"node exited {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
        except OSError:
            return False
        return True

    if not wait_until(listening, timeout, interval=0.1):
        raise AssertionError(f"node did not listen on {port} within {timeout} s")


def test_node_load_and_checker_run_isolated_from_the_load_tools_venv(
    load_tools_python, tmp_path
):
    """The main job's host-side path: node, load, checker; -I, empty HOME."""
    env = isolated_env(tmp_path / "home")
    (tmp_path / "home").mkdir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    python = [load_tools_python, "-I", "-m"]
    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen(
        [*python, "plexichat.node.cli", "--node-id", "n0", "--listen", address,
         "--data-dir", str(tmp_path / "data"), "--replicas", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_listening(port, node, timeout=60)
        # no --secret-file: the node made its own credentials in its data dir
        secret = ["--secret-file", str(tmp_path / "data" / "auth" / "cluster.secret")]
        journal = tmp_path / "journal"
        load = subprocess.run(
            [*python, "plexichat.load.cli", "--nodes", address, "--clients", "2",
             "--count", "500", "--duration", "20", "--channels", "8",
             "--journal", str(journal), *secret],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert load.returncode == 0, load.stderr[-2000:]
        check = subprocess.run(
            [*python, "plexichat.load.checker", "--nodes", address,
             "--journal", str(journal), *secret],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
        result = json.loads(check.stdout)
        assert result["acked"] == 500
    finally:
        os.killpg(node.pid, 15)
        node.wait(timeout=30)
        log.close()
