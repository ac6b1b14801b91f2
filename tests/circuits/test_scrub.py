"""al.scrub: identities, one scrubbed row against plain hooks, features, bootstrap interval."""

from __future__ import annotations

import pytest
import torch
from circuit_reference import record, run

import anylens as al
from anylens.circuits.graph import component_graph
from anylens.circuits.scrub import Hypothesis, scrub
from anylens.testing import tiny

TOL = 1e-5


@pytest.fixture(scope="module")
def model() -> al.AnyModel:
    return tiny("gpt2")


def _scrub(model, hypothesis, items, **options):
    return scrub(model, hypothesis, items, metric=al.metrics.logit_diff(300, 301), **options)


@pytest.fixture(scope="module")
def items() -> list[dict]:
    """Six prompts of six token ids; the feature ``first`` (the first token) takes three values."""
    ids = torch.randint(4, 400, (6, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = torch.tensor([10, 11, 12, 10, 11, 12])
    return [{"prompt": row, "first": int(row[0]), "ids": row} for row in ids]


def test_every_edge_kept_keeps_everything_and_none_kept_nothing(model, items):
    graph = component_graph(model, "head")
    full = _scrub(model, Hypothesis(edges=graph.edges), items)
    frame = full.to_frame()
    assert (frame["scrubbed"] - frame["clean"]).abs().max() <= TOL
    assert full.fraction == pytest.approx(1.0, abs=1e-4)
    empty = _scrub(model, Hypothesis(edges=[], level="head"), items)
    frame = empty.to_frame()
    assert (frame["scrubbed"] - frame["ablated"]).abs().max() == 0  # the same resamples, the same forwards
    assert empty.fraction == 0
    # Resampling every edge really changed the runs.
    assert (frame["ablated"] - frame["clean"]).abs().max() > 1e-3


def test_a_scrubbed_row_matches_plain_hooks(model, items):
    """Kept edges into attn2 may come from prompts with the same first word; the rest is resampled."""
    graph = component_graph(model, "head")
    kept = [e for e in graph.edges if e.receiver.name in ("attn2", "logits") and e.sender.layer >= 1]
    hypothesis = {"edges": kept, "features": {"attn2": "first"}}
    result = _scrub(model, hypothesis, items, samples=2, seed=3)
    frame = result.to_frame()
    assert len(frame) == 2 * len(items)
    writes = [record(model.hf, item["ids"][None]) for item in items]
    kept_names = {e.name for e in kept}
    sources = result.sources["scrubbed"]
    for row in (0, 7):
        prompt = int(frame["prompt"][row])
        edges = []
        for index, edge in enumerate(graph.edges):
            source = int(sources[row, index])
            if edge.name in kept_names:
                if edge.receiver.name != "attn2":
                    continue  # kept without a feature: this prompt's own write
                assert items[source]["first"] == items[prompt]["first"]
            else:
                assert source != prompt
            edges.append((edge.sender.name, edge.receiver.name, 1.0, writes[source]))
        last = run(model.hf, items[prompt]["ids"][None], edges, {})
        want = float(last[0, 300] - last[0, 301])
        assert frame["scrubbed"][row] == pytest.approx(want, abs=TOL)


def test_bootstrap_interval_brackets_the_fraction(model, items):
    graph = component_graph(model, "head")
    half = [e for i, e in enumerate(graph.edges) if i % 2 == 0]
    result = _scrub(model, Hypothesis(edges=half), items, samples=2, n_bootstrap=200)
    low, high = result.interval
    frame = result.to_frame()
    by_hand = (frame["scrubbed"].mean() - frame["ablated"].mean()) / (frame["clean"].mean() - frame["ablated"].mean())
    assert result.fraction == pytest.approx(by_hand, abs=1e-5)
    assert low <= result.fraction <= high and low < high


def test_bad_hypotheses_say_what_to_do(model, items):
    with pytest.raises(al.CircuitGraphError, match="as a hypothesis"):
        _scrub(model, ["a0.h1->logits"], items)
    with pytest.raises(al.PromptError, match="'missing'.*not a field"):
        _scrub(model, Hypothesis(edges=["a0.h1->logits"], features={"logits": "missing"}), items)
    with pytest.raises(al.CircuitGraphError, match="cannot receive"):
        _scrub(model, Hypothesis(edges=["a0.h1->logits"], features={"embed": "first"}), items)
    with pytest.raises(al.PromptError, match="at least two"):
        _scrub(model, Hypothesis(edges=[]), items[:1])
    with pytest.raises(al.OptionError, match="samples=0"):
        _scrub(model, Hypothesis(edges=[]), items, samples=0)
