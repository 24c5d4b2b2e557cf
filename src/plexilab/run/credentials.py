"""The cluster secret of a run: made fresh per run, never in an image.

The nodes get it as a private file in their host's workdir; the lab's tools
(load generator, checker, STATS) read a private copy on the lab machine.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

from plexilab.host import Host

SECRET_NAME = "cluster.secret"


def admin_token(secret: bytes | None) -> str | None:
    """An admin token of the cluster whose secret is *secret* (None: none)."""
    from plexichat.node.auth import Credentials  # lab side: plexichat from src

    return None if secret is None else Credentials(secret).token(1, admin=True)


def write_secret_file(path: Path, secret: bytes) -> None:
    """*secret* in a file only its owner may read, as the nodes read it."""
    from plexichat.node.auth import write_secret  # lab side: plexichat from src

    write_secret(path, secret)


class RunSecret:
    """The secret of one run (None for an insecure run) and where it lies."""

    def __init__(self, enabled: bool = True) -> None:
        self.secret: bytes | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="plexilab-secret-"))
        self.file = self.dir / SECRET_NAME
        if enabled:
            self.secret = secrets.token_bytes(32)
            write_secret_file(self.file, self.secret)
        self._delivered: set[int] = set()  # ids of hosts that have it

    @staticmethod
    def on_host(host: Host) -> str:
        """Where the secret lies on *host*."""
        return f"{host.workdir()}/{SECRET_NAME}"

    def deliver(self, host: Host) -> None:
        """Put the secret on *host* (once per host), readable by its owner only."""
        if id(host) in self._delivered or self.secret is None:
            return
        remote = self.on_host(host)
        host.put(self.file, remote)
        host.run(["chmod", "600", remote], timeout=30)
        self._delivered.add(id(host))

    def tool_args(self) -> list[str]:
        """``--secret-file`` of the lab's tools (none for an insecure run)."""
        return [] if self.secret is None else ["--secret-file", str(self.file)]

    def close(self) -> None:
        """Remove the lab's copy."""
        shutil.rmtree(self.dir, ignore_errors=True)
