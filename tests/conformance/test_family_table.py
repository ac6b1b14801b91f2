"""The family table the tests parametrize from (tests/families.py) says what the built tiny
models have, and ``--family`` restricts every family parametrization to the named families."""

from __future__ import annotations

from pathlib import Path

import families
import pytest
from tiny_models import model_cache

from anylens.testing import TINY_BUILDERS

TESTS = Path(__file__).resolve().parents[1]
model_of = model_cache()


def test_the_adapter_table_names_only_tiny_families():
    assert set(families.ADAPTER_OF) == set(TINY_BUILDERS)


def test_declared_adapter_is_the_built_models_adapter(family):
    """Roles and facts read from the registry without a model equal those of the wrapped model."""
    assert model_of(family).adapter == families.spec_of(family)


def test_families_with_keeps_the_families_that_have_every_role():
    with_heads = families.families_with("z", "pattern")
    assert "gpt2" in with_heads and "mamba" not in with_heads
    assert set(with_heads) == {f for f in families.selected if {"z", "pattern"} <= set(families.spec_of(f).roles)}
    assert families.families_with("z", where=lambda spec: False) == []
    cases = families.family_cases([("z", 1), "mixer_out"])
    assert [p.id for p in cases if p.values[0] in ("gpt2", "mamba")] == ["gpt2-z", "mamba-mixer_out"]


SAMPLE = """
import pytest
from families import family_cases


def test_fixture(family):
    pass


@pytest.mark.needs_roles("z")
def test_heads(family):
    pass


@pytest.mark.parametrize("family,role", family_cases(["mixer_out"]))
def test_cases(family, role):
    pass


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_listed(family):
    pass
"""


@pytest.fixture
def sample(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(families=(TESTS / "families.py").read_text(), test_sample=SAMPLE)
    return pytester


def test_family_option_restricts_every_family_parametrization(sample: pytest.Pytester):
    result = sample.runpytest_subprocess("--co", "-q", "--family", "mamba", "--family", "llama")
    collected = sorted(line.split("::")[1] for line in result.outlines if "::" in line)
    assert collected == [
        "test_cases[mamba-mixer_out]",
        "test_fixture[llama]",
        "test_fixture[mamba]",
        "test_heads[llama]",
        "test_listed[llama]",
    ]
    result.stdout.fnmatch_lines(["*1 deselected*"])  # test_listed[gpt2], a list of its own


def test_unknown_family_is_a_usage_error_listing_the_families(sample: pytest.Pytester):
    result = sample.runpytest_subprocess("--co", "--family", "nonesuch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--family nonesuch: no such tiny family; families: gpt2, llama,*"])
