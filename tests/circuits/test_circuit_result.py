"""CircuitResult: ranking, pruning (with the orphan rule), saving and plotting."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import anylens as al
from anylens.testing import tiny

CLEAN = torch.tensor([[5, 17, 9, 23, 4], [6, 18, 30, 40, 7]])
CORRUPT = torch.tensor([[5, 17, 12, 23, 4], [6, 18, 31, 40, 7]])


@pytest.fixture(scope="module")
def result() -> al.CircuitResult:
    return al.circuit(tiny("gpt2"), CLEAN, CORRUPT, metric=al.metrics.logit_diff(10, 11), method="eap")


def test_frame_ranks_edges_by_absolute_score(result):
    frame = result.to_frame()
    assert list(frame.columns) == ["sender", "receiver", "sender_layer", "receiver_layer", "score", "rank"]
    assert len(frame) == result.meta["graph_edges"] == len(al.circuits.component_graph(result.model, "head"))
    by_hand = frame.score.abs().sort_values(ascending=False).index
    assert list(frame.loc[by_hand, "rank"]) == list(range(1, len(frame) + 1))
    top = result.top(5)
    assert list(top["rank"]) == [1, 2, 3, 4, 5]
    assert top.score.abs().min() >= frame.score.abs().nlargest(5).min()


def _with_scores(result: al.CircuitResult, scores: dict[str, float]) -> al.CircuitResult:
    frame = result.to_frame()
    names = frame.sender + "->" + frame.receiver
    frame["score"] = [scores.get(name, 0.0) for name in names]
    assert set(scores) <= set(names)
    return al.CircuitResult(result.experiment, frame, dict(result.meta), result.value)


def test_prune_drops_edges_that_reach_no_logits(result):
    """Hand-built: a1.h0 writes to the logits, so edges into attn1 count, and mlp0 feeds attn1, so
    edges into mlp0 count; nothing kept leaves layer 0's heads or mlp1, so edges into them go."""
    circuit = _with_scores(
        result,
        {
            "a1.h0->logits": 4.0,
            "embed->attn1": 3.0,
            "mlp0->attn1": -2.0,
            "embed->mlp0": 1.5,
            "embed->attn0": 5.0,  # orphan: no kept edge leaves a layer-0 head
            "a0.h1->mlp1": -6.0,  # orphan: no kept edge leaves mlp1
        },
    )
    kept = circuit.prune(threshold=1.0)
    assert sorted(kept.edges) == sorted(["a1.h0->logits", "embed->attn1", "mlp0->attn1", "embed->mlp0"])
    assert list(kept.to_frame().sort_values("rank").score) == [4.0, 3.0, -2.0, 1.5]
    everything = circuit.prune(threshold=1.0, drop_orphans=False)
    assert len(everything.frame) == 6
    assert sorted(circuit.prune(k=2, drop_orphans=False).edges) == ["a0.h1->mlp1", "embed->attn0"]
    assert circuit.prune(k=2).edges == []  # the two largest are both orphans


def test_save_and_load_keep_the_frame_and_prune_the_same(result, tmp_path):
    path = result.save(tmp_path / "circuit.json")
    loaded = al.CircuitResult.load(path)
    pd.testing.assert_frame_equal(loaded.to_frame(), result.to_frame())
    assert loaded.meta["reads"] == result.meta["reads"]
    assert loaded.prune(k=10).edges == result.prune(k=10).edges


def test_plot_draws_the_kept_edges_layers_bottom_to_top(result):
    fig = result.plot(k=6)
    ax = fig.axes[0]
    labels = {text.get_text() for text in ax.texts}
    top = result.top(6)
    assert set(top.sender) | set(top.receiver) <= labels
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks[0] == "embed" and ticks[-1] == "logits"
    arrows = [text for text in ax.texts if getattr(text, "arrow_patch", None) is not None]
    assert len(arrows) == 6


def test_report_has_a_circuit_section(result, tmp_path):
    from anylens.viz.report import Report

    report = Report("circuits")
    report.circuit(result, k=5)
    html = report.write(tmp_path / "report.html").read_text()
    assert 'id="circuit"' in html and 'id="circuit-edges"' in html and "data:image/png;base64," in html
    for sender, receiver in zip(result.top(5).sender, result.top(5).receiver):
        assert f"<td>{sender}</td>" in html and f"<td>{receiver}</td>" in html


@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_faithfulness_curve_runs_from_no_edge_to_every_edge(result, ablation):
    """Every edge kept is the clean run; with corrupt ablation no edge kept is the corrupt run (both
    as the EAP pass measured them); normalized is (metric - none) / (all - none) of those values."""
    n = len(result.frame)
    curve = result.faithfulness(ks=[0, 3, n], ablation=ablation)
    faith = result.meta["faithfulness"]
    assert list(curve.k) == [0, 3, n] and curve.fraction.iloc[-1] == pytest.approx(1.0)
    assert faith["all"] == pytest.approx(result.clean_metric, abs=1e-4)
    assert curve.metric.iloc[-1] == pytest.approx(result.clean_metric, abs=1e-4)
    if ablation == "corrupt":
        assert faith["none"] == pytest.approx(result.corrupt_metric, abs=1e-4)
        assert curve.metric.iloc[0] == pytest.approx(result.corrupt_metric, abs=1e-4)
    by_hand = (curve.metric - faith["none"]) / (faith["all"] - faith["none"])
    assert list(curve.normalized) == pytest.approx(list(by_hand))


def test_clean_and_corrupt_metrics_match_plain_forwards_also_for_kl():
    """KL from the clean run: 0 on the clean run, KL(clean || corrupt) on the corrupt run."""
    model = tiny("llama")
    result = al.circuit(model, CLEAN, CORRUPT, metric=al.metrics.kl(), method="eap")
    with torch.no_grad():
        clean = model.hf(CLEAN).logits[:, -1].log_softmax(-1)
        corrupt = model.hf(CORRUPT).logits[:, -1].log_softmax(-1)
    kl = (clean.exp() * (clean - corrupt)).sum(-1).mean().item()
    assert kl > 1e-4
    assert result.corrupt_metric == pytest.approx(kl, rel=1e-4)
    assert result.clean_metric == pytest.approx(0.0, abs=1e-6)


def test_plot_faithfulness_draws_the_curve_and_marks_the_smallest_k_reaching_the_target(result):
    """A hand-made curve that dips after reaching the target: the mark is on the first k reaching it."""
    curve = {"k": [1, 2, 4, 8], "fraction": [0.0] * 4, "metric": [0.0] * 4, "normalized": [0.1, 0.85, 0.7, 0.9]}
    meta = dict(result.meta, faithfulness={"ablation": "corrupt", "none": 0.0, "all": 1.0, "curve": curve})
    measured = al.CircuitResult(result.experiment, result.to_frame(), meta, result.value)
    ax = measured.plot_faithfulness(target=0.8).axes[0]
    xs, ys = ax.lines[0].get_data()
    assert list(xs) == curve["k"] and list(ys) == curve["normalized"]
    assert [tuple(point) for point in ax.collections[0].get_offsets()] == [(2, 0.85)]
    assert [line.get_ydata()[0] for line in ax.lines[1:]] == [1.0, 0.0, 0.8]
    assert not measured.plot_faithfulness(target=0.95).axes[0].collections  # no size reaches 0.95
    assert measured.smallest_faithful(0.8) == 2 and measured.smallest_faithful(0.88) == 8
    assert measured.smallest_faithful(0.95) is None

    unmeasured = al.CircuitResult(
        result.experiment, result.to_frame(), {k: v for k, v in meta.items() if k != "faithfulness"}, result.value
    )
    with pytest.raises(al.CircuitOptionError, match="faithfulness"):
        unmeasured.plot_faithfulness()
    with pytest.raises(al.CircuitOptionError, match="faithfulness"):
        unmeasured.smallest_faithful()


def test_report_holds_several_circuits_under_their_own_anchors(result, tmp_path):
    from anylens.viz.report import Report

    result.faithfulness(ks=[1, 4])
    report = Report("circuits")
    report.circuit(result, k=5, anchor="first")
    report.circuit(result, k=5, anchor="second")
    html = report.write(tmp_path / "report.html").read_text()
    for anchor in ("first", "second"):
        for suffix in ("", "-edges", "-faithfulness"):
            assert html.count(f'id="{anchor}{suffix}"') == 1
    assert html.count("<img") == 4  # per circuit: the graph and the faithfulness curve
