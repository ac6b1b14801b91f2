"""Test-suite settings, the ``family`` fixture, and ``zoo`` (the shipped zoo models, loaded once per module).

One torch thread per process: the tiny models spend their time in per-op overhead, where
threads only contend (a tiny forward goes from ~6 ms to hundreds of ms on a busy 2-core
machine). The real-model tier raises it again for its large matrix products.

A test that takes ``family`` (directly or through a fixture) runs once per tiny family; with
``@pytest.mark.needs_roles("z", where=...)`` only on the families whose adapter has those roles
(and satisfies ``where``, a predicate on the adapter spec), so a family never shows up as a skip
for a role it cannot have. ``--family NAME`` (repeatable) restricts every family parametrization,
including those built with tests/families.py, to the named families.
"""

from collections.abc import Callable
from typing import Any

import families
import pytest
import torch

torch.set_num_threads(1)

pytest_plugins = ["pytester"]  # tests/conformance/test_family_table.py runs pytest on a sample


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--family",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run family-parametrized tests only on these tiny families (repeatable): {', '.join(families.ALL_FAMILIES)}",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_roles(*roles, where=None): parametrize `family` only over the families that have them"
    )
    families.select(config.getoption("family"))


def _parametrized_directly(metafunc: pytest.Metafunc, name: str) -> bool:
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs["argnames"]
        if name in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "family" not in metafunc.fixturenames or _parametrized_directly(metafunc, "family"):
        return
    marker = metafunc.definition.get_closest_marker("needs_roles")
    roles, where = (marker.args, marker.kwargs.get("where")) if marker else ((), None)
    metafunc.parametrize("family", families.families_with(*roles, where=where), indirect=True, scope="module")


@pytest.fixture(scope="module")
def family(request: pytest.FixtureRequest) -> str:
    """A tiny family name (see tests/families.py); module scope so that model fixtures may be too."""
    return request.param


@pytest.fixture(scope="module")
def zoo() -> Callable[[str], Any]:
    """``zoo(name)``: the shipped zoo model ``zoo:<name>``, loaded once per test module."""
    import anylens as al

    loaded: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in loaded:
            loaded[name] = al.load(f"zoo:{name}")
        return loaded[name]

    return get


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--family``, deselect family parametrizations of other families however they were made."""
    if families.selected == families.ALL_FAMILIES:
        return
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        family = callspec.params.get("family") if callspec else None
        (drop if family in families.ALL_FAMILIES and family not in families.selected else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
