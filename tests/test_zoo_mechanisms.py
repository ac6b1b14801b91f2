"""The zoo's mechanisms, found with anylens's own experiments on the shipped weights.

Each claim is one a researcher would check by hand: an induction head reading from the token after
the earlier occurrence, built on a previous-token head in an earlier layer; the answer appearing in
the logit lens only in the last layers; the subject's residual carrying the fact in the early and
middle layers; attribution patching ranking heads as exact patching does. The scores themselves
are checked against independent computations in the experiments' own tests.
"""

from __future__ import annotations

import pytest
import torch

import anylens as al
from anylens.demo import demo_ioi_pairs
from anylens.zoo import corpus
from anylens.zoo.mechanisms import induction_sequences

ZOO_MODELS = ["gpt2", "llama", "mistral", "mamba"]
ATTENTION_MODELS = ["gpt2", "llama", "mistral"]


@pytest.fixture(scope="module")
def zoo():
    loaded: dict[str, al.AnyModel] = {}

    def get(name: str) -> al.AnyModel:
        if name not in loaded:
            loaded[name] = al.load(f"zoo:{name}")
        return loaded[name]

    return get


@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_induction_head_builds_on_an_earlier_previous_token_head(zoo, name):
    model = zoo(name)
    # Both scores on fresh repeated sequences of the induction task's made-up words.
    scores = al.head_scores(model, sequences=induction_sequences()).to_frame()

    induction = scores[scores.kind == "induction"].sort_values("score").iloc[-1]
    layer = int(induction["layer"])
    print(f"{name}: top induction head {layer}.{int(induction['head'])} ({induction['score']:.2f})")
    assert layer >= 1
    assert induction["score"] >= 0.4  # uniform attention would score about 0.05
    previous = scores[(scores.kind == "previous_token") & (scores.layer < layer)].sort_values("score").iloc[-1]
    print(f"{name}: top previous-token head before it {int(previous['layer'])}.{int(previous['head'])} ({previous['score']:.2f})")
    assert previous["score"] >= 0.3  # uniform attention would score about 0.12


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_logit_lens_answer_rises_through_the_later_layers(zoo, name):
    model = zoo(name)
    facts = corpus.factual_eval_set()[::4]
    per_layer = []
    for fact in facts:
        frame = al.logit_lens(model, fact.prompt, targets=fact.answer, positions=-1).to_frame()
        per_layer.append(torch.tensor(frame.sort_values("layer")["prob"].to_numpy()))
    probs = torch.stack(per_layer).mean(0)  # [layer]: the answer's mean probability
    print(f"{name}: answer probability by layer {[round(p, 3) for p in probs.tolist()]}")
    assert probs[-1] >= 0.5 and probs[-1] - probs[0] >= 0.3  # there at the end, much more than at the start
    later = probs[model.n_layers // 2 :]
    assert (later[1:] > later[:-1]).all()  # and rising through the later half


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_subject_residual_patching_flips_the_answer_early(zoo, name):
    model = zoo(name)
    pairs = corpus.factual_patching_pairs("capital")
    clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
    metric = al.metrics.logit_diff([p.clean_answer for p in pairs], [p.corrupt_answer for p in pairs])
    clean_ids, corrupt_ids = (model.to_tokens(prompts)["input_ids"] for prompts in (clean, corrupt))
    (subject,) = (clean_ids != corrupt_ids).any(0).nonzero()[:, 0].tolist()  # the country's position
    result = al.patch(model, clean, corrupt, role="resid_pre", metric=metric, positions=[subject], per_prompt=True)
    frame = result.to_frame()

    assert (result.corrupt_metric < 0) and (result.clean_metric > 0)  # the runs disagree before patching
    flipped = frame.assign(flipped=frame["metric"] > 0).groupby("layer")["flipped"].mean()
    print(f"{name}: clean answer wins after patching the subject at layers 0..: {flipped.round(2).tolist()}")
    assert flipped[0] >= 0.9  # early on, the subject position alone carries the fact
    assert flipped.is_monotonic_decreasing  # later, less of it is left there


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
