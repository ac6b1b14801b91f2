"""TransformerLens / SAELens hook names as aliases of roles, on every tiny family.

An alias must be the role itself: the same tensor read (``torch.equal``), and a write through it
must reach the model exactly as a write through the role does. An alias whose role the family
lacks fails with the adapter's role list.
"""

from __future__ import annotations

import families
import pytest
import torch
from tiny_models import model_cache

import anylens as al
from anylens.core.tl_names import LAYER_HOOK_ROLES, MODEL_HOOK_ROLES

LAYER = 1  # every tiny model has 3 layers; a middle one catches an off-by-one
PROMPT = "the cat sat on the mat"

#: (role, hook name) for every alias, per-layer ones at LAYER.
ALIASES = [(role, f"blocks.{LAYER}.{suffix}") for suffix, role in LAYER_HOOK_ROLES.items()] + [
    (role, name) for name, role in MODEL_HOOK_ROLES.items()
]

model_of = model_cache()


def layer_of(role: str) -> int | None:
    return LAYER if role in al.LAYER_ROLES else None


def absent_cases() -> list:
    """``(family, role, name)`` for each alias whose role the family's adapter lacks."""
    return [
        pytest.param(family, role, name, id=f"{family}-{name}")
        for family in families.selected
        for role, name in ALIASES
        if role not in families.spec_of(family).roles
    ]


@pytest.mark.parametrize("family,role,name", families.family_cases(ALIASES, ids=lambda case: case[1]))
def test_alias_reads_and_writes_the_role(family, role, name):
    model = model_of(family)
    layer = layer_of(role)
    access = model.role(role)
    with model.trace(PROMPT):
        through_alias = model.role(name).save()
        through_role = access.read(layer).save()
        clean = model.logits.save()
    assert torch.equal(through_alias, through_role)

    # A different value of the same shape; a ramp, not a constant, because a branch input goes
    # through a norm, which undoes a shift and a scale.
    ramp = torch.linspace(0.0, 1.0, through_role.shape[-1], device=through_role.device)
    value = through_role * 0.5 + ramp
    with model.trace(PROMPT):
        model.role(name).write(value)
        by_alias = model.logits.save()
    with model.trace(PROMPT):
        access.write(layer, value)
        by_role = model.logits.save()
    assert not torch.allclose(by_alias, clean, atol=1e-4), "the write through the alias did not reach the logits"
    assert torch.equal(by_alias, by_role)


@pytest.mark.parametrize("family,role,name", absent_cases())
def test_alias_of_an_absent_role_names_the_role_and_the_adapters_roles(family, role, name):
    model = model_of(family)
    with pytest.raises(al.MissingRoleError) as error:
        model.role(name)
    message = str(error.value)
    assert f"{name!r}" in message and f"role {role!r}" in message and f"adapter {model.adapter.name!r}" in message
    assert f"it provides: {', '.join(model.roles)}" in message


def test_item_assignment_through_an_alias_reaches_the_next_layer():
    model = model_of(families.ANY_FAMILY)
    with model.trace(PROMPT):
        model.role(f"blocks.{LAYER}.hook_resid_post")[:, -1] = 0
        next_input = model.resid_pre[LAYER + 1].save()
    assert torch.equal(next_input[:, -1], torch.zeros_like(next_input[:, -1]))
    assert next_input[:, :-1].abs().amin(dim=-1).gt(0).all()  # only the last position was edited


def test_layer_out_of_range_in_a_hook_name_is_a_layer_error():
    model = model_of(families.ANY_FAMILY)
    with pytest.raises(al.LayerIndexError, match="layer 7 is out of range"):
        model.role("blocks.7.hook_resid_post")


@pytest.mark.parametrize("role,name", ALIASES)
def test_role_for_hook_and_hook_for_role_are_inverse(role, name):
    assert al.role_for_hook(name) == (role, layer_of(role))
    assert al.hook_for_role(role, layer_of(role)) == name


@pytest.mark.parametrize(
    "name,suggestion",
    [
        ("blocks.3.hook_resid_pst", "blocks.3.hook_resid_post"),
        ("hook_embd", "hook_embed"),
        ("blocks.3.attn.hook_zz", None),
    ],
)
def test_unknown_hook_name_lists_the_names_with_a_suggestion(name, suggestion):
    for call in (al.role_for_hook, model_of(families.ANY_FAMILY).role):
        with pytest.raises(al.HookNameError) as error:
            call(name)
        message = str(error.value)
        assert f"{name!r} is not a supported TransformerLens hook name" in message
        assert "blocks.{i}.hook_resid_post" in message and "ln_final.hook_normalized" in message
        if suggestion:
            assert f"did you mean {suggestion!r}" in message
    assert issubclass(al.HookNameError, al.MissingRoleError) and issubclass(al.HookNameError, LookupError)


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: al.hook_for_role("mixer_out", 0), "has no TransformerLens hook name"),
        (lambda: al.hook_for_role("resid_post"), "is per layer: give the layer"),
        (lambda: al.hook_for_role("embed", 2), "is model-level"),
    ],
)
def test_hook_for_role_refuses_what_has_no_name(call, fragment):
    with pytest.raises(al.HookNameError, match=fragment):
        call()
