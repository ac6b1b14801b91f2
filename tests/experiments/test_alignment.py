"""Aligning clean and corrupt prompts of different tokenizations: ``align="auto"``, one alignment
per pair, lists of pairs of mixed lengths, and the warning for same-length pairs whose sub-word
splits shift positions. Patched values are checked against plain torch hooks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from families import ANY_FAMILY
from hook_reference import reference_patch
from tiny_models import model_cache
from tiny_models import random_prompt_pairs as prompt_pairs

import anylens as al
from anylens.experiments.alignment import auto_align, shifted_positions

TOL = 1e-5
METRIC = al.metrics.logit_diff(300, 301)  # token ids: the tiny tokenizer's " Paris", " Rome"
model_of = model_cache()


# -- the rule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("clean", "corrupt", "words", "expected"),
    [
        # same length, one whole word swapped: every position pairs with itself
        ([1, 2, 3, 4], [1, 2, 9, 4], None, ([0, 1, 2, 3], [0, 1, 2, 3], ["same"] * 4)),
        # a three-token span against a two-token span: prefix, the spans' last tokens, suffix
        (
            [1, 5, 6, 7, 3, 4],
            [1, 8, 9, 3, 4],
            None,
            ([0, 3, 4, 5], [0, 2, 3, 4], ["prefix", "span end", "suffix", "suffix"]),
        ),
        # an insertion: the inserted token pairs with nothing
        ([1, 2, 3, 4], [1, 2, 9, 3, 4], None, ([0, 1, 2, 3], [0, 1, 3, 4], ["prefix", "prefix", "suffix", "suffix"])),
        # same length, but a word of the clean prompt split in two against two words: span ends only
        (
            [1, 5, 6, 3],
            [1, 8, 9, 3],
            ([0, 1, 1, 2], [0, 1, 2, 3]),
            ([0, 2, 3], [0, 2, 3], ["prefix", "span end", "suffix"]),
        ),
    ],
)
def test_auto_alignment_rule(clean, corrupt, words, expected):
    alignment = auto_align(clean, corrupt, *(words or (None, None)))
    assert (alignment.clean, alignment.corrupt, alignment.kinds) == expected


def test_shifted_positions_are_the_runs_of_split_words_but_their_last():
    # tokens 1-3 differ; the clean side covers two words, the corrupt side one: 1 and 2 shift
    assert shifted_positions([0, 5, 6, 7, 9], [0, 8, 8, 8, 9], [0, 1, 1, 2, 3], [0, 1, 1, 1, 2]) == [1, 2]
    # one word for one token on both sides: nothing shifts
    assert shifted_positions([0, 5, 9], [0, 8, 9], [0, 1, 2], [0, 1, 2]) == []


# -- patching with it, on every family ----------------------------------------------------------------
def _inserted(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, tuple[list[int], list[int]]]:
    """A clean prompt, its corrupt prompt with position 2 replaced by two other tokens, and the
    alignment worked out by hand: positions 0, 1 and 3.. pair up, and clean 2 with corrupt 3."""
    clean, _ = prompt_pairs(seed=seed)
    clean = clean[:1]
    middle = torch.tensor([[int(clean[0, 2]) % 390 + 5, int(clean[0, 2]) % 390 + 6]])  # neither equals clean[2]
    corrupt = torch.cat([clean[:, :2], middle, clean[:, 3:]], dim=1)
    return clean, corrupt, ([0, 1, 2, 3, 4, 5], [0, 1, 3, 4, 5, 6])


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_auto_alignment_patches_as_the_hand_alignment(family, direction):
    model = model_of(family)
    clean, corrupt, hand = _inserted()
    result = al.patch(model, clean, corrupt, role="resid_pre", metric=METRIC, align="auto", direction=direction)
    assert result.meta["align"] == {"clean": hand[0], "corrupt": hand[1]}
    expected, *_ = reference_patch(model.hf, "resid_pre", ("layer", "pos"), clean, corrupt, direction, align=hand)
    got = {(int(r.layer), int(r.pos)): r.metric for r in result.frame.itertuples()}
    assert set(got) == set(expected)
    assert max(abs(got[k] - v) for k, v in expected.items()) <= TOL
    estimate = al.attribute(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=METRIC, align="auto")
    by_hand = al.attribute(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=METRIC, align=hand)
    np.testing.assert_array_equal(estimate.frame["estimate"].to_numpy(), by_hand.frame["estimate"].to_numpy())


MIXED = [  # (clean, corrupt): the second pair's corrupt prompt spells its country letter by letter
    ("The capital of France is", "The capital of Italy is"),
    ("The capital of France is", "The capital of Hungary is"),
    ("The Eiffel Tower is in", "The Paris Tower is in"),
]


def _by_hand(model, clean: str, corrupt: str) -> tuple[torch.Tensor, torch.Tensor, tuple[list[int], list[int]]]:
    """Token ids and the alignment of a pair, from its common prefix and suffix counted here."""
    c, k = model.to_tokens(clean)["input_ids"], model.to_tokens(corrupt)["input_ids"]
    if c.shape == k.shape:
        return c, k, (list(range(c.shape[1])), list(range(c.shape[1])))
    prefix = next(i for i in range(c.shape[1]) if c[0, i] != k[0, i])
    suffix = next(j for j in range(1, c.shape[1]) if c[0, -j] != k[0, -j]) - 1
    n, m = c.shape[1], k.shape[1]
    return (
        c,
        k,
        (
            [*range(prefix), n - suffix - 1, *range(n - suffix, n)],
            [*range(prefix), m - suffix - 1, *range(m - suffix, m)],
        ),
    )


def test_a_list_of_pairs_of_mixed_lengths_patches_each_pair_as_alone(family):
    model = model_of(family)
    assert len({model.to_tokens(k)["input_ids"].shape[1] for _, k in MIXED}) == 2  # two lengths
    clean, corrupt = [c for c, _ in MIXED], [k for _, k in MIXED]
    options = dict(role="resid_pre", over=("layer",), metric=METRIC, align="auto")
    per_pair = al.patch(model, clean, corrupt, per_prompt=True, **options)
    summary = al.patch(model, clean, corrupt, **options)
    expected, clean_metric, corrupt_metric = {}, [], []
    for index, (c, k) in enumerate(MIXED):
        c_ids, k_ids, hand = _by_hand(model, c, k)
        values, clean_value, corrupt_value = reference_patch(
            model.hf, "resid_pre", ("layer",), c_ids, k_ids, "denoise", align=hand
        )
        expected.update({(layer, index): v for (layer,), v in values.items()})
        clean_metric.append(clean_value)
        corrupt_metric.append(corrupt_value)
    got = {(int(r.layer), int(r.prompt)): r.metric for r in per_pair.frame.itertuples()}
    assert set(got) == set(expected)
    assert max(abs(got[key] - value) for key, value in expected.items()) <= TOL
    assert len(per_pair.meta["groups"]) == 2
    np.testing.assert_allclose(per_pair.meta["clean_metric_per_prompt"], clean_metric, atol=TOL)
    for layer in range(model.n_layers):
        row = summary.frame[summary.frame["layer"] == layer].iloc[0]
        mean = np.mean([expected[(layer, i)] for i in range(len(MIXED))])
        assert row["metric"] == pytest.approx(mean, abs=TOL)
        gap = np.mean(clean_metric) - np.mean(corrupt_metric)
        assert row["normalized"] == pytest.approx((mean - np.mean(corrupt_metric)) / gap, abs=1e-3)


def test_one_alignment_per_pair():
    model = model_of(ANY_FAMILY)
    pairs_clean, pairs_corrupt = (
        ["The capital of France is", "The capital of France is"],
        [
            "The capital of Italy is",
            "The capital of Hungary is",
        ],
    )
    _, _, second = _by_hand(model, *MIXED[1])
    options = dict(role="resid_pre", over=("layer",), metric=METRIC, per_prompt=True)
    given = al.patch(model, pairs_clean, pairs_corrupt, align=[None, second], **options)
    auto = al.patch(model, pairs_clean, pairs_corrupt, align="auto", **options)
    np.testing.assert_array_equal(given.frame["metric"].to_numpy(), auto.frame["metric"].to_numpy())
    with pytest.raises(al.PromptError, match="2 alignments for 3 prompt pairs"):
        al.patch(
            model, [*pairs_clean, pairs_clean[0]], [*pairs_corrupt, pairs_corrupt[0]], align=[None, second], **options
        )


# -- the warning ---------------------------------------------------------------------------------------
def test_same_length_pairs_whose_splits_shift_positions_warn_naming_them():
    model = model_of(ANY_FAMILY)
    clean, corrupt = "The Eiffel Tower is in", "The K is in"  # " K" is two tokens, " ", "K", in the tiny tokenizer
    assert model.to_tokens(clean)["input_ids"].shape == model.to_tokens(corrupt)["input_ids"].shape
    with pytest.warns(al.MisalignmentWarning, match=r"position\(s\) 1 no longer correspond") as caught:
        al.patch(model, clean, corrupt, role="resid_pre", metric=METRIC, over=("layer",))
    assert "align='auto'" in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the call
    with warnings.catch_warnings():
        warnings.simplefilter("error", al.MisalignmentWarning)
        aligned = al.patch(model, clean, corrupt, role="resid_pre", metric=METRIC, align="auto")
        al.patch(model, clean, corrupt, role="resid_pre", metric=METRIC, positions=[2, 3])  # positions that correspond
        al.patch(model, *MIXED[0], role="resid_pre", metric=METRIC)  # a whole word for a whole word
    assert sorted(set(aligned.frame["pos"])) == [0, 2, 3, 4]


def test_show_alignment_lists_every_position_of_both_prompts():
    model = model_of(ANY_FAMILY)
    table = al.show_alignment(model, *MIXED[1])
    c, k, (clean_pos, corrupt_pos) = _by_hand(model, *MIXED[1])
    paired = table[table["match"] != "unpaired"]
    assert paired["clean_pos"].tolist() == clean_pos and paired["corrupt_pos"].tolist() == corrupt_pos
    assert sorted(table["clean_pos"].dropna().tolist()) == list(range(c.shape[1]))
    assert sorted(table["corrupt_pos"].dropna().tolist()) == list(range(k.shape[1]))
    assert paired["clean_token"].tolist() == [model.decode([c[0, p]]) for p in clean_pos]


def test_a_sweep_aligns_each_pair_of_its_own(tmp_path):
    """al.run passes align='auto' to every pair's call: each pair is aligned by its own tokens."""
    model = model_of(ANY_FAMILY)
    options = dict(role="resid_pre", over=("layer",), metric=METRIC, align="auto")
    sweep = al.run("patch", models=[f"tiny:{ANY_FAMILY}"], prompts=MIXED, out=tmp_path / "s", quiet=True, **options)
    for index, (clean, corrupt) in enumerate(MIXED):
        alone = al.patch(model, clean, corrupt, **options)
        rows = sweep.frame[sweep.frame["prompt"] == index]
        np.testing.assert_allclose(rows["metric"].to_numpy(), alone.frame["metric"].to_numpy(), atol=TOL)
