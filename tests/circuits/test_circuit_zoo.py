"""Edge attribution on the zoo models, against exact single-edge patching with plain hooks.

IOI pairs from one template (every pair has the same positions); the metric is the logit
difference between the indirect object and the subject. Each edge's exact effect is the clean run
with that edge alone corrupted (tests/edge_reference.py), one forward per edge.
"""

from __future__ import annotations

import pytest
import torch
from edge_reference import edge_effects

import anylens as al
from anylens.circuits import component_graph
from anylens.circuits.edges import edge_patch_scores
from anylens.demo import demo_ioi_pairs
from anylens.experiments.prompts import paired

pytestmark = pytest.mark.slow

ZOO_MODELS = ["gpt2", "llama", "mistral", "mamba"]


def _ioi(model):
    pairs = demo_ioi_pairs(model.tokenizer)
    clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
    answers = torch.tensor([model.token_id(p.answer) for p in pairs])
    distractors = torch.tensor([model.token_id(p.distractor) for p in pairs])

    def plain_metric(logits):
        last = logits[:, -1].float()
        return last.gather(1, answers[:, None])[:, 0] - last.gather(1, distractors[:, None])[:, 0]

    metric = al.metrics.logit_diff([p.answer for p in pairs], [p.distractor for p in pairs])
    return clean, corrupt, metric, plain_metric


def _exact(model, clean, corrupt, plain_metric):
    graph = component_graph(model, "head")
    clean_ids, corrupt_ids = paired(model, clean, corrupt)
    edges = [
        (
            (e.sender.name, e.sender.kind, e.sender.layer, e.sender.head),
            (e.receiver.name, e.receiver.kind, e.receiver.layer),
        )
        for e in graph.edges
    ]
    effects, _ = edge_effects(model.hf, clean_ids, corrupt_ids, edges, plain_metric)
    return effects


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_eap_ig_edge_scores_correlate_with_exact_edge_patching(zoo, name):
    model = zoo(name)
    clean, corrupt, metric, plain_metric = _ioi(model)
    exact = _exact(model, clean, corrupt, plain_metric)
    result = al.circuit(model, clean, corrupt, metric=metric, method="eap-ig", steps=5)
    scores = torch.tensor(result.to_frame()["score"].to_numpy(), dtype=torch.float32)
    r = torch.corrcoef(torch.stack([scores, exact]))[0, 1].item()
    print(f"zoo:{name}: {len(scores)} edges, Pearson r(EAP-IG steps=5, exact edge patching) = {r:.3f}")
    assert r >= 0.8
    # edge_patch_scores, batched through anylens, is the same exact quantity as the plain loop.
    clean_ids, corrupt_ids = paired(model, clean, corrupt)
    batched = edge_patch_scores(model, clean_ids, corrupt_ids, result.graph, metric=metric)
    torch.testing.assert_close(batched, exact, atol=2e-3, rtol=1e-3)
    # The two agree on which edge matters most, and on its sign.
    top = int(scores.abs().argmax())
    assert top in exact.abs().topk(2).indices.tolist()
    assert torch.sign(scores[top]) == torch.sign(exact[top])


def test_gpt2_ioi_circuit_is_faithful_with_a_tenth_of_the_edges_and_names_the_previous_token_head(zoo):
    """zoo:gpt2's model card: previous-token head 0.2 (measured here again with al.head_scores)."""
    from anylens.zoo import mechanisms

    model = zoo("gpt2")
    clean, corrupt, metric, _ = _ioi(model)
    result = al.circuit(model, clean, corrupt, metric=metric, method="eap-ig", steps=5)
    tenth = len(result.frame) // 10
    curve = result.faithfulness(ks=[tenth], ablation="corrupt")
    print(f"zoo:gpt2 IOI: top {tenth} of {len(result.frame)} edges keep {curve.normalized[0]:.3f} (normalized)")
    assert curve.k[0] / len(result.frame) <= 0.1
    assert curve.normalized[0] >= 0.8
    previous = mechanisms.head_mechanisms(model)["previous_token"]
    head = f"a{previous['layer']}.h{previous['head']}"
    assert head in set(result.top(tenth).sender)
