"""Invoke tasks of the PlexiChat lab (thin: the work lives in ``src/plexilab``).

``invoke --list`` shows every namespace; ``invoke --help TASK`` its options.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "src"))

from invoke.collection import Collection

from plexilab.cli.deps import deps
from plexilab.cli.docker import docker
from plexilab.cli.inventory import inventory
from plexilab.cli.local import local
from plexilab.cli.nightly import nightly
from plexilab.cli.qemu import qemu
from plexilab.cli.setup import setup

ns = Collection()
ns.add_collection(deps)
ns.add_collection(docker)
ns.add_collection(inventory)
ns.add_collection(local)
ns.add_collection(nightly)
ns.add_collection(qemu)
ns.add_collection(setup)
