"""Build artifacts keyed by content: the plexichat wheel, wheelhouses, anything built.

One cache for everything the lab builds from the sources:

* :func:`source_key` hashes what goes into the wheel (``setup.py``,
  ``pyproject.toml`` and the source files of ``src/plexichat``: relative
  path and bytes, never mtimes), so touching a file rebuilds nothing and a
  checkout of other sources is never taken for fresh.
* :func:`cached` is the content-addressed store: ``<cache>/artifacts/<kind>/
  <key>/`` is built once by a callback into a temporary directory, under a
  lock (one builder, the others wait and reuse), and published by rename
  with a ``.complete`` marker, so a crashed build is never reused.
* :func:`wheel` is the one way to get a plexichat wheel for an arch
  (:func:`plexilab.infra.wheels.build_wheel`, native or cross, once per
  :func:`wheel_key`).  Everything else takes its wheel from there:
  :func:`wheel_and_wheelhouse` adds the offline wheelhouse of the locked
  dependencies (keyed by the lock too), :func:`ensure_artifacts` copies it
  into ``dist/``, and the lab's local venv (:mod:`plexilab.run.install`) is
  keyed by it.  The store keeps the :data:`WHEELS_KEPT` most recently used
  wheels per arch (:func:`prune`).
* :func:`ensure_artifacts` keeps its old contract -- ``dist/<arch>/`` holds
  the wheel and wheelhouse the guests install -- but decides freshness by
  the content key recorded next to them (``dist/<arch>/.artifact-key``).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from plexilab import deps
from plexilab.infra import wheels
from plexilab.infra.buildsteps import cache_root, digest, locked

REPO = wheels.REPO
DIST = REPO / "dist"
ARTIFACT_FORMAT = 1  # bump when the build steps (not the sources) change
SOURCE_SUFFIXES = frozenset({".py", ".pyx", ".pyi", ".pxd", ".h", ".typed"})
VENDOR_DIRS = frozenset({"_vendor", "vendor"})  # vendored code: every file counts
COMPLETE = ".complete"
WHEELS_KEPT = 3  # per arch, the most recently used (store entries are ~1 MB)
KEY_FILE = ".artifact-key"


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------
def source_files(repo: Path = REPO) -> list[Path]:
    """The files that go into the wheel, sorted: build files plus sources.

    Under ``src/plexichat``: every file with a source suffix, and every file
    of the vendored code; never build outputs (``.so``, generated ``.c``,
    annotation ``.html``) or caches (``__pycache__``).
    """
    package = repo / "src" / "plexichat"
    files = [
        p
        for p in package.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (
            p.suffix in SOURCE_SUFFIXES
            or (VENDOR_DIRS & set(p.relative_to(package).parts) and p.suffix != ".so")
        )
    ]
    return [repo / "setup.py", repo / "pyproject.toml", *sorted(files)]


def content_key(files: Iterable[Path], root: Path, *extra: tuple[str, bytes]) -> str:
    """A 16-hex-digit key of *files* (path relative to *root* and bytes) + *extra*."""
    parts = [(str(p.relative_to(root)), p.read_bytes()) for p in files]
    return digest([*parts, *extra])


def source_key(repo: Path = REPO) -> str:
    """Content key of everything that goes into the plexichat wheel."""
    return content_key(
        source_files(repo), repo, ("format", str(ARTIFACT_FORMAT).encode())
    )


def lock_digest() -> str:
    """sha256 of ``constraints.txt`` (the pinned dependency versions)."""
    return hashlib.sha256(deps.LOCK.read_bytes()).hexdigest()


def artifact_key(arch: str, *, numba: bool = False, repo: Path = REPO) -> str:
    """Key of the (wheel, wheelhouse) pair of *arch*: sources, arch, lock, numba."""
    return digest(
        [
            ("sources", source_key(repo).encode()),
            ("arch", arch.encode()),
            ("lock", lock_digest().encode()),
            ("numba", b"1" if numba else b"0"),
        ]
    )


# --------------------------------------------------------------------------
# The content-addressed store
# --------------------------------------------------------------------------
def store_root() -> Path:
    """``<cache>/artifacts``."""
    return cache_root() / "artifacts"


def cached(
    kind: str,
    key: str,
    build: Callable[[Path], None],
    *,
    root: Path | None = None,
    rebuild: bool = False,
) -> Path:
    """The directory of artifact *kind* with content *key*, built when missing.

    *build* fills the (empty, temporary) directory it is given; the result is
    published atomically as ``<root>/<kind>/<key>/`` with a ``.complete``
    marker.  Concurrent callers wait on a lock and reuse the first build; a
    build that raised leaves nothing behind.  *rebuild* builds it again
    even when it is there (and replaces it only once the new one is done).
    """
    base = (root or store_root()) / kind
    final = base / key
    if (final / COMPLETE).is_file() and not rebuild:
        return final
    base.mkdir(parents=True, exist_ok=True)
    with locked(base / f"{key}.lock"):
        if (final / COMPLETE).is_file() and not rebuild:
            return final
        with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=base) as tmp:
            work = Path(tmp) / "out"
            work.mkdir()
            build(work)
            (work / COMPLETE).write_text(f"{key}\n")
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
    return final


def wheel_key(arch: str) -> str:
    """The store key of the wheel of *arch*: ``<arch>-<content key>`` (its
    directory name under ``<store>/wheel/``)."""
    key = digest([("sources", source_key().encode()), ("arch", arch.encode())])
    return f"{arch}-{key}"


def wheel(
    arch: str,
    *,
    root: Path | None = None,
    rebuild: bool = False,
    timeout: float | None = None,
) -> Path:
    """The plexichat wheel of *arch* for the current sources (built once per key).

    The same build as ``python -m plexilab.infra.wheels`` (native, or cross
    for aarch64 on x86_64), with compiled extensions required; *rebuild*
    builds it again, *timeout* bounds a build (``RuntimeError`` when it
    fails or times out).
    """

    def build(out: Path) -> None:
        wheels.build_wheel(arch, out, timeout=timeout)

    directory = cached("wheel", wheel_key(arch), build, root=root, rebuild=rebuild)
    directory.touch()  # used now: pruning keeps the most recently used
    prune("wheel", prefix=f"{arch}-", keep=WHEELS_KEPT, root=root)
    (found,) = directory.glob("plexichat-*.whl")
    return found


def prune(
    kind: str, *, prefix: str = "", keep: int = WHEELS_KEPT, root: Path | None = None
) -> list[Path]:
    """Remove all but the *keep* most recently used artifacts of *kind* whose
    key starts with *prefix* (each under its lock); returns what went."""
    base = (root or store_root()) / kind
    if not base.is_dir():
        return []
    entries = sorted(
        (
            p
            for p in base.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name.startswith(prefix)
        ),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    removed = []
    for old in entries[keep:]:
        with locked(base / f"{old.name}.lock"):
            shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    return removed


def wheel_and_wheelhouse(
    arch: str, *, numba: bool = False, root: Path | None = None
) -> tuple[Path, Path]:
    """(wheel, wheelhouse) of *arch*, keyed by sources, lock and the numba choice.

    The wheel is :func:`wheel`'s (built once, whatever the wheelhouse).
    """
    key = artifact_key(arch, numba=numba)

    def build(out: Path) -> None:
        wheels.build(arch, out, numba=numba, prebuilt=wheel(arch, root=root))

    directory = cached("wheelhouse", f"{arch}-{key}", build, root=root) / arch
    (found,) = directory.glob("plexichat-*.whl")
    return found, directory / "wheelhouse"


# --------------------------------------------------------------------------
# dist/<arch>/: what the guests install
# --------------------------------------------------------------------------
def newest_source() -> float:
    """mtime of the newest file that goes into the wheel (the old freshness test)."""
    paths = [REPO / "setup.py", REPO / "pyproject.toml"]
    paths += [p for p in (REPO / "src" / "plexichat").rglob("*") if p.is_file()]
    return max(
        p.stat().st_mtime for p in paths if p.suffix not in {".so", ".c", ".html"}
    )


def recorded_key(arch: str, dist: Path | None = None) -> str | None:
    """The artifact key ``dist/<arch>/`` was built from, or None."""
    try:
        return ((dist or DIST) / arch / KEY_FILE).read_text().strip() or None
    except OSError:
        return None


def ensure_artifacts(
    arch: str,
    *,
    rebuild: bool = False,
    numba: bool = False,
    progress: Callable[[str], None] = print,
) -> tuple[Path, Path]:
    """(wheel, wheelhouse) of *arch* in dist/; remade unless made from these sources.

    Freshness is the content key (:func:`artifact_key`) recorded in
    ``dist/<arch>/.artifact-key``.  Artifacts from before the key was
    recorded are adopted once when their mtimes say they are fresh.  The
    wheel comes from the store (:func:`wheel`): built there once per source
    state, then copied; *rebuild* builds the stored wheel again too.
    """
    key = artifact_key(arch, numba=numba)
    found = wheels.artifacts(arch, DIST)
    if found and not rebuild:
        has_numba = any(found[1].glob("numba-*.whl"))
        recorded = recorded_key(arch)
        if recorded == key:
            return found
        if (
            recorded is None
            and has_numba == numba
            and found[0].stat().st_mtime >= newest_source()
        ):
            (DIST / arch / KEY_FILE).write_text(key + "\n")
            return found
    start = time.monotonic()
    built = wheel(arch, rebuild=rebuild)
    stored = time.monotonic() - start  # the store's build (0 when it had the wheel)
    result = wheels.build(arch, DIST, numba=numba, prebuilt=built)
    result.seconds["wheel"] = round(result.seconds.get("wheel", 0.0) + stored, 2)
    (DIST / arch / KEY_FILE).write_text(key + "\n")
    progress(
        f"built {result.wheel.name} in {time.monotonic() - start:.1f} s "
        f"{result.seconds}"
    )
    return result.wheel, result.wheelhouse
