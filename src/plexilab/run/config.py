"""The options of one cluster run (:class:`ClusterConfig`) and its backend env."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

InstallMode = Literal["dev", "wheel"]
BACKEND_VAR = "PLEXICHAT_BACKEND"  # and PLEXICHAT_BACKEND_<FAMILY> (plexichat.accel)


def lab_backend_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``PLEXICHAT_BACKEND*`` variables of the lab's environment."""
    env = os.environ if environ is None else environ
    return {
        k: v
        for k, v in env.items()
        if k == BACKEND_VAR or k.startswith(f"{BACKEND_VAR}_")
    }


class ClusterError(RuntimeError):
    """The cluster could not be brought up or a step failed."""


@dataclass
class ClusterConfig:
    """One cluster run (defaults: a short local run)."""

    nodes: int = 3
    replicas: int = 2
    duration: float = 30.0
    count: int = 50_000_000
    clients: int = 8
    inflight: int = 64
    mode: Literal["closed", "open"] = "closed"
    rate: float = 20_000.0
    payload: int = 64
    channels: int = 256
    connections: int = 1  # load connections per node shared by clients (0: own)
    distribution: Literal["uniform", "zipf"] = "uniform"
    route: Literal["owner", "any"] = "owner"
    # None: what the lab's environment asks for (PLEXICHAT_BACKEND and the
    # PLEXICHAT_BACKEND_<FAMILY> overrides); auto or python replaces all of it
    backend: Literal["auto", "python"] | None = None
    gossip_interval: float = 0.2
    ping_timeout: float = 0.3
    suspect_timeout: float = 1.0
    p2p_count: int = 200
    p2p_rate: float = 200.0
    p2p_fanout: int = 2
    check_replicas: bool = True  # the checker compares every replica's history
    converge_timeout: float = 60.0
    step_timeout: float = 600.0
    install: InstallMode = "dev"
    results_dir: Path | None = None
    node_args: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # kinds (plexilab.run.faults)
    fault_interval: float = 10.0  # seconds between fault starts
    fault_duration: float = 0.0  # seconds a fault lasts (0: interval / 2)
    # seconds before the load gives a request up (and sends its channel
    # through another node); 0: 10 s, or with faults twice the suspicion
    # timeout within 2..10 s (a client does not wait out a paused node)
    request_timeout: float = 0.0
    # auth: a per-run cluster secret, peers handshake, clients present tokens
    # (the default, and all a lab run uses); tls: also the load speaks TLS to
    # the nodes' TLS listeners (local hosts); insecure: nodes run open, only
    # as the baseline of the security benchmark (local.bench-security)
    security: Literal["auth", "tls", "insecure"] = "auth"

    def backend_env(self) -> dict[str, str]:
        """``PLEXICHAT_BACKEND*`` for the nodes and lab tools of this run."""
        inherited = lab_backend_env()
        if self.backend is None:
            return {BACKEND_VAR: "auto", **inherited}
        # blank the per-family overrides (empty means unset to plexichat.accel)
        return {**dict.fromkeys(inherited, ""), BACKEND_VAR: self.backend}

    @property
    def requested_backend(self) -> str:
        """The backend the run asks for: ``python``, ``auto``, or with overrides."""
        env = self.backend_env()
        wanted = env.pop(BACKEND_VAR).strip().lower() or "auto"
        families = [
            f"{k.removeprefix(BACKEND_VAR + '_').lower()}={v.strip().lower()}"
            for k, v in sorted(env.items())
            if v.strip()
        ]
        return f"{wanted} ({', '.join(families)})" if families else wanted

    @property
    def load_timeout(self) -> float:
        if self.request_timeout > 0:
            return self.request_timeout
        if self.faults:
            return min(10.0, max(2.0, 2 * self.suspect_timeout))
        return 10.0
