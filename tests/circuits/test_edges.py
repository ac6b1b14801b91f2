"""Path patching and edge-ablated forwards against plain torch hooks (tests/circuit_reference.py)."""

from __future__ import annotations

import pytest
import torch
from circuit_reference import all_edges, circuit_paths, last_logits, record, run
from families import families_with, has_head_decomposition, spec_of
from tiny_models import model_cache
from tiny_models import random_prompt_pairs as prompt_pairs

import anylens as al
from anylens.circuits.edges import edge_metrics, edge_patch_scores
from anylens.circuits.graph import component_graph

TOL = 1e-5  # float32
ANSWER, DISTRACTOR = 300, 301
METRIC = al.metrics.logit_diff(ANSWER, DISTRACTOR)

model_of = model_cache()

#: Families with a component graph: a branch input for the token mixer.
GRAPH_FAMILIES = families_with("resid_pre", where=lambda spec: "attn_in" in spec.roles or "mixer_in" in spec.roles)


def logit_diff(last: torch.Tensor) -> torch.Tensor:
    return last[:, ANSWER] - last[:, DISTRACTOR]


class Names:
    """The node names of a family, from the test's own description of it (not from the graph)."""

    def __init__(self, family: str, model: al.AnyModel, head_level: bool):
        paths = circuit_paths(model.hf)
        self.n = model.n_layers
        self.parallel = paths.parallel
        self.shared = paths.mlp_norm == paths.attn_norm
        self.has_mlp = paths.mlp is not None
        self.head_level = head_level and paths.out_proj is not None and paths.attn is not None
        self.mixer = "attn" if paths.attn else "mixer"

    def mix_receiver(self, layer: int) -> str:
        return f"block{layer}" if self.shared else f"{self.mixer}{layer}"

    def first_sender(self, layer: int, head: int = 0) -> str:
        return f"a{layer}.h{head}" if self.head_level else f"{self.mixer}{layer}"

    def senders(self) -> list[str]:
        names = ["embed"]
        for layer in range(self.n):
            if self.head_level:
                names += [f"a{layer}.h{h}" for h in range(4)]
            else:
                names.append(f"{self.mixer}{layer}")
            if self.has_mlp:
                names.append(f"mlp{layer}")
        return names

    def receivers(self) -> list[str]:
        names = []
        for layer in range(self.n):
            names.append(self.mix_receiver(layer))
            if self.has_mlp and not self.shared:
                names.append(f"mlp{layer}")
        return names + ["logits"]

    def edges(self) -> list[tuple[str, str]]:
        return all_edges(self.senders(), self.receivers(), self.n, self.parallel)


def reference_rows(model, clean, corrupt, rows, direction, names: Names) -> list[list[float]]:
    """The metric of each (senders, receivers) row and prompt pair, by plain hooks."""
    run_ids, other_ids = (clean, corrupt) if direction == "noise" else (corrupt, clean)
    values = []
    for senders, receivers in rows:
        receivers = names.receivers() if receivers is None else receivers
        edges = [(s, r, 1.0) for s, r in all_edges(senders, receivers, names.n, names.parallel)]
        per_pair = []
        for pair in range(clean.shape[0]):
            base, source = record(model.hf, run_ids[pair : pair + 1]), record(model.hf, other_ids[pair : pair + 1])
            per_pair.append(float(logit_diff(run(model.hf, run_ids[pair : pair + 1], edges, source, base))[0]))
        values.append(per_pair)
    return values


def check_rows(result, expected, rows):
    frame = result.to_frame()
    assert len(frame) == len(rows) * len(expected[0])
    got = frame["metric"].to_numpy().reshape(len(rows), -1)
    worst = max(abs(got[i, j] - expected[i][j]) for i in range(len(rows)) for j in range(len(expected[0])))
    assert worst <= TOL, f"max abs error {worst:.2e}"


@pytest.mark.parametrize("family", GRAPH_FAMILIES)
def test_path_patch_matches_plain_hooks(family):
    """A multi-sender / multi-receiver row and single-edge rows, at head level where heads write
    separably (noising), and at layer level with default receivers (denoising)."""
    model = model_of(family)
    clean, corrupt = prompt_pairs(different=(1, 3))
    head_level = has_head_decomposition(spec_of(family))
    names = Names(family, model, head_level)
    senders = [["embed", names.first_sender(0, 2)], [names.first_sender(1, 3)]]
    receivers = [[names.mix_receiver(2), "logits"], ["logits"]]
    result = al.path_patch(model, clean, corrupt, senders=senders, receivers=receivers, metric=METRIC, per_prompt=True)
    assert result.meta["level"] == ("head" if names.head_level else "layer")
    rows = [(s, r) for s in senders for r in receivers]
    check_rows(result, reference_rows(model, clean, corrupt, rows, "noise", names), rows)
    # Some row moved the metric: the patch reached the model.
    assert (result.to_frame()["metric"] - result.meta["clean_metric"]).abs().max() > 1e-4

    # Layer level, denoising, receivers defaulting to every receiver after the senders.
    layer_names = Names(family, model, head_level=False)
    later = [["mlp0" if layer_names.has_mlp else "mixer0"], [layer_names.mixer + "1"]]
    result = al.path_patch(model, clean, corrupt, senders=later, metric=METRIC, direction="denoise", per_prompt=True)
    rows = [(s, None) for s in later]
    check_rows(result, reference_rows(model, clean, corrupt, rows, "denoise", layer_names), rows)


def test_path_patch_result_reads_like_patch():
    model = model_of("gpt2")
    clean, corrupt = prompt_pairs(different=(1, 3))
    result = al.path_patch(model, clean, corrupt, senders="a0.h1", receivers="logits", metric=METRIC)
    frame = result.to_frame()
    assert list(frame.columns) == ["senders", "receivers", "edges", "metric", "normalized"]
    assert frame["senders"][0] == "a0.h1" and frame["receivers"][0] == "logits" and frame["edges"][0] == 1
    clean_metric, corrupt_metric = result.meta["clean_metric"], result.meta["corrupt_metric"]
    want = (frame["metric"][0] - corrupt_metric) / (clean_metric - corrupt_metric)
    assert frame["normalized"][0] == pytest.approx(want, abs=1e-6)
    clean_last, corrupt_last = last_logits(model.hf, clean), last_logits(model.hf, corrupt)
    assert clean_metric == pytest.approx(float(logit_diff(clean_last).mean()), abs=TOL)
    assert corrupt_metric == pytest.approx(float(logit_diff(corrupt_last).mean()), abs=TOL)


def _graph_and_names(family):
    model = model_of(family)
    head_level = has_head_decomposition(spec_of(family))
    graph = component_graph(model, "head" if head_level else "layer")
    names = Names(family, model, head_level)
    assert {edge.name for edge in graph.edges} == {f"{s}->{r}" for s, r in names.edges()}
    return model, graph, names


@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
@pytest.mark.parametrize("family", GRAPH_FAMILIES)
def test_edge_metrics_keeps_and_ablates_edges_like_plain_hooks(family, ablation):
    model, graph, names = _graph_and_names(family)
    clean, corrupt = prompt_pairs(different=(1, 3))
    edges = names.edges()
    kept = [edge for i, edge in enumerate(edges) if (i * 7) % 3 == 0]  # a fixed third of the edges
    sets = [[f"{s}->{r}" for s, r in edges], [], [f"{s}->{r}" for s, r in kept]]
    got = edge_metrics(model, clean, corrupt, graph, sets, metric=METRIC, ablation=ablation)
    assert got.shape == (3,)

    clean_last, corrupt_last = last_logits(model.hf, clean), last_logits(model.hf, corrupt)
    # Identities: every edge kept is the clean run; none kept, with corrupt ablation, the corrupt run.
    assert float(got[0]) == pytest.approx(float(logit_diff(clean_last).mean()), abs=TOL)
    if ablation == "corrupt":
        assert float(got[1]) == pytest.approx(float(logit_diff(corrupt_last).mean()), abs=TOL)

    clean_writes = [record(model.hf, clean[p : p + 1]) for p in range(clean.shape[0])]
    if ablation == "mean":
        mean = {name: torch.stack([w[name] for w in clean_writes]).mean(0) for name in clean_writes[0]}
        sources = [mean] * clean.shape[0]
    else:
        sources = [record(model.hf, corrupt[p : p + 1]) for p in range(clean.shape[0])]
    for index, keep in ((1, set()), (2, set(kept))):
        ablated = [(s, r, 1.0) for s, r in edges if (s, r) not in keep]
        want = [
            float(logit_diff(run(model.hf, clean[p : p + 1], ablated, sources[p]))[0]) for p in range(clean.shape[0])
        ]
        assert float(got[index]) == pytest.approx(sum(want) / len(want), abs=TOL)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "mamba"])
def test_edge_patch_scores_are_single_edge_path_patches(family):
    model, graph, names = _graph_and_names(family)
    clean, corrupt = prompt_pairs(different=(1, 3))
    chosen = [graph.edges[0], graph.edges[len(graph) // 2], graph.edges[-1]]
    scores = edge_patch_scores(model, clean, corrupt, graph, chosen, metric=METRIC)
    assert scores.shape == (3,)
    clean_metric = logit_diff(last_logits(model.hf, clean))
    for score, edge in zip(scores, chosen):
        per_pair = []
        for p in range(clean.shape[0]):
            base, source = record(model.hf, clean[p : p + 1]), record(model.hf, corrupt[p : p + 1])
            last = run(model.hf, clean[p : p + 1], [(edge.sender.name, edge.receiver.name, 1.0)], source, base)
            per_pair.append(float(logit_diff(last)[0]) - float(clean_metric[p]))
        assert float(score) == pytest.approx(sum(per_pair) / len(per_pair), abs=TOL)


def test_edge_metrics_takes_a_mask_and_batches_alike():
    model, graph, _ = _graph_and_names("gpt2")
    clean, corrupt = prompt_pairs(different=(1, 3))
    mask = (torch.arange(len(graph)) % 2 == 0).float()[None].repeat(3, 1)
    mask[1] = 0
    by_mask = edge_metrics(model, clean, corrupt, graph, mask, metric=METRIC, batch_size=1)
    by_names = edge_metrics(
        model, clean, corrupt, graph, [[e.name for e, k in zip(graph.edges, mask[0]) if k]], metric=METRIC
    )
    assert float(by_mask[0]) == pytest.approx(float(by_names[0]), abs=TOL)
    assert float(by_mask[2]) == pytest.approx(float(by_mask[0]), abs=TOL)
