"""The zoo's mechanisms, found with anylens's own experiments on the shipped weights.

Each claim is one a researcher would check by hand: an induction head reading from the token after
the earlier occurrence, built on a previous-token head in an earlier layer; the answer appearing in
the logit lens only in the last layers; the subject's residual carrying the fact in the early and
middle layers; attribution patching ranking heads as exact patching does. The measurements are
those the model cards report (``anylens.zoo.mechanisms``); the experiments behind them are checked
against independent computations in their own tests.
"""

from __future__ import annotations

import pytest
import torch

import anylens as al
from anylens.demo import demo_ioi_pairs
from anylens.zoo import mechanisms

ZOO_MODELS = ["gpt2", "llama", "mistral", "mamba"]
ATTENTION_MODELS = ["gpt2", "llama", "mistral"]


@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_induction_head_builds_on_an_earlier_previous_token_head(zoo, name):
    # Both scores on fresh repeated sequences of the induction task's made-up words.
    heads = mechanisms.head_mechanisms(zoo(name))
    induction, previous = heads["induction"], heads["previous_token"]
    print(f"{name}: top induction head {induction}; top previous-token head before it {previous}")
    assert induction["layer"] >= 1
    assert induction["score"] >= 0.4  # uniform attention would score about 0.05
    assert previous is not None and previous["score"] >= 0.3  # uniform attention would score about 0.12


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_logit_lens_answer_rises_through_the_later_layers(zoo, name):
    model = zoo(name)
    probs = torch.tensor(mechanisms.logit_lens_rise(model))  # [layer]: the answer's mean probability
    print(f"{name}: answer probability by layer {[round(p, 3) for p in probs.tolist()]}")
    assert probs[-1] >= 0.5 and probs[-1] - probs[0] >= 0.3  # there at the end, much more than at the start
    later = probs[model.n_layers // 2 :]
    assert (later[1:] > later[:-1]).all()  # and rising through the later half


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_subject_residual_patching_flips_the_answer_early(zoo, name):
    patching = mechanisms.subject_patching(zoo(name))
    assert patching["corrupt_metric"] < 0 < patching["clean_metric"]  # the runs disagree before patching
    flipped = patching["flipped_by_layer"]
    print(f"{name}: clean answer wins after patching the subject at layers 0..: {[round(f, 2) for f in flipped]}")
    assert flipped[0] >= 0.9  # early on, the subject position alone carries the fact
    assert all(a >= b for a, b in zip(flipped, flipped[1:]))  # later, less of it is left there


@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_attribution_ranks_heads_as_exact_patching_does(zoo, name):
    model = zoo(name)
    pairs = demo_ioi_pairs(model.tokenizer)
    clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
    metric = al.metrics.logit_diff([p.answer for p in pairs], [p.distractor for p in pairs])
    estimated = al.attribute(model, clean, corrupt, role="z", metric=metric).to_frame()
    exact = al.patch(model, clean, corrupt, role="z", over=("layer", "head"), metric=metric).to_frame()
    merged = estimated.merge(exact, on=["layer", "head"], suffixes=("_attr", "_patch"))
    pair = torch.tensor(merged[["metric_attr", "metric_patch"]].to_numpy().T)
    r = torch.corrcoef(pair)[0, 1].item()
    print(f"{name}: Pearson r(attribution, exact patching) over {len(merged)} heads = {r:.3f}")
    assert r >= 0.8
