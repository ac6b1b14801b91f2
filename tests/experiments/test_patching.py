"""Activation patching against a one-patch-per-forward reference built from plain torch hooks."""

from __future__ import annotations

import pytest
import torch
from families import ANY_FAMILY, family_cases
from hook_reference import reference_patch
from tiny_models import model_cache
from tiny_models import random_prompt_pairs as prompt_pairs

import anylens as al
from anylens.engine import OverError

TOL = 1e-5
ANSWER, DISTRACTOR = 300, 301  # " Paris", " Rome" in the tiny tokenizer
METRIC = al.metrics.logit_diff(ANSWER, DISTRACTOR)


model_of = model_cache()


def keyed(frame, over):
    columns = [d for d in ("layer", "head", "pos") if d in over]
    return {tuple(int(v) for v in row[columns]): row for _, row in frame.iterrows()}


CASES = [("resid_pre", ("layer", "pos")), ("z", ("layer", "head")), ("mlp_out", ("layer",))]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("family,role,over", family_cases(CASES))
def test_patch_matches_hook_reference(family, role, over, direction):
    model = model_of(family)
    clean, corrupt = prompt_pairs()
    result = al.patch(model, clean, corrupt, role=role, over=over, metric=METRIC, direction=direction)
    expected, clean_metric, corrupt_metric = reference_patch(model.hf, role, over, clean, corrupt, direction)

    got = keyed(result.to_frame(), over)
    assert set(got) == set(expected)
    errors = [abs(got[key]["metric"] - value) for key, value in expected.items()]
    assert max(errors) <= TOL, f"max abs error {max(errors):.2e}"
    assert abs(result.clean_metric - clean_metric) <= TOL
    assert abs(result.corrupt_metric - corrupt_metric) <= TOL
    gap = clean_metric - corrupt_metric
    for key, value in expected.items():
        assert got[key]["normalized"] == pytest.approx((value - corrupt_metric) / gap, abs=1e-3)
    # The patches did something: some component moves the metric off the unpatched run.
    unpatched = corrupt_metric if direction == "denoise" else clean_metric
    assert max(abs(v - unpatched) for v in expected.values()) > 1e-4
    if role == "resid_pre":
        # The prompts differ only at position 2: patching layer 0's input there swaps the whole run.
        assert got[(0, 2)]["normalized"] == pytest.approx(1.0 if direction == "denoise" else 0.0, abs=1e-4)


def test_patches_are_batched_into_few_forwards():
    family = ANY_FAMILY
    model = model_of(family)
    clean, corrupt = prompt_pairs()
    forwards = []
    handle = model.hf.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(1), with_kwargs=True)
    try:
        batched = al.patch(model, clean, corrupt, metric=METRIC, reuse=False)
        n_batched = len(forwards)
        forwards.clear()
        chunked = al.patch(model, clean, corrupt, metric=METRIC, batch_size=5, reuse=False)
        n_chunked = len(forwards)
        forwards.clear()
        reused = al.patch(model, clean, corrupt, metric=METRIC)
        n_reused = len(forwards)
    finally:
        handle.remove()
    patched_runs = model.n_layers * clean.shape[1] * clean.shape[0]  # components x prompt pairs
    assert batched.meta["patches"] == patched_runs
    assert n_batched == 3  # clean run, corrupt run, and every patched run in one batch
    assert batched.meta["patches_per_forward"] == patched_runs
    assert n_chunked == 2 + -(-patched_runs // 5)
    assert torch.allclose(
        torch.tensor(batched.to_frame()["metric"].to_numpy()),
        torch.tensor(chunked.to_frame()["metric"].to_numpy()),
        atol=TOL,
    )
    # With reuse the patched rows of a tiny model still share one forward, beside the clean and
    # corrupt runs, the probe of its cache and one run of the positions before the first patch.
    assert reused.meta["forwards"] == 1 and n_reused <= 5
    assert reused.meta["patches"] == patched_runs
    tiny_budget = al.patch(
        model,
        clean,
        corrupt,
        role="mlp_out" if "mlp_out" in model.roles else "resid_post",
        over=("layer",),
        metric=METRIC,
        memory_budget=1,
        reuse=False,
    )
    assert tiny_budget.meta["forwards"] == tiny_budget.meta["patches"]  # a budget below one row: one row per forward
    tiny_budget = al.patch(
        model,
        clean,
        corrupt,
        role="mlp_out" if "mlp_out" in model.roles else "resid_post",
        over=("layer",),
        metric=METRIC,
        memory_budget=1,
    )
    assert tiny_budget.meta["forwards"] == tiny_budget.meta["patches"] - tiny_budget.meta["unchanged"]


def test_different_lengths_raise_prompt_error_showing_both_tokenizations():
    model = model_of(ANY_FAMILY)
    clean, corrupt = "The capital of France is", "The Colosseum is in"
    with pytest.raises(al.PromptError) as error:
        al.patch(model, clean, corrupt, metric=METRIC)
    message = str(error.value)
    assert str(model.to_str_tokens(clean)) in message
    assert str(model.to_str_tokens(corrupt)) in message
    assert "align" in message


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_align_patches_clean_position_into_corrupt_position(direction):
    model = model_of(ANY_FAMILY)
    clean, _ = prompt_pairs(seed=1)
    clean = clean[:1]
    corrupt = torch.cat([clean[:, :2], torch.tensor([[42]]), clean[:, 2:]], dim=1)  # one token inserted
    corrupt[0, 4] = 77
    align = ([0, 1, 3, 4, 5], [0, 1, 4, 5, 6])  # clean 2 and corrupt 2, 3 pair with nothing
    result = al.patch(model, clean, corrupt, metric=METRIC, align=align, direction=direction)
    expected, *_ = reference_patch(model.hf, "resid_pre", ("layer", "pos"), clean, corrupt, direction, align=align)
    got = keyed(result.to_frame(), ("layer", "pos"))
    assert set(got) == set(expected)
    assert max(abs(got[k]["metric"] - v) for k, v in expected.items()) <= TOL
    assert sorted({k[1] for k in got}) == (align[1] if direction == "denoise" else align[0])
    with pytest.raises(al.PromptError, match="not aligned"):
        al.patch(model, clean, corrupt, metric=METRIC, align=align, positions=[2])


def test_per_prompt_rows_average_to_the_summary():
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    summary = al.patch(model, clean, corrupt, role="resid_pre", over=("layer",), metric=METRIC).to_frame()
    per_prompt = al.patch(
        model, clean, corrupt, role="resid_pre", over=("layer",), metric=METRIC, per_prompt=True
    ).to_frame()
    assert sorted(per_prompt["prompt"].unique()) == [0, 1]
    averaged = per_prompt.groupby("layer")["metric"].mean()
    assert torch.allclose(torch.tensor(averaged.to_numpy()), torch.tensor(summary["metric"].to_numpy()), atol=TOL)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_tokens_and_pos_labels_are_those_of_the_patched_run(direction):
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    patched = corrupt if direction == "denoise" else clean
    result = al.patch(
        model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=METRIC, direction=direction
    )
    tokens = model.to_str_tokens(patched[0])
    assert result.meta["tokens"] == tokens
    assert result.meta["clean_tokens"] != result.meta["corrupt_tokens"]  # the prompts tell the runs apart
    frame = result.to_frame()
    assert list(frame["token"]) == [tokens[p] for p in frame["pos"]]


def test_targets_per_prompt_follow_their_rows():
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    swapped = al.metrics.logit_diff([ANSWER, DISTRACTOR], [DISTRACTOR, ANSWER])  # pair 1 asks the opposite
    both = al.patch(model, clean, corrupt, metric=swapped, per_prompt=True, batch_size=7).to_frame()
    first = al.patch(model, clean[:1], corrupt[:1], metric=METRIC).to_frame()
    second = al.patch(model, clean[1:], corrupt[1:], metric=al.metrics.logit_diff(DISTRACTOR, ANSWER)).to_frame()
    for prompt, alone in ((0, first), (1, second)):
        rows = both[both["prompt"] == prompt]
        assert torch.allclose(
            torch.tensor(rows["metric"].to_numpy()), torch.tensor(alone["metric"].to_numpy()), atol=TOL
        )


def test_invalid_sweeps_say_what_to_do():
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    with pytest.raises(OverError, match="no heads"):
        al.patch(model, clean, corrupt, role="resid_pre", over=("layer", "head"), metric=METRIC)
    with pytest.raises(OverError, match="distinct dimensions"):
        al.patch(model, clean, corrupt, role="resid_pre", over=("layer", "neuron"), metric=METRIC)
    with pytest.raises(ValueError, match="denoise"):
        al.patch(model, clean, corrupt, metric=METRIC, direction="sideways")
    with pytest.raises(al.MissingRoleError):
        al.patch(model, clean, corrupt, role="no_such_role", metric=METRIC)


@pytest.mark.parametrize("experiment", ["patch", "ablate", "attribute"])
def test_per_prompt_rows_name_their_own_prompts_token(experiment):
    """Two prompt pairs that differ at every position: each row's token is its own prompt's,
    read from the token ids (for ablate the prompts themselves, else the patched corrupt run)."""
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs(seed=3, different=(0, 1, 2, 3, 4, 5))
    if experiment == "ablate":
        result = al.ablate(model, clean, role="resid_pre", over=("layer", "pos"), metric=METRIC, per_prompt=True)
        patched = clean
    else:
        run = al.patch if experiment == "patch" else al.attribute
        result = run(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=METRIC, per_prompt=True)
        patched = corrupt
    frame = result.frame
    assert set(frame["prompt"]) == {0, 1} and (patched[0] != patched[1]).all()
    expected = [model.tokenizer.decode([int(patched[p, pos])]) for p, pos in zip(frame["prompt"], frame["pos"])]
    assert list(frame["token"]) == expected
