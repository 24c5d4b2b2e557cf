"""Backend registry: which implementation serves each kernel family.

Every kernel family (``wire``, ``routing``, ``cache``, ``stats``) has a
pure-Python reference backend (the specification) and optional compiled
backends.  The active backend is chosen once per process:

* ``PLEXICHAT_BACKEND=python|cython|numba|auto`` sets the preference for all
  families.  A family that does not offer the named backend at all (wire has
  no Numba kernel) falls back to ``auto``; a family that offers it but cannot
  load it raises :class:`BackendUnavailable` -- asking for a compiled backend
  and silently getting the reference would hide a broken build.
* ``PLEXICHAT_BACKEND_<FAMILY>=...`` (for example ``PLEXICHAT_BACKEND_WIRE``)
  overrides the choice for one family and is always strict.
* ``auto`` takes the first loadable backend of the family's preference order,
  which is ordered fastest first (measured by ``python -m plexichat.accel
  bench``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Final, Literal, get_args

Backend = Literal["cython", "numba", "python"]
BACKENDS: Final[tuple[Backend, ...]] = get_args(Backend)
ENV_GLOBAL: Final = "PLEXICHAT_BACKEND"


@dataclass(frozen=True)
class KernelFamily:
    """The backends a kernel family offers, fastest first."""

    name: str
    modules: dict[Backend, str]

    @property
    def preference(self) -> tuple[Backend, ...]:
        return tuple(self.modules)


FAMILIES: Final[dict[str, KernelFamily]] = {
    family.name: family
    for family in (
        KernelFamily(
            "wire",
            {
                "cython": "plexichat.wire._speedups",
                "python": "plexichat.wire._reference",
            },
        ),
        KernelFamily(
            "routing",
            {
                "cython": "plexichat.routing._speedups",
                "numba": "plexichat.routing._numba",
                "python": "plexichat.routing._reference",
            },
        ),
        KernelFamily(
            "cache",
            {
                "cython": "plexichat.cache._speedups",
                "python": "plexichat.cache._reference",
            },
        ),
        KernelFamily(
            "stats",
            {
                "cython": "plexichat.stats._speedups",
                "numba": "plexichat.stats._numba",
                "python": "plexichat.stats._reference",
            },
        ),
    )
}


class BackendUnavailable(ImportError):
    """A backend that was asked for explicitly cannot be loaded."""


@dataclass(frozen=True)
class Selection:
    """The backend chosen for one family and why."""

    family: str
    backend: Backend
    source: str  # "auto", "PLEXICHAT_BACKEND" or "PLEXICHAT_BACKEND_<FAMILY>"


@dataclass(frozen=True)
class FamilyStatus:
    """One row of the registry table."""

    family: str
    active: Backend
    source: str
    available: tuple[Backend, ...]
    missing: dict[Backend, str]


_probed: dict[tuple[str, Backend], ModuleType | str] = {}
_selected: dict[str, tuple[Selection, ModuleType]] = {}


def family(name: str) -> KernelFamily:
    """Return the family called *name* or raise a clear ``KeyError``."""
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise KeyError(f"unknown kernel family {name!r} (known: {known})") from None


def env_name(family_name: str) -> str:
    """The per-family override variable, e.g. ``PLEXICHAT_BACKEND_WIRE``."""
    return f"{ENV_GLOBAL}_{family_name.upper()}"


def _parse(variable: str) -> Backend | Literal["auto"] | None:
    raw = os.environ.get(variable, "").strip().lower()
    if not raw:
        return None
    if raw == "auto":
        return "auto"
    for backend in BACKENDS:
        if raw == backend:
            return backend
    choices = ", ".join((*BACKENDS, "auto"))
    raise ValueError(f"{variable}={raw!r} is not one of: {choices}")


def probe(family_name: str, backend: Backend) -> ModuleType | str:
    """Import one backend module; return it, or the reason it cannot load."""
    spec = family(family_name)
    key = (family_name, backend)
    if key not in _probed:
        module_name = spec.modules.get(backend)
        if module_name is None:
            _probed[key] = f"{family_name} has no {backend} backend"
        else:
            try:
                _probed[key] = importlib.import_module(module_name)
            except ImportError as exc:
                _probed[key] = f"{type(exc).__name__}: {exc}"
    return _probed[key]


def available(family_name: str) -> list[Backend]:
    """Backends of *family_name* that import here, fastest first."""
    spec = family(family_name)
    return [b for b in spec.preference if isinstance(probe(family_name, b), ModuleType)]


def load_backend(family_name: str, backend: Backend) -> ModuleType:
    """Return the module of one backend or raise :class:`BackendUnavailable`."""
    result = probe(family_name, backend)
    if isinstance(result, str):
        raise BackendUnavailable(
            f"{family_name} backend {backend!r} is unavailable: {result}"
        )
    return result


def _choose(family_name: str) -> tuple[Selection, ModuleType]:
    spec = family(family_name)
    override = env_name(family_name)
    wanted = _parse(override)
    if wanted is not None and wanted != "auto":
        return Selection(family_name, wanted, override), load_backend(
            family_name, wanted
        )
    if wanted is None:
        wanted = _parse(ENV_GLOBAL)
        if wanted is not None and wanted != "auto" and wanted in spec.modules:
            return Selection(family_name, wanted, ENV_GLOBAL), load_backend(
                family_name, wanted
            )
    for backend in spec.preference:
        result = probe(family_name, backend)
        if isinstance(result, ModuleType):
            return Selection(family_name, backend, "auto"), result
    raise BackendUnavailable(f"no backend of {family_name} can be loaded")


def load(family_name: str) -> ModuleType:
    """Return the active backend module of a family (chosen once per process)."""
    if family_name not in _selected:
        _selected[family_name] = _choose(family_name)
    return _selected[family_name][1]


def active(family_name: str) -> Backend:
    """Name of the backend that serves *family_name* in this process."""
    load(family_name)
    return _selected[family_name][0].backend


def selection(family_name: str) -> Selection:
    """The selection record (backend and what decided it) of a family."""
    load(family_name)
    return _selected[family_name][0]


def status() -> list[FamilyStatus]:
    """Registry table: active, available and missing backends per family."""
    rows = []
    for name, spec in FAMILIES.items():
        chosen = selection(name)
        missing: dict[Backend, str] = {}
        for backend in spec.preference:
            result = probe(name, backend)
            if isinstance(result, str):
                missing[backend] = result
        rows.append(
            FamilyStatus(
                family=name,
                active=chosen.backend,
                source=chosen.source,
                available=tuple(available(name)),
                missing=missing,
            )
        )
    return rows


def compiled_everywhere() -> bool:
    """True when every family is served by a compiled backend."""
    return all(active(name) != "python" for name in FAMILIES)


def summary() -> str:
    """``compiled`` when every family runs compiled code, else ``python``/mixed."""
    backends = {active(name) for name in FAMILIES}
    if "python" not in backends:
        return "compiled"
    return "python" if backends == {"python"} else "mixed"


def reset() -> None:
    """Forget probes and selections (for tests that change the environment)."""
    _probed.clear()
    _selected.clear()
