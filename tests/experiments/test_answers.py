"""Multi-token answers, scored by teacher forcing, against plain Hugging Face forwards.

A hand computation runs the prompt with the answer's tokens appended (all but the last), takes
log_softmax at the positions that predict each answer token and sums them; a patched row is
hooked in with plain torch hooks (tests/hook_reference.py). float32, tolerance TOL.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from families import ANY_FAMILY
from hook_reference import capture, gradients, replace, run
from tiny_models import model_cache
from tiny_models import random_prompt_pairs as prompt_pairs

import anylens as al

TOL = 1e-4
PARIS, ROME = 300, 301  # " Paris", " Rome" in the tiny tokenizer: " Paris Rome" is these two tokens
TWO = " Paris Rome"

model_of = model_cache()


def answer_sum(logits: torch.Tensor, prompt_len: int, answer: list[int]) -> torch.Tensor:
    """Per row, sum_j log p(answer[j]) read at position prompt_len - 1 + j."""
    logp = logits.float().log_softmax(-1)
    return sum(logp[:, prompt_len - 1 + j, token] for j, token in enumerate(answer))


def forced(ids: torch.Tensor, answer: list[int]) -> torch.Tensor:
    """``ids`` with the answer's tokens but the last appended to every row."""
    return torch.cat([ids, torch.tensor(answer[:-1], dtype=ids.dtype).expand(ids.shape[0], -1)], 1)


def hand_patch(hf, clean, corrupt, answer, layer, pos):
    """The corrupt run with clean resid_pre[layer] at pos, scored by teacher forcing on ``answer``."""
    with torch.no_grad():
        source, clean_logits = capture(hf, "resid_pre", forced(clean, answer))
        corrupt_logits = run(hf, forced(corrupt, answer))
        edit = {("resid_pre", layer): lambda v: replace(v, source[layer], "resid_pre", hf, pos, None)}
        patched = run(hf, forced(corrupt, answer), edit)
    t = clean.shape[1]
    return answer_sum(clean_logits, t, answer), answer_sum(corrupt_logits, t, answer), answer_sum(patched, t, answer)


def rows(result, layer, pos):
    frame = result.frame
    return torch.tensor(frame[(frame.layer == layer) & (frame.pos == pos)]["metric"].to_numpy(), dtype=torch.float32)


@pytest.mark.needs_roles("resid_pre")
def test_log_prob_of_a_multi_token_answer_is_the_teacher_forced_sum(family):
    model = model_of(family)
    clean, corrupt = prompt_pairs()
    metric = al.metrics.log_prob(TWO)
    result = al.patch(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=metric, per_prompt=True)
    layer, pos = model.n_layers - 1, 2  # the position the corrupt prompt differs at
    clean_sum, corrupt_sum, patched_sum = hand_patch(model.hf, clean, corrupt, [PARIS, ROME], layer, pos)
    torch.testing.assert_close(torch.tensor(result.meta["clean_metric_per_prompt"]), clean_sum, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.tensor(result.meta["corrupt_metric_per_prompt"]), corrupt_sum, atol=TOL, rtol=0)
    torch.testing.assert_close(rows(result, layer, pos), patched_sum, atol=TOL, rtol=0)
    assert (patched_sum - corrupt_sum).abs().max() > 1e-4  # the patch did something
    assert result.meta["teacher_forced_runs"] == 2
    # Positions are those of the prompt: the appended token is never patched.
    assert sorted(result.frame.pos.unique()) == list(range(clean.shape[1]))


def test_logit_diff_between_multi_token_answers_is_the_difference_of_sums():
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    answer, distractor = [PARIS, ROME], [ROME, PARIS]
    metric = al.metrics.logit_diff(TWO, " Rome Paris")
    result = al.patch(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=metric, per_prompt=True)
    a = hand_patch(model.hf, clean, corrupt, answer, 0, 2)
    d = hand_patch(model.hf, clean, corrupt, distractor, 0, 2)
    torch.testing.assert_close(torch.tensor(result.meta["clean_metric_per_prompt"]), a[0] - d[0], atol=TOL, rtol=0)
    torch.testing.assert_close(rows(result, 0, 2), a[2] - d[2], atol=TOL, rtol=0)
    # First tokens on the bare prompt, then one run per further token of either answer.
    assert result.meta["teacher_forced_runs"] == 3


def test_negative_positions_count_from_the_end_of_the_prompt():
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    metric = al.metrics.log_prob(TWO)
    every = al.patch(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=metric)
    last = al.patch(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=metric, positions=[-1])
    prompt_last = clean.shape[1] - 1
    assert set(last.frame.pos) == {prompt_last}
    expected = every.frame[every.frame.pos == prompt_last]["metric"].to_numpy()
    torch.testing.assert_close(torch.tensor(last.frame["metric"].to_numpy()), torch.tensor(expected), atol=TOL, rtol=0)


def test_answers_of_different_lengths_per_prompt():
    """A one-token answer scores exactly its one-token metric; a two-token one its hand sum."""
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    patch = functools.partial(al.patch, model, clean, corrupt, role="resid_pre", over=("layer", "pos"), per_prompt=True)
    mixed = patch(metric=al.metrics.log_prob([" Paris", TWO])).frame
    single = patch(metric=al.metrics.log_prob(PARIS)).frame
    two = patch(metric=al.metrics.log_prob(TWO)).frame
    assert (mixed[mixed.prompt == 0]["metric"].to_numpy() == single[single.prompt == 0]["metric"].to_numpy()).all()
    torch.testing.assert_close(
        torch.tensor(mixed[mixed.prompt == 1]["metric"].to_numpy()),
        torch.tensor(two[two.prompt == 1]["metric"].to_numpy()),
        atol=TOL,
        rtol=0,
    )


def test_prob_of_a_multi_token_answer_is_the_exponential_of_its_log_prob():
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    patch = functools.partial(al.patch, model, clean, corrupt, role="resid_pre", over=("layer",), normalize=False)
    prob = torch.tensor(patch(metric=al.metrics.prob(TWO)).frame["metric"].to_numpy())
    per_prompt = patch(metric=al.metrics.log_prob(TWO), per_prompt=True).frame
    exponentials = per_prompt.assign(p=per_prompt["metric"].map(math.exp))
    expected = torch.tensor(exponentials.groupby("layer")["p"].mean().to_numpy())
    torch.testing.assert_close(prob, expected, atol=1e-7, rtol=1e-4)


def test_attribution_of_a_multi_token_answer_matches_the_hand_gradient():
    """grad · (clean - corrupt) of the teacher-forced sum, from torch.autograd on plain hooks."""
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    answer = [PARIS, ROME]
    result = al.attribute(
        model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=al.metrics.log_prob(TWO), per_prompt=True
    )
    t = clean.shape[1]
    with torch.no_grad():
        source, _ = capture(model.hf, "resid_pre", forced(clean, answer))
    acts, grads, _ = gradients(model.hf, "resid_pre", forced(corrupt, answer), lambda out: answer_sum(out, t, answer))
    frame = result.frame
    for layer in range(model.n_layers):
        expected = ((source[layer] - acts[layer]) * grads[layer]).float().sum(-1)[:, :t]  # [pairs, pos]
        got = frame[frame.layer == layer].sort_values(["pos", "prompt"])["estimate"].to_numpy()
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), expected.T.reshape(-1), atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("build", [al.metrics.rank, al.metrics.top1])
def test_rank_and_top1_refuse_a_multi_token_answer(build):
    model = model_of(ANY_FAMILY)
    clean, corrupt = prompt_pairs()
    with pytest.raises(al.MetricError, match=r"' Paris Rome' is 2 tokens.*log_prob"):
        al.patch(model, clean, corrupt, role="resid_pre", over=("layer",), metric=build(TWO))


def test_on_the_zoo_a_two_word_answer_is_the_hand_sum():
    """zoo:gpt2's vocabulary is whole words: ' Mary John' is two tokens."""
    model = al.load("zoo:gpt2")
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    result = al.patch(
        model, clean, corrupt, role="resid_pre", over=("layer",), metric=al.metrics.log_prob(" Mary John")
    )
    answer = model.tokenizer(" Mary John", add_special_tokens=False)["input_ids"]
    assert len(answer) == 2
    ids = model.tokenizer([clean, corrupt], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model.hf(input_ids=forced(ids, answer)).logits
    clean_sum, corrupt_sum = answer_sum(logits, ids.shape[1], answer).tolist()
    assert result.clean_metric == pytest.approx(clean_sum, abs=TOL)
    assert result.corrupt_metric == pytest.approx(corrupt_sum, abs=TOL)


@pytest.mark.parametrize("mean_over", ["batch", "positions"])
def test_mean_ablation_of_a_multi_token_answer_takes_means_over_the_prompts_alone(mean_over):
    """The mean written in is over the prompts' own positions; the appended answer token enters no mean."""
    model = model_of(ANY_FAMILY)
    prompts, _ = prompt_pairs()
    answer, layer, pos = [PARIS, ROME], 1, 3
    result = al.ablate(
        model,
        prompts,
        role="resid_pre",
        over=("layer", "pos"),
        method="mean",
        mean_over=mean_over,
        metric=al.metrics.log_prob(TWO),
        per_prompt=True,
    )
    with torch.no_grad():
        acts, _ = capture(model.hf, "resid_pre", prompts)
        mean = acts[layer].mean(0 if mean_over == "batch" else (0, 1), keepdim=True).expand_as(acts[layer])
        t = prompts.shape[1]
        baseline = answer_sum(run(model.hf, forced(prompts, answer)), t, answer)

        def edit(value):
            new = value.clone()
            new[:, pos] = mean[:, pos]
            return new

        ablated = answer_sum(run(model.hf, forced(prompts, answer), {("resid_pre", layer): edit}), t, answer)
    torch.testing.assert_close(torch.tensor(result.meta["baseline_per_prompt"]), baseline, atol=TOL, rtol=0)
    torch.testing.assert_close(rows(result, layer, pos), ablated, atol=TOL, rtol=0)
    assert (ablated - baseline).abs().max() > 1e-4


def test_a_sweep_scores_multi_token_answers_as_patch_does(tmp_path):
    model = model_of("llama")
    clean, corrupt = ["The cat sat on", "A dog ran to"], ["The dog sat on", "A cat ran to"]
    items = [(c, k, TWO, " Rome") for c, k in zip(clean, corrupt)]
    options = {"role": "resid_pre", "over": ("layer",), "metric": "logit_diff", "quiet": True}
    sweep = al.run("patch", models=["tiny:llama"], prompts=items, out=tmp_path, **options)
    for index, (c, k) in enumerate(zip(clean, corrupt)):
        alone = al.patch(model, c, k, role="resid_pre", over=("layer",), metric=al.metrics.logit_diff(TWO, " Rome"))
        swept = sweep.frame[sweep.frame["prompt"] == index].sort_values("layer")
        assert swept["metric"].to_numpy().tolist() == pytest.approx(alone.frame["metric"].to_numpy().tolist(), abs=TOL)
