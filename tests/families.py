"""The tiny model families the tests run on, and which of them have which roles.

Tests take a family from the ``family`` fixture (tests/conftest.py), or parametrize with
:func:`families_with` / :func:`family_cases` where a role decides which families a case fits. A
family's roles come from its adapter as the registry declares it, specialised by the config
attributes its variants read: no model is built to collect the tests, and a parametrization is
generated only where the family has what the test needs (absent roles are no skips).
``pytest --family llama --family mamba`` restricts all of them to the named families.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cache
from types import SimpleNamespace
from typing import Any

import pytest

from anylens import registry
from anylens.core.spec import AdapterSpec
from anylens.testing import TINY_BUILDERS

#: Every tiny family, in the order of ``anylens.testing.TINY_BUILDERS``.
ALL_FAMILIES: tuple[str, ...] = tuple(TINY_BUILDERS)

#: The family of tests whose subject is an interface, not an architecture.
ANY_FAMILY = ALL_FAMILIES[0]

#: family -> (the adapter that serves its tiny model, the config attributes its adapter's
#: variants read). tests/conformance/test_family_table.py checks this against the built models.
ADAPTER_OF: dict[str, tuple[str, dict[str, Any]]] = {family: (family, {}) for family in ALL_FAMILIES} | {
    "gpt_neox": ("gpt_neox", {"use_parallel_residual": True}),
    "gpt_neox_sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "opt": ("opt", {"do_layer_norm_before": True}),
    "mamba_ssm": ("mamba_ssm", {"fused_add_norm": True}),
}

#: The families chosen with ``--family`` (all of them unless restricted); set by tests/conftest.py.
selected: tuple[str, ...] = ALL_FAMILIES


def select(names: Iterable[str]) -> None:
    """Restrict every family parametrization to ``names`` (in the families' own order)."""
    global selected
    names = list(names)
    unknown = [name for name in names if name not in ALL_FAMILIES]
    if unknown:
        raise pytest.UsageError(
            f"--family {', '.join(unknown)}: no such tiny family; families: {', '.join(ALL_FAMILIES)}"
        )
    selected = tuple(family for family in ALL_FAMILIES if family in names) if names else ALL_FAMILIES


@cache
def spec_of(family: str) -> AdapterSpec:
    """The adapter of ``family``'s tiny model, with the variants its config selects applied."""
    name, config = ADAPTER_OF[family]
    return registry().adapter(name).specialize(SimpleNamespace(**config))


Need = Callable[[AdapterSpec], bool]


def families_with(*roles: str, where: Need | None = None) -> list[str]:
    """The selected families whose adapter has every one of ``roles`` and satisfies ``where``."""
    return [
        family
        for family in selected
        if all(role in spec_of(family).roles for role in roles) and (where is None or where(spec_of(family)))
    ]


def family_cases(
    cases: Iterable[Any], where: Need | None = None, ids: Callable[[tuple], str] | None = None
) -> list[Any]:
    """``pytest.param(family, *case)`` for each selected family and each case whose role (its
    first item; a bare string is a case of one role) the family has, with the id
    ``FAMILY-ids(case)`` (the role by default). Use with
    ``@pytest.mark.parametrize("family,role,...", family_cases(CASES))``."""
    params = []
    for family in selected:
        for case in cases:
            case = case if isinstance(case, tuple) else (case,)
            if case[0] in spec_of(family).roles and (where is None or where(spec_of(family))):
                params.append(pytest.param(family, *case, id=f"{family}-{(ids or (lambda c: c[0]))(case)}"))
    return params


def has_head_decomposition(spec: AdapterSpec) -> bool:
    """``z`` feeds the residual stream through the output projection ``W_O`` (per-head writers)."""
    return "z" in spec.roles and spec.z_feeds_residual and spec.out_proj is not None
