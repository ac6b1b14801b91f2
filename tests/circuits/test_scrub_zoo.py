"""Scrubbing the zoo's IOI and induction mechanisms on zoo:gpt2 (the numbers of docs/circuits.md).

A hypothesis made of the edges with the largest exact single-edge effect keeps most of the
behaviour, as many random edges keep none of it; and what the logits read directly needs the IO
name, not the order of the names.
"""

from __future__ import annotations

import random
from functools import cache

import pytest

import anylens as al
from anylens.circuits.edges import edge_patch_scores
from anylens.zoo import corpus

pytestmark = pytest.mark.slow


@cache
def zoo_gpt2() -> al.AnyModel:
    return al.load("zoo:gpt2")


@cache
def ioi() -> list:
    """The largest group of held-out IOI prompts that share one token length."""
    model = zoo_gpt2()
    groups: dict[int, list] = {}
    for prompt in corpus.ioi_eval_set(n=80, seed=1):
        groups.setdefault(model.to_tokens(prompt.prompt)["input_ids"].shape[1], []).append(prompt)
    return max(groups.values(), key=len)


@cache
def induction(k: int = 6) -> list[dict]:
    """Fresh made-up words and their first ``k`` repeated: the next word is predictable by copying."""
    return [
        {"prompt": " ".join(w + w[:k]), "next": w[k], "after": w[k + 1]} for w in corpus.induction_eval_set(24, seed=3)
    ]


def top_edges(graph, clean, corrupt, metric, k):
    scores = edge_patch_scores(zoo_gpt2(), clean, corrupt, graph, metric=metric)
    return [graph.edges[i] for i in scores.abs().argsort(descending=True)[:k]]


def test_ioi_hypotheses():
    model, prompts = zoo_gpt2(), ioi()
    graph = al.component_graph(model, "head")
    metric = al.metrics.logit_diff([p.io for p in prompts], [p.s for p in prompts])
    # Rank edges on eight pairs: each prompt against the next one of the group (other names).
    eight = prompts[:8]
    clean, corrupt = [p.prompt for p in eight], [eight[(i + 1) % 8].prompt for i in range(8)]
    ranking_metric = al.metrics.logit_diff([p.io for p in eight], [p.s for p in eight])
    top = top_edges(graph, clean, corrupt, ranking_metric, 20)

    def fraction(hypothesis):
        result = al.scrub(model, hypothesis, prompts, metric=metric, samples=2, n_bootstrap=500)
        print(f"{hypothesis.features or ''} {len(hypothesis.edges)} edges: {result.fraction:.2f} {result.interval}")
        return result

    kept = fraction(al.Hypothesis(edges=top))
    assert kept.fraction > 0.6 and kept.interval[0] > 0.4
    chance = fraction(al.Hypothesis(edges=random.Random(0).sample(list(graph.edges), 20)))
    assert abs(chance.fraction) < 0.2
    by_io = fraction(al.Hypothesis(edges=graph.edges, features={"logits": "io"}))
    by_order = fraction(al.Hypothesis(edges=graph.edges, features={"logits": "order"}))
    assert by_io.fraction > 0.9 and by_order.fraction < 0.5 and by_order.interval[1] < by_io.interval[0]


def test_induction_hypotheses():
    model, items = zoo_gpt2(), induction()
    graph = al.component_graph(model, "head")
    metric = al.metrics.logit_diff([it["next"] for it in items], [it["after"] for it in items])
    twelve = items[:12]
    clean, corrupt = [it["prompt"] for it in twelve], [twelve[(i + 1) % 12]["prompt"] for i in range(12)]
    ranking_metric = al.metrics.logit_diff([it["next"] for it in twelve], [it["after"] for it in twelve])
    top = top_edges(graph, clean, corrupt, ranking_metric, 20)
    kept = al.scrub(model, al.Hypothesis(edges=top), items, metric=metric, samples=2, n_bootstrap=500)
    chance = al.scrub(
        model,
        al.Hypothesis(edges=random.Random(0).sample(list(graph.edges), 20)),
        items,
        metric=metric,
        samples=2,
        n_bootstrap=500,
    )
    print(f"induction: top 20 edges {kept.fraction:.2f} {kept.interval}, random 20 {chance.fraction:.2f}")
    # The top edges run through the zoo card's induction head (layer 2, head 1).
    assert any(edge.sender.name == "a2.h1" for edge in top)
    assert kept.fraction > 0.8 and kept.interval[0] > 0.6
    assert abs(chance.fraction) < 0.2
