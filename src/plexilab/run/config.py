"""The options of one cluster run (:class:`ClusterConfig`) and its backend env."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from plexilab import options
from plexilab.options import (
    Chosen,
    ClusterOptions,
    FaultOptions,
    LoadOptions,
    OutputOptions,
    P2POptions,
)

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


# the option groups a cluster run takes (plexilab.options)
RUN_GROUPS: tuple[type, ...] = (ClusterOptions, LoadOptions, FaultOptions, P2POptions)


class ClusterError(RuntimeError):
    """The cluster could not be brought up or a step failed."""


@dataclass
class ClusterConfig(ClusterOptions, LoadOptions, FaultOptions, P2POptions):
    """One cluster run: the user's options (declared once, in
    :mod:`plexilab.options`; defaults: a short local run) and what the lab
    sets itself."""

    check_replicas: bool = True  # the checker compares every replica's history
    converge_timeout: float = 60.0
    step_timeout: float = 600.0
    results_dir: Path | None = None
    node_args: list[str] = field(default_factory=list)

    @classmethod
    def from_chosen(cls, chosen: Chosen, **lab: Any) -> ClusterConfig:
        """A config of the option groups a task was given (see
        :func:`plexilab.options.task`), *lab* setting the rest; the results
        directory is ``--results`` when the task has it."""
        values = options.flat(chosen, *RUN_GROUPS)
        if OutputOptions in chosen.groups and chosen[OutputOptions].results:
            values["results_dir"] = Path(chosen[OutputOptions].results)
        return cls(**{**values, **lab})

    def backend_env(self) -> dict[str, str]:
        """``PLEXICHAT_BACKEND*`` for the nodes and lab tools of this run."""
        inherited = lab_backend_env()
        if not self.backend:
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
        if self.kinds:
            return min(10.0, max(2.0, 2 * self.suspect_timeout))
        return 10.0
