"""Shared fixtures: every kernel test runs against every available backend."""

from __future__ import annotations

from types import ModuleType

import pytest

from plexichat import accel


def backend_params(family: str) -> list[object]:
    """``pytest.param`` per backend of *family*; unavailable ones are reported.

    A backend that is missing shows up as a skip with the import error as its
    reason, so a broken build is visible in ``-ra`` output; the nox ``tests``
    session additionally runs ``python -m plexichat.accel --require-compiled``
    so a missing Cython backend fails CI instead of hiding behind a skip.
    """
    params: list[object] = []
    for backend in accel.FAMILIES[family].preference:
        result = accel.probe(family, backend)
        marks = []
        if isinstance(result, str):
            marks.append(pytest.mark.skip(reason=f"{family}/{backend}: {result}"))
        params.append(pytest.param(backend, id=backend, marks=marks))
    return params


def load(family: str, backend: str) -> ModuleType:
    return accel.load_backend(family, backend)  # type: ignore[arg-type]


@pytest.fixture(params=backend_params("wire"))
def wire_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load("wire", request.param)


@pytest.fixture(params=backend_params("routing"))
def routing_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load("routing", request.param)


@pytest.fixture(params=backend_params("cache"))
def cache_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load("cache", request.param)


@pytest.fixture(params=backend_params("stats"))
def stats_impl(request: pytest.FixtureRequest) -> ModuleType:
    return load("stats", request.param)
