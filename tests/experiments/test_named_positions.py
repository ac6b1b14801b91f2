"""Named positions: pairs that name their positions (``al.pair`` marks, dataset pairs),
``positions=["S2", "END"]`` resolved pair by pair, ``pos_label`` on the rows, and sweep
aggregates that group a name's rows across prompts of different lengths."""

from __future__ import annotations

import numpy as np
import pytest
from families import ANY_FAMILY
from hook_reference import reference_patch
from tiny_models import model_cache

import anylens as al
from anylens.datasets import IOI_TEMPLATES, factual_pairs, ioi_pairs

TOL = 1e-5
METRIC = al.metrics.logit_diff(300, 301)
model_of = model_cache()


def test_marked_words_name_the_last_token_of_their_words():
    model = model_of(ANY_FAMILY)
    pair = al.pair(
        model,
        "When [IO:Mary] and [S1:John] went to the store, [S2:John] gave a drink to",
        "When [IO:Mary] and [S1:John] went to the store, [S2:Hungary] gave a drink to",
        answer=" Mary",
        distractor=" John",
    )
    assert pair.clean == "When Mary and John went to the store, John gave a drink to"
    assert pair.corrupt == "When Mary and John went to the store, Hungary gave a drink to"
    clean_tokens, corrupt_tokens = model.to_str_tokens(pair.clean), model.to_str_tokens(pair.corrupt)
    io, s1, s2 = pair.positions["IO"], pair.positions["S1"], pair.positions["S2"]
    assert clean_tokens[io[0]].strip() == "Mary" and clean_tokens[s1[0]].strip() == "John"
    assert [t.strip() for t in clean_tokens].count("John") == 2 and clean_tokens[s2[0]].strip() == "John"
    assert s2[0] > s1[0]
    # " Hungary" is several tokens in the tiny tokenizer: the name is its last one
    spelled = "".join(corrupt_tokens[s2[1] - 6 : s2[1] + 1])
    assert spelled.strip() == "Hungary" and corrupt_tokens[s2[1] + 1] == " gave"
    assert (pair.answer, pair.distractor) == (" Mary", " John")


def test_named_positions_patch_as_the_positions_they_name(family):
    """A pair of different lengths patched at its named positions equals plain hooks patching those
    positions, and the rows are labelled with the names."""
    model = model_of(family)
    pair = al.pair(model, "The capital of [C:France] is", "The capital of [C:Hungary] is")
    n_clean, n_corrupt = (model.to_tokens(t)["input_ids"].shape[1] for t in (pair.clean, pair.corrupt))
    assert n_clean != n_corrupt
    (c, k) = pair.positions["C"]
    result = al.patch(model, pair, pair, role="resid_pre", metric=METRIC, positions=["C", "END"])
    hand = ([c, n_clean - 1], [k, n_corrupt - 1])
    clean_ids, corrupt_ids = model.to_tokens(pair.clean)["input_ids"], model.to_tokens(pair.corrupt)["input_ids"]
    expected, *_ = reference_patch(
        model.hf, "resid_pre", ("layer", "pos"), clean_ids, corrupt_ids, "denoise", align=hand
    )
    got = {(int(r.layer), int(r.pos)): r.metric for r in result.frame.itertuples()}
    assert set(got) == set(expected)
    assert max(abs(got[key] - value) for key, value in expected.items()) <= TOL
    assert dict(zip(result.frame["pos"], result.frame["pos_label"])) == {k: "C", n_corrupt - 1: "END"}
    noised = al.patch(model, pair, pair, role="resid_pre", metric=METRIC, positions=["C"], direction="noise")
    assert set(noised.frame["pos"]) == {c}  # noising patches the clean run at the clean prompt's position
    estimate = al.attribute(model, pair, pair, role="resid_pre", over=("layer", "pos"), metric=METRIC, positions="C")
    assert set(estimate.frame["pos_label"]) == {"C"} and set(estimate.frame["pos"]) == {k}


def test_ioi_pairs_name_their_positions():
    model = al.load("zoo:gpt2")
    for corruption in ("swap_subject", "random_names"):
        for pair in ioi_pairs(model.tokenizer, 12, corruption=corruption):
            clean, corrupt = model.to_str_tokens(pair.clean), model.to_str_tokens(pair.corrupt)
            io, s1, s1_next, s2 = (pair.positions[n] for n in ("IO", "S1", "S1+1", "S2"))
            assert clean[io[0]].strip() == pair.answer.strip() and clean[s1[0]].strip() == pair.distractor.strip()
            assert clean[s2[0]].strip() == pair.distractor.strip() and s2[0] > s1[0]
            assert s1_next == (s1[0] + 1, s1[1] + 1)
            mentions = [i for i, t in enumerate(clean) if t.strip() in (pair.answer.strip(), pair.distractor.strip())]
            assert sorted([io[0], s1[0], s2[0]]) == mentions  # the three mentions of the two names
            assert (io[0] < s1[0]) == (pair.order == "ABBA")
            # corrupt names are the template's slots: the IO slot holds the corrupt prompt's answer
            assert corrupt[io[1]].strip() == pair.corrupt_answer.strip() or corruption == "swap_subject"
            assert corrupt[s2[1]].strip() == pair.answer.strip() or corruption == "random_names"


def test_factual_pairs_name_their_positions():
    model = al.load("zoo:gpt2")
    for pair in factual_pairs(model.tokenizer):
        tokens = model.to_str_tokens(pair.clean)
        first, last = pair.positions["subject_first"][0], pair.positions["subject_last"][0]
        assert "".join(tokens[first : last + 1]).replace(" ", "") == pair.subject.replace(" ", "")
        assert tokens[pair.positions["relation"][0]].strip() in ("capital", "visit", "is")
        assert pair.positions["relation"][0] < len(tokens) - 1  # never the last token, END


def test_a_name_a_pair_does_not_define_is_refused_listing_the_names():
    zoo = al.load("zoo:gpt2")
    pairs = ioi_pairs(zoo.tokenizer, 2, templates=IOI_TEMPLATES[:1])
    with pytest.raises(al.PositionNameError, match=r"'S3' is not defined .* 'IO', 'S1', 'S1\+1', 'S2', 'END'"):
        al.patch(zoo, pairs, pairs, positions=["S3"], metric="logit_diff")


# -- sweeps: names group rows across prompts of different lengths ---------------------------------------
def test_a_sweep_of_pairs_of_different_lengths_aggregates_by_name(tmp_path):
    model = al.load("zoo:gpt2")
    pairs = factual_pairs(model.tokenizer)
    by_length = {}
    for pair in pairs:
        by_length.setdefault(len(model.to_str_tokens(pair.clean)), []).append(pair)
    chosen = [p for group in by_length.values() for p in group[:2]]
    assert len(by_length) >= 3  # three lengths or more, in one sweep
    names = ["subject_last", "END"]
    result = al.run(
        "patch",
        models=["zoo:gpt2"],
        prompts=chosen,
        out=tmp_path / "sweep",
        quiet=True,
        role="resid_pre",
        over=("layer", "pos"),
        positions=names,
        metric="logit_diff",
    )
    summary = result.aggregate()
    assert "pos" not in summary.columns and set(summary["pos_label"]) == set(names)
    assert result.results()["zoo:gpt2"].dims == ["layer", "pos_label"]  # its heatmap: layer x name
    assert (summary["count"] == len(chosen)).all()
    for index, pair in enumerate(chosen):  # each prompt's rows are its own patch at those positions
        tokens = model.to_str_tokens(pair.clean)
        subject_last = max(i for i, t in enumerate(tokens) if t.strip() and t.strip() in pair.subject.split())
        alone = al.patch(
            model,
            pair.clean,
            pair.corrupt,
            role="resid_pre",
            positions=[subject_last, -1],
            metric=al.metrics.logit_diff(pair.answer, pair.corrupt_answer),
        )
        rows = result.frame[result.frame["prompt"] == index]
        np.testing.assert_allclose(rows["metric"].to_numpy(), alone.frame["metric"].to_numpy(), atol=TOL)
        assert rows["pos"].tolist() == [subject_last, len(tokens) - 1] * model.n_layers
        assert rows["pos_label"].tolist() == names * model.n_layers
    for (layer, name), group in result.frame.groupby(["layer", "pos_label"]):
        row = summary[(summary["layer"] == layer) & (summary["pos_label"] == name)].iloc[0]
        assert row["mean"] == pytest.approx(group["value"].mean(), abs=1e-12)


def test_single_run_experiments_take_names_the_prompts_define(family):
    """ablate and the logit lens read a name as the index the prompts give it, and label its rows."""
    model = model_of(family)
    marked = [al.pair(model, f"The capital of [C:{c}] is", "The capital of [C:Italy] is") for c in ("France", "Italy")]
    (c, _), last = marked[0].positions["C"], model.to_tokens(marked[0].clean)["input_ids"].shape[1] - 1
    options = dict(role="resid_pre", over=("layer", "pos"), metric=METRIC)
    by_name = al.ablate(model, marked, positions=["C", "END"], **options)
    by_index = al.ablate(model, [p.clean for p in marked], positions=[c, last], **options)
    np.testing.assert_array_equal(by_name.frame["value"].to_numpy(), by_index.frame["value"].to_numpy())
    assert by_name.frame.groupby("pos")["pos_label"].first().to_dict() == {c: "C", last: "END"}
    lens = al.logit_lens(model, marked[0], positions=["C"], metric=[300])
    assert set(lens.frame["pos"]) == {c} and set(lens.frame["pos_label"]) == {"C"}
    lens_by_index = al.logit_lens(model, marked[0].clean, positions=[c], metric=[300])
    np.testing.assert_array_equal(lens.frame["prob"].to_numpy(), lens_by_index.frame["prob"].to_numpy())
    apart = al.pair(model, "[C:The] capital of France is", "[C:The] capital of Italy is")  # same length, C elsewhere
    with pytest.raises(al.PromptError, match="'C' is at positions .* in different prompts"):
        al.ablate(model, [marked[0], apart], positions=["C"], **options)


def test_an_ablation_sweep_aggregates_by_name(tmp_path):
    model = al.load("zoo:gpt2")
    pairs = ioi_pairs(model.tokenizer, 6)  # several templates: several lengths
    assert len({len(model.to_str_tokens(p.clean)) for p in pairs}) > 1
    result = al.run(
        "ablate",
        models=["zoo:gpt2"],
        prompts=pairs,
        out=tmp_path / "s",
        quiet=True,
        role="resid_pre",
        over=("layer", "pos"),
        positions=["S2", "END"],
        metric="logit_diff",
    )
    summary = result.aggregate()
    assert set(summary["pos_label"]) == {"S2", "END"} and (summary["count"] == len(pairs)).all()
    for index, pair in enumerate(pairs):
        rows = result.frame[result.frame["prompt"] == index]
        assert set(rows.loc[rows["pos_label"] == "S2", "pos"]) == {pair.positions["S2"][0]}


def test_a_list_of_pairs_of_different_lengths_is_averaged_by_name():
    model = al.load("zoo:gpt2")
    pairs = ioi_pairs(model.tokenizer, 4)
    assert len({len(model.to_str_tokens(p.clean)) for p in pairs}) > 1
    options = dict(role="resid_pre", over=("layer", "pos"), positions=["S2", "END"], metric="logit_diff")
    together = al.patch(model, pairs, pairs, **options)
    assert "pos" not in together.frame.columns and together.meta["over"] == ["layer", "pos_label"]
    alone = [al.patch(model, [p], [p], **options).frame for p in pairs]
    for row in together.frame.itertuples():
        values = [f.loc[(f["layer"] == row.layer) & (f["pos_label"] == row.pos_label), "metric"].item() for f in alone]
        assert row.metric == pytest.approx(np.mean(values), abs=TOL)
    per_pair = al.patch(model, pairs, pairs, per_prompt=True, **options)
    assert len(per_pair.frame) == len(pairs) * model.n_layers * 2
    for index, pair in enumerate(pairs):
        rows = per_pair.frame[(per_pair.frame["prompt"] == index) & (per_pair.frame["pos_label"] == "S2")]
        assert set(rows["pos"]) == {pair.positions["S2"][1]}
