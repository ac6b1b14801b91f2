"""Edge attribution (EAP, EAP-IG) against plain torch hooks and autograd, on every family."""

from __future__ import annotations

import families
import pytest
import torch
from edge_reference import receiver_gradients, sender_outputs
from hook_reference import logit_diff

import anylens as al
from anylens.circuits import component_graph
from anylens.testing import tiny

ANSWER, DISTRACTOR = 10, 11
#: float32; scores are sums of a few thousand products of order 1e-2.
ATOL = 1e-5


def _graph_families() -> list[str]:
    return [f for f in families.selected if f in families.families_with("mixer_in") and f != "mamba_ssm"]


def _level(family: str) -> str:
    return "head" if families.has_head_decomposition(families.spec_of(family)) else "layer"


@pytest.fixture(scope="module")
def pairs():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(20, 300, (3, 7), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(20, 300, (3,), generator=gen)
    corrupt[:, 4] = torch.randint(20, 300, (3,), generator=gen)
    return clean, corrupt


def _metric():
    return al.metrics.logit_diff(ANSWER, DISTRACTOR)


@pytest.mark.parametrize("family", _graph_families())
def test_eap_score_is_sender_delta_times_branch_gradient(family, pairs):
    """score(u -> v) = mean over pairs of sum over (pos, d) of (a_u^corrupt - a_u^clean) * d metric / d input(v),
    with deltas from plain hooks and gradients from plain autograd at each branch's norm input."""
    clean, corrupt = pairs
    model = tiny(family)
    level = _level(family)
    result = al.circuit(model, clean, corrupt, metric=_metric(), method="eap", level=level)
    graph = component_graph(model, level)
    senders = [(n.name, n.kind, n.layer, n.head) for n in graph.senders]
    receivers = [(n.name, n.kind, n.layer) for n in graph.receivers]
    hf = model.hf
    clean_out, corrupt_out = sender_outputs(hf, clean, senders), sender_outputs(hf, corrupt, senders)
    grads = receiver_gradients(hf, clean, receivers, lambda logits: logit_diff(logits, ANSWER, DISTRACTOR))
    expected = torch.tensor(
        [
            ((corrupt_out[e.sender.name] - clean_out[e.sender.name]) * grads[e.receiver.name]).sum((1, 2)).mean().item()
            for e in graph.edges
        ]
    )
    got = torch.tensor(result.to_frame()["score"].to_numpy(), dtype=torch.float32)
    assert result.meta["forwards"] == 2 and result.meta["backwards"] == 1
    assert expected.abs().max() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mamba"])
def test_eap_ig_one_step_is_eap_and_many_steps_complete_the_embedding(family, pairs):
    """EAP-IG's rule is a right Riemann sum ending at the clean run, so steps=1 is EAP; summed over
    the edges out of the embedding, EAP-IG is integrated gradients along the embedding's line, so
    it tends to metric(corrupt) - metric(clean) as steps grow (error shrinking like 1/steps)."""
    clean, corrupt = pairs
    model = tiny(family)
    eap = al.circuit(model, clean, corrupt, metric=_metric(), method="eap").to_frame()
    one = al.circuit(model, clean, corrupt, metric=_metric(), method="eap-ig", steps=1).to_frame()
    torch.testing.assert_close(torch.tensor(one["score"].to_numpy()), torch.tensor(eap["score"].to_numpy()))
    errors = []
    for steps in (16, 128):
        result = al.circuit(model, clean, corrupt, metric=_metric(), method="eap-ig", steps=steps)
        frame = result.to_frame()
        total = frame.loc[frame.sender == "embed", "score"].sum()
        assert result.meta["forwards"] == 1 + steps and result.meta["backwards"] == steps
        errors.append(abs(total - (result.corrupt_metric - result.clean_metric)))
    gap = abs(result.corrupt_metric - result.clean_metric)
    assert gap > 1e-3
    assert errors[1] < 0.1 * gap
    assert errors[1] < errors[0] * (16 / 128) * 1.5  # eight times the steps, about an eighth of the error


def test_batches_give_the_scores_of_one_batch(pairs):
    clean, corrupt = pairs
    model = tiny("llama")
    whole = al.circuit(model, clean, corrupt, metric=_metric(), method="eap-ig", steps=2).to_frame()
    split = al.circuit(model, clean, corrupt, metric=_metric(), method="eap-ig", steps=2, batch_size=2).to_frame()
    torch.testing.assert_close(torch.tensor(split["score"].to_numpy()), torch.tensor(whole["score"].to_numpy()))
