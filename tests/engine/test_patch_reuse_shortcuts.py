"""The finer shortcuts of reuse: growing forwards (each patched row joins at its own block) and
block prefixes (modules of a batch's first block that return before the role are handed their
unpatched outputs). Each must do less work, on every tiny family, and each must be taken back,
with a warning and right results, where it does not reproduce the unpatched run."""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import pytest
import torch
from nnsight.intervention.source import STATE
from tiny_models import random_prompt_pairs

import anylens as al
from anylens.engine import Component, PatchPlan, block_prefix, engine_state, record, reuse, shortcut
from anylens.engine import baseline as recording
from anylens.engine.scheduling import RowBatch
from anylens.testing import tiny

TOL = 1e-5
METRIC = al.metrics.logit_diff(300, 301)
LENGTH = 10
DIFFERENT = (3, 7)


def fresh(family: str):
    """A model of its own: the shortcuts a test turns off stay off for that model only."""
    try:
        return tiny(family)
    except ImportError as error:
        pytest.skip(f"tiny {family!r} cannot be built here: {error}")


def metrics_of(result) -> torch.Tensor:
    return torch.tensor(result.to_frame()["metric"].to_numpy())


@contextmanager
def batch_rows_seen(model, modules: list[str], monkeypatch):
    """Batch rows of each module's output in the sweep's patched forwards (not the recordings),
    with plain torch hooks."""
    seen: dict[str, list[int]] = defaultdict(list)
    inside = {"on": False}
    original = reuse.shortcut_forward

    def flagged(*args, **kwargs):
        inside["on"] = True
        try:
            return original(*args, **kwargs)
        finally:
            inside["on"] = False

    monkeypatch.setattr(reuse, "shortcut_forward", flagged)

    def hook(name):
        def record(module, args, output):
            if inside["on"]:
                seen[name].append((output[0] if isinstance(output, tuple) else output).shape[0])

        return record

    handles = [model.module(name).register_forward_hook(hook(name)) for name in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def forwards_run(model, modules: list[str]):
    """How often each module's own forward runs (a skipped module's does not, though its torch
    hooks still fire): nnsight runs a wrapped module's forward as the body of its state."""
    runs = dict.fromkeys(modules, 0)
    states = [model.module(name).__dict__[STATE] for name in modules]
    bodies = [state.body for state in states]

    def counted(name, body):
        def run(*args, **kwargs):
            runs[name] += 1
            return body(*args, **kwargs)

        return run

    for name, state, body in zip(modules, states, bodies):
        state.body = counted(name, body)
    try:
        yield runs
    finally:
        for state, body in zip(states, bodies):
            state.body = body


def test_each_row_joins_the_forward_at_its_own_block(family, monkeypatch):
    model = fresh(family)
    clean, corrupt = random_prompt_pairs(0, LENGTH, DIFFERENT)
    clean, corrupt = clean[:2], corrupt[:2]
    kwargs = dict(role="resid_pre", over=("layer",), metric=METRIC, batch_size=64)
    full = al.patch(model, clean, corrupt, reuse=False, **kwargs)
    al.patch(model, clean, corrupt, **kwargs)  # verifies the shortcut: no guard forward after this
    blocks = [f"{model.adapter.layers}.{k}" for k in range(model.n_layers)]
    with batch_rows_seen(model, blocks, monkeypatch) as seen:
        reused = al.patch(model, clean, corrupt, **kwargs)
    assert (metrics_of(reused) - metrics_of(full)).abs().max() <= TOL
    # One forward; block k runs only the rows patched at layers up to k (two pairs each).
    assert reused.meta["forwards"] == 1
    # (A model whose sliding window dropped the prefix's keys runs the prefix first: the last call.)
    assert [seen[name][-1] for name in blocks] == [2 * (k + 1) for k in range(model.n_layers)]
    assert engine_state(model).reuse_off_reason is None and engine_state(model).growing_off_reason is None


def test_modules_before_the_role_do_not_run_in_a_batchs_first_block(family, monkeypatch):
    model = fresh(family)
    role = next(r for r in ("z", "mixer_out", "resid_post") if r in model.roles)
    layer = model.n_layers - 1
    modules = block_prefix.prefix_modules(model, role, layer, layer)
    # Attention: at least the norm and the projections that make q, k and v; an SSM: the norm.
    assert len(modules) >= {"z": 2, "mixer_out": 1}.get(role, 0)
    clean, corrupt = random_prompt_pairs(0, LENGTH, DIFFERENT)
    kwargs = dict(role=role, over=("layer",), layers=[layer], metric=METRIC)
    full = al.patch(model, clean, corrupt, reuse=False, **kwargs)
    al.patch(model, clean, corrupt, **kwargs)
    role_module = model.role(role).path.torch_module_path(layer)
    # The same modules one block earlier: that block is skipped whole in the patched forward,
    # so they run only where every module runs (the recording; a prefix run of the cache).
    earlier = {name: name.replace(f".{layer}.", f".{layer - 1}.", 1) for name in [*modules, role_module]}
    with forwards_run(model, [*earlier, *earlier.values()]) as runs:
        reused = al.patch(model, clean, corrupt, **kwargs)
    assert (metrics_of(reused) - metrics_of(full)).abs().max() <= TOL
    assert runs[role_module] == runs[earlier[role_module]] + 1, runs  # the patched forward runs it
    assert all(runs[name] == runs[earlier[name]] for name in modules), runs  # and none of these
    assert engine_state(model).prefix_off_reason is None


@pytest.mark.parametrize(
    "family,expected",
    [
        # GPT-2's block: ln_1, then c_attn makes q, k and v, attention, then c_proj reads z.
        ("gpt2", ("transformer.h.1.ln_1", "transformer.h.1.attn.c_attn")),
        # LLaMA's: input_layernorm, then q_proj, k_proj, v_proj, attention, then o_proj reads z.
        ("llama", tuple(f"model.layers.1.{m}" for m in ("input_layernorm", *(f"self_attn.{x}_proj" for x in "qkv")))),
    ],
)
def test_block_prefix_of_z_follows_the_documented_forward(family, expected):
    model = fresh(family)
    assert block_prefix.prefix_modules(model, "z", 1, 1) == expected
    assert block_prefix.prefix_modules(model, "resid_pre", 1, 1) == ()  # nothing runs before a block's input


def test_block_prefix_keeps_the_outermost_module_and_only_cuttable_ones():
    model = fresh("gpt2")
    # Before resid_mid (ln_2's input) the whole attention has returned: its children are not
    # listed beside it, unless its output cannot be handed back (GPT-2's attention returns
    # weights too, which is not a residual-only output) and its children stand in for it.
    modules = block_prefix.prefix_modules(model, "resid_mid", 1, 1)
    order = block_prefix.call_order(model)
    assert modules[0] == "transformer.h.1.ln_1"
    for name in modules:
        assert not any(other != name and other.startswith(name + ".") for other in modules)
        assert order.width[name] > 0
    if order.width["transformer.h.1.attn"]:
        assert "transformer.h.1.attn" in modules
    else:
        assert {"transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"} <= set(modules)


def test_a_model_the_probe_cannot_run_gets_no_prefixes_and_right_results(monkeypatch):
    model = fresh("gpt2")
    # The probe forward fails (input_ids given twice); a sweep must not.
    monkeypatch.setattr(block_prefix, "last_logits_kwargs", lambda model: {"input_ids": None})
    assert block_prefix.prefix_modules(model, "z", 1, 1) == ()
    clean, corrupt = random_prompt_pairs(0, LENGTH, DIFFERENT)
    kwargs = dict(role="z", over=("layer", "head"), metric=METRIC)
    reused = al.patch(model, clean, corrupt, **kwargs)
    full = al.patch(model, clean, corrupt, reuse=False, **kwargs)
    assert (metrics_of(reused) - metrics_of(full)).abs().max() <= TOL


def _wrong_joins(monkeypatch):  # rows joining a growing forward enter with wrong values
    original = shortcut._present_rows
    monkeypatch.setattr(
        shortcut,
        "_present_rows",
        lambda inputs, n, total, joining: original(inputs, n, total, None if joining is None else joining * 2),
    )


def _refused_growth(monkeypatch):  # a block that cannot take a growing batch
    def refuse(*args):
        raise RuntimeError("this block takes its whole batch")

    monkeypatch.setattr(shortcut, "_present_rows", refuse)


def _wrong_prefix(monkeypatch):  # block-prefix outputs handed back wrong
    original = recording._kept_prefixes

    def doubled(*args):
        return {b: {path: out * 2 for path, out in outputs.items()} for b, outputs in original(*args).items()}

    monkeypatch.setattr(recording, "_kept_prefixes", doubled)


BREAKAGES = {
    # (family, role, over, breakage, warning, the engine state's reason the shortcut is off)
    "wrong-joins": ("llama", "z", ("layer", "head"), _wrong_joins, "growing forwards are off", "growing_off_reason"),
    "refused-growth": (
        "gpt2",
        "resid_pre",
        ("layer", "pos"),
        _refused_growth,
        "this block takes its whole batch",
        "growing_off_reason",
    ),
    "wrong-prefix": (
        "gpt2",
        "z",
        ("layer", "head"),
        _wrong_prefix,
        "before 'z' in a batch's first block is off",
        "prefix_off_reason",
    ),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_a_shortcut_that_fails_is_taken_back_and_results_stay_right(case, monkeypatch):
    family, role, over, breakage, warning, turned_off = BREAKAGES[case]
    model = fresh(family)
    clean, corrupt = random_prompt_pairs(0, LENGTH, DIFFERENT)
    kwargs = dict(role=role, over=over, metric=METRIC)
    full = al.patch(model, clean, corrupt, reuse=False, **kwargs)
    breakage(monkeypatch)
    with pytest.warns(UserWarning, match=warning):
        broken = al.patch(model, clean, corrupt, **kwargs)
    assert getattr(engine_state(model), turned_off) is not None
    assert (metrics_of(broken) - metrics_of(full)).abs().max() <= TOL
    assert engine_state(model).reuse_off_reason is None  # the rest of reuse stays on


def test_a_growing_batch_of_a_role_outside_the_blocks_is_refused_not_dropped():
    """Writes of a growing forward are made block by block; one outside every block would never
    be made, and the unpatched guard forward could not tell. It must raise instead."""
    model = fresh("gpt2")
    clean, corrupt = random_prompt_pairs(0, LENGTH, DIFFERENT)
    sources, _ = record(model, "embed", clean, [None])
    baseline = recording.record_baseline(model, "resid_pre", corrupt, model.layers(), n_blocks=1)
    plan = PatchPlan("embed", corrupt, [Component(None), Component(None)], [0, 0], [0, 0], sources, [0], [0])
    batch = RowBatch(torch.tensor([0, 1]), 0, 0, torch.tensor([0, 1]))
    with pytest.raises(AssertionError, match="written outside the blocks"):
        shortcut.shortcut_forward(model, plan, batch.rows, batch, baseline, None, 0)
