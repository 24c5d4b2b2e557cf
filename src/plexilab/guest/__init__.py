"""Code that runs inside guests or as lab relays, shipped as files.

Each module here is a stand-alone script: it needs only the standard library
of the guests' Python 3.11 (plus, for the installers, the ``installer``
wheel put on ``sys.path`` at run time) and imports nothing from plexilab, so
it runs where plexilab is not installed.  The lab ships a module's source
(:func:`source`) over SSH, into a run directory or to ``python -c``; this
package is linted, type-checked and tested like the rest of ``src/``.

* :mod:`plexilab.guest.relay`: the guestfwd relay between guests;
* :mod:`plexilab.guest.install`: installs a wheelhouse offline into a venv;
* :mod:`plexilab.guest.stage_deps`: stages the guests' dependency disk.
"""

from __future__ import annotations

from importlib.resources import files


def source_bytes(module: str) -> bytes:
    """The file of guest *module* (e.g. ``"relay.py"``), as bytes."""
    return files(__name__).joinpath(module).read_bytes()


def source(module: str) -> str:
    """The source text of guest *module* (e.g. ``"relay.py"``)."""
    return source_bytes(module).decode()
