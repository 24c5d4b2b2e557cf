"""Build the optional Cython speedups of every kernel family.

Every ``src/plexichat/<family>/_speedups.pyx`` becomes an extension module.
Extensions are required by default: a build that cannot compile them fails
loudly.  ``PLEXICHAT_PURE_PYTHON=1`` opts into a pure-Python install (the
reference backends only), the way msgpack's ``MSGPACK_PUREPYTHON`` does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class ReplacingBuildExt(build_ext):
    """In-place builds replace a loaded ``.so`` instead of overwriting it.

    Copying over a shared object that a running process has mapped crashes
    that process; unlinking first gives the new build a fresh inode.
    """

    def copy_file(  # type: ignore[override]
        self, infile: str, outfile: str, *args: Any, **kwargs: Any
    ) -> tuple[str, bool]:
        if (
            self.inplace
            and outfile.endswith((".so", ".pyd"))
            and os.path.exists(outfile)
        ):
            os.unlink(outfile)
        return super().copy_file(infile, outfile, *args, **kwargs)


ROOT = Path(__file__).parent
SRC = ROOT / "src"
VENDOR = SRC / "plexichat" / "vendor"


def truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def extensions() -> list[Extension]:
    if truthy("PLEXICHAT_PURE_PYTHON"):
        if truthy("PLEXICHAT_REQUIRE_EXTENSIONS"):
            sys.exit("PLEXICHAT_PURE_PYTHON and PLEXICHAT_REQUIRE_EXTENSIONS conflict")
        print("PLEXICHAT_PURE_PYTHON set: building without compiled speedups")
        return []
    from Cython.Build import cythonize

    sources = sorted(SRC.glob("plexichat/*/_speedups.pyx"))
    only = {f for f in os.environ.get("PLEXICHAT_ONLY", "").split(",") if f}
    if only:  # developer shortcut: rebuild just these families in place
        sources = [p for p in sources if p.parent.name in only]
    if not sources:
        sys.exit("no Cython sources found under src/plexichat/*/_speedups.pyx")
    optimize = os.environ.get("PLEXICHAT_OPT", "-O3")
    modules = [
        Extension(
            str(path.relative_to(SRC).with_suffix("")).replace(os.sep, "."),
            [str(path.relative_to(ROOT))],
            include_dirs=[str(VENDOR / "xxhash")],
            extra_compile_args=[optimize, "-Wno-unused-function"],
        )
        for path in sources
    ]
    return cythonize(
        modules,
        language_level=3,
        nthreads=int(os.environ.get("PLEXICHAT_CYTHON_JOBS", "0")) or None,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": ReplacingBuildExt})
