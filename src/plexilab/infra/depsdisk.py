"""The guests' deps disk: the wheelhouse's dependencies, installed on the lab host.

A read-only ext4 disk that guests mount at ``DEPS_MOUNT``; with it a fresh
guest needs only the small plexichat wheel pushed to be ready.  The wheels
are staged by :mod:`plexilab.guest.stage_deps` (run with ``python -I -c``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from plexilab import guest
from plexilab.infra.buildsteps import cache_root, console, digest, du, mb, run

DEPS_MOUNT = "/opt/plexichat-deps"
GUEST_VENV = "/opt/plexichat"
STAGE_SCRIPT = "stage_deps.py"  # in plexilab.guest


def deps_disk(arch: str, wheelhouse: Path) -> Path:
    """A read-only ext4 disk with the wheelhouse's dependencies installed.

    The runtime dependencies (everything in *wheelhouse*) are installed on the
    lab host from their wheels into a tree that the guest mounts at
    ``DEPS_MOUNT`` (``site-packages`` is put on the guest venv's path by a
    ``.pth`` file), byte-compiled.  Pushing only the small plexichat wheel then
    makes a fresh guest ready in seconds.  Cached by wheel names and sizes and
    the bytes of the staging script.
    """
    wheels = sorted(
        p for p in wheelhouse.glob("*.whl") if not p.name.startswith("plexichat-")
    )
    installers = [p for p in wheels if p.name.startswith("installer-")]
    if not installers:
        raise RuntimeError(f"{wheelhouse} has no installer wheel")
    parts = [(p.name, str(p.stat().st_size).encode()) for p in wheels]
    script = guest.source_bytes(STAGE_SCRIPT)
    key = digest([*parts, ("arch", arch.encode()), ("stage", script)])
    final = cache_root() / "deps" / f"{arch}-{key}.qcow2"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"deps-{arch}-", dir=final.parent) as t:
        stage = Path(t) / "stage"
        stage.mkdir()
        run(
            [
                sys.executable,
                "-I",
                "-c",
                script.decode(),
                str(stage),
                GUEST_VENV,
                str(installers[0]),
                *map(str, wheels),
            ]
        )
        size_mib = du(stage) * 13 // 10 // (1 << 20) + 64
        raw = Path(t) / "deps.raw"
        run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-m", "0", "-L", "plexideps",
             "-d", str(stage), str(raw), f"{size_mib}M"]
        )  # fmt: skip
        tmp = Path(t) / "deps.qcow2"
        run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(tmp)])
        tmp.chmod(0o444)
        tmp.rename(final)
    console.log(
        f"deps disk {arch}: {len(wheels)} wheels, {mb(final.stat().st_size)} "
        f"in {time.monotonic() - start:.1f} s"
    )
    return final
