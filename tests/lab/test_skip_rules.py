"""The suite's rules (tests/conftest.py): listed skips only, set-up failures on
the lab host fail, the skip summary, and no Docker engine left behind."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from plexichat import accel
from plexilab.infra import engine as containers
from plexilab.infra import setup_host
from plexilab.proc import wait_until

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parents[1]
CONFTEST = TESTS / "conftest.py"


@pytest.fixture
def rules(request: pytest.FixtureRequest) -> ModuleType:
    """The loaded tests/conftest.py module."""
    for plugin in request.config.pluginmanager.get_plugins():
        if getattr(plugin, "__file__", None) == str(CONFTEST):
            return plugin  # type: ignore[no-any-return]
    raise AssertionError("tests/conftest.py is not loaded")


def _apt_failed() -> None:
    raise setup_host.HostSetupError("apt-get install -y qemu-utils failed: E: ...")


# -- set-up failures on the lab host fail, elsewhere they skip for a listed reason -----


def test_setup_failure_on_the_lab_host_fails(skips: Any) -> None:
    with pytest.raises(pytest.fail.Exception, match="failed on the lab host"):
        skips.as_lab_host().setup("QEMU host set-up", _apt_failed)


def test_setup_failure_elsewhere_is_a_listed_skip(rules: ModuleType) -> None:
    for gap in [("not-root", "euid 1000"), ("not-debian-12", "fedora 40")]:
        with pytest.raises(pytest.skip.Exception) as info:
            rules.Skips(gap).setup("QEMU host set-up", _apt_failed)
        assert rules.listed_reason(info.value.msg) == gap[0]
        assert "apt-get install" in info.value.msg


def test_setup_that_works_returns_its_value(skips: Any) -> None:
    assert skips.as_lab_host().setup("x", lambda a, b=0: a + b, 2, b=3) == 5


def test_this_machine_is_judged_by_root_and_debian_12(rules: ModuleType) -> None:
    gap = rules.lab_host_gap()
    assert gap is None or rules.listed_reason(rules.skip_reason(*gap)) == gap[0]


def test_no_test_module_skips_outside_the_list(rules: ModuleType) -> None:
    """Test modules skip only through ``skips`` or with a listed literal reason."""
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        if path == CONFTEST:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name in {"pytest.skip", "pytest.importorskip", "pytest.mark.skip"}:
                bad.append(f"{path.name}:{node.lineno}: {name}")
            elif name == "pytest.mark.skipif":
                reason = next(
                    (k.value for k in node.keywords if k.arg == "reason"), None
                )
                if not (
                    isinstance(reason, ast.Constant)
                    and rules.listed_reason(str(reason.value))
                ):
                    bad.append(f"{path.name}:{node.lineno}: skipif, unlisted reason")
    assert bad == []


# -- kernel backends: absent is a listed skip, present but broken fails ----------------


def test_a_backend_that_is_there_but_broken_is_not_skipped(
    rules: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "plexitest_broken_kernel.py").write_text("raise ImportError('ABI')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real_find_spec = rules.importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:  # numba counts as installed
        return object() if name == "numba" else real_find_spec(name, *args)

    monkeypatch.setattr(rules.importlib.util, "find_spec", find_spec)
    family = accel.KernelFamily(
        "plexitest",
        {
            "cython": "plexitest_broken_kernel",
            "numba": "plexitest_broken_kernel",
            "python": "plexichat.wire._reference",
        },
    )
    monkeypatch.setitem(accel.FAMILIES, "plexitest", family)
    params = rules.backend_params("plexitest")
    assert [list(p.marks) for p in params] == [[], [], []]  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        rules.load("plexitest", "numba")


def test_an_absent_backend_is_a_listed_skip(
    rules: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules.importlib.util, "find_spec", lambda *a: None)
    assert rules.listed_reason(rules.absent_reason("numba", "m")) == "numba-missing"
    assert rules.listed_reason(rules.absent_reason("cython", "m")) == "not-built"
    assert rules.absent_reason("python", "m") is None


# -- the skip summary ------------------------------------------------------------------

INNER = """
import pytest

def test_listed():
    pytest.skip("the reference is the specification")

def test_unlisted():
    pytest.skip("docker said no")

def test_ok():
    pass
"""


def _inner_run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")


def test_unlisted_skip_reason_fails_the_run(pytester: pytest.Pytester) -> None:
    result = _inner_run(pytester, INNER)
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*skips and known failures by reason*",
            "    1  the reference is the specification",
            "    1  UNLISTED: docker said no",
            "FAILED: skips whose reason is not in SKIP_REASONS*",
        ]
    )


def test_listed_skips_are_counted_and_pass(pytester: pytest.Pytester) -> None:
    source = INNER.replace("docker said no", "POSIX only")
    result = _inner_run(pytester, source)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "*skips and known failures by reason*",
            "    1  POSIX only",
            "    1  the reference is the spec*",
        ]
    )
    assert "UNLISTED" not in result.stdout.str()


def test_unlisted_collection_skip_fails_the_run(pytester: pytest.Pytester) -> None:
    source = "import pytest\npytest.importorskip('plexitest_no_such_module')\n"
    result = _inner_run(pytester, source + "def test_x():\n    pass\n")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*UNLISTED: could not import*"])


# -- a Docker engine the suite started is stopped at the end ---------------------------


@pytest.mark.parametrize("running_before", [False, True])
def test_suite_stops_only_an_engine_it_started(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, running_before: bool
) -> None:
    stopped: list[bool] = []
    states = iter([running_before])  # at the start; running at the end
    monkeypatch.setattr(containers, "engine_running", lambda: next(states, True))
    monkeypatch.setattr(containers, "stop_engine", lambda: stopped.append(True) or True)
    assert "plexilab.infra.engine" in sys.modules  # the inner conftest sees the fakes
    result = _inner_run(pytester, "def test_x():\n    pass\n")
    assert result.ret == pytest.ExitCode.OK
    assert stopped == ([] if running_before else [True])


def test_stop_engine_started_since(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(containers, "stop_engine", lambda: calls.append("stop") or True)
    assert containers.stop_engine_started_since(was_running=True) is False
    assert calls == []
    assert containers.stop_engine_started_since(was_running=False) is True
    assert calls == ["stop"]


XFAILS = """
import pytest

def test_known_bug():
    pytest.xfail("a known failure of an open issue: issue 11, shared seqs")

@pytest.mark.xfail(reason="flaky, no idea why")
def test_unexplained():
    assert False
"""


def test_expected_failures_need_a_listed_reason(pytester: pytest.Pytester) -> None:
    """An xfail hides a failure as well as a skip does: only an open issue's
    known failure is listed; any other reason fails the run."""
    result = _inner_run(pytester, XFAILS)
    result.assert_outcomes(xfailed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "    1  a known failure of an open issue",
            "    1  UNLISTED: flaky, no idea why",
        ]
    )
    listed = XFAILS.split("@pytest.mark")[0]
    assert _inner_run(pytester, listed).ret == pytest.ExitCode.OK


TERMINATED = """
import os, signal, subprocess, sys, time
from pathlib import Path

def test_started_a_process(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    Path(os.environ["PIDFILE"]).write_text(str(child.pid))
    try:
        time.sleep(60)  # the suite is terminated here
    finally:
        child.kill()
        child.wait()
"""


def test_sigterm_runs_the_tests_clean_up(pytester: pytest.Pytester, tmp_path) -> None:
    """A terminated test run stops what its tests started, as on Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=TERMINATED)
    pidfile = tmp_path / "child.pid"
    suite = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=pytester.path,
        env={**os.environ, "PIDFILE": str(pidfile)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        started = wait_until(
            lambda: (
                suite.poll() is not None
                or (pidfile.exists() and bool(pidfile.read_text()))
            ),
            60,
        )
        assert started, "the inner test never started"
        assert suite.poll() is None, "the inner run ended early"
        child = int(pidfile.read_text())
        suite.send_signal(signal.SIGTERM)
        suite.wait(30)
        wait_until(lambda: not _alive(child), 10)
        assert not _alive(child), "the test's process outlived the terminated run"
    finally:
        if suite.poll() is None:
            suite.kill()
            suite.wait()
        if (
            pidfile.exists()
            and pidfile.read_text()
            and _alive(child := int(pidfile.read_text()))
        ):
            os.kill(child, signal.SIGKILL)  # what the failing run left behind


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
