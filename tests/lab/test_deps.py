"""Dependencies are named once (pyproject groups) and pinned once (the lock)."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest

from plexilab import deps

REPO = Path(__file__).resolve().parents[2]


def test_the_lock_pins_every_requirement_within_its_range():
    assert deps.check_lock() == []


def test_a_stale_lock_is_reported(tmp_path):
    lock = tmp_path / "constraints.txt"
    text = deps.LOCK.read_text()
    lock.write_text(re.sub(r"(?m)^xxhash==.*$", "xxhash==1.0.0", text))
    assert deps.check_lock(lock) == ["xxhash>=3.4: pinned to 1.0.0, outside the range"]
    lock.write_text(re.sub(r"(?m)^numpy==.*\n", "", text))
    assert deps.check_lock(lock) == ["numpy>=1.26: not pinned in constraints.txt"]


def test_groups_come_from_pyproject():
    assert deps.requirements("runtime") == ["xxhash>=3.4", "numpy>=1.26"]
    assert "Cython>=3.0" in deps.requirements("build")
    assert {"pytest>=8", "installer>=0.7"} <= set(deps.requirements("guest"))
    with pytest.raises(KeyError, match="no dependency group 'nope'"):
        deps.requirements("nope")


def test_lab_script_reads_the_groups_with_the_bare_system_python():
    """./lab runs deps.py before any venv exists: standard library only."""
    proc = subprocess.run(
        ["python3", "-I", "src/plexilab/deps.py", "build", "runtime", "lab"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert proc.stdout.split() == deps.requirements("build", "runtime", "lab")


def imported_top_levels(root: Path) -> set[str]:
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if "vendor" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"plexichat", "plexilab"}


@pytest.mark.parametrize("tree", ["src/plexichat", "src/plexilab"])
def test_what_the_code_imports_is_declared_directly(tree):
    """A package imported by the code is named in a group, not inherited."""
    declared = {deps.requirement_name(r) for r in deps.requirements(*deps.groups())}
    providers = md.packages_distributions()
    undeclared = {}
    for module in sorted(imported_top_levels(REPO / tree)):
        dists = {deps.canonical(d) for d in providers.get(module, [])}
        if not dists & declared:
            undeclared[module] = sorted(dists) or "not installed"
    assert undeclared == {}


SCANNED = ["src", "noxfile.py", "tasks.py", "lab", "Dockerfile", "asv.conf.json",
           "qemu", ".ci"]  # fmt: skip


def test_no_environment_the_lab_creates_sees_the_system_site_packages():
    pattern = re.compile(r"system[-_]site[-_]packages")
    hits = []
    for name in SCANNED:
        root = REPO / name
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file() and path.suffix not in {".so", ".c", ".pyc"}:
                text = path.read_text(errors="replace")
                hits += [f"{path.relative_to(REPO)}" for _ in pattern.finditer(text)]
    assert hits == []
