"""Statistics over prompts: Benjamini-Hochberg against a hand-worked example, the sign-flip test
against cases whose p-value is known exactly, the bootstrap against the normal interval, and the
columns aggregates and summaries gain."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import anylens as al
from anylens.experiments.statistics import (
    benjamini_hochberg,
    bootstrap_interval,
    component_statistics,
    sign_flip_p_values,
)
from anylens.sweep import aggregate


def test_benjamini_hochberg_matches_a_hand_worked_example():
    # Sorted p_(i) * m / i with m = 8: .008 .032 .104 .082 .0672 .08 .08457 .205; then the running
    # minimum from the largest down: .008 .032 .0672 .0672 .0672 .08 .08457 .205.
    p = [0.041, 0.001, 0.205, 0.008, 0.039, 0.074, 0.042, 0.06]
    expected = [0.0672, 0.008, 0.205, 0.032, 0.0672, 0.074 * 8 / 7, 0.0672, 0.08]
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12)
    # NaN is no test: it stays NaN and m counts the others; adjusted values never exceed 1.
    np.testing.assert_allclose(benjamini_hochberg([0.5, np.nan, 0.9]), [0.9, np.nan, 0.9])
    assert benjamini_hochberg([0.9, 0.95]).max() <= 1.0


@pytest.mark.parametrize(
    "values,expected",
    [
        ([1.0, 2.0, 3.0], 2 / 8),  # of the 8 sign patterns only all-plus and all-minus reach |mean| 2
        ([1.0, 2.0, 3.0, 4.0, 5.0], 2 / 32),
        ([3.0, -1.0], 1.0),  # |mean| 1; the flips give 2, 1, 2, 1: every one as extreme
        ([1.0, -1.0, 2.0, -2.0], 1.0),  # mean 0
        ([4.0, 1.0, 1.0, 1.0], 2 / 16),  # |±4 ±1 ±1 ±1| reaches 7 only when every sign agrees
    ],
)
def test_sign_flip_p_value_is_exact_on_small_samples(values, expected):
    assert sign_flip_p_values(np.array([values]))[0] == pytest.approx(expected, abs=1e-12)


def test_sign_flip_p_values_are_uniform_under_the_null_and_small_for_an_effect():
    rng = np.random.default_rng(1)
    null = rng.normal(size=(200, 40))
    p = sign_flip_p_values(null, n_resamples=2000, seed=0)
    assert 0.01 <= (p < 0.05).mean() <= 0.10  # about 5% by construction
    effect = rng.normal(loc=1.0, size=(5, 40))
    assert (sign_flip_p_values(effect, n_resamples=2000, seed=0) <= 1 / 2000 + 1e-12).all()


def test_bootstrap_interval_is_reproducible_and_close_to_the_normal_interval():
    rng = np.random.default_rng(2)
    values = rng.normal(loc=3.0, scale=2.0, size=(1, 400))
    low, high = bootstrap_interval(values, seed=7)
    again = bootstrap_interval(values, seed=7)
    assert low[0] == again[0][0] and high[0] == again[1][0]
    mean, half = values.mean(), 1.959964 * values.std(ddof=1) / np.sqrt(400)
    assert low[0] == pytest.approx(mean - half, abs=0.1 * half)
    assert high[0] == pytest.approx(mean + half, abs=0.1 * half)
    constant = bootstrap_interval(np.full((1, 5), 2.5))
    assert constant[0][0] == pytest.approx(2.5) and constant[1][0] == pytest.approx(2.5)


def test_aggregate_marks_a_real_effect_significant_and_adjusts_over_components():
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({"layer": np.repeat(range(20), 30), "prompt": np.tile(range(30), 20)})
    frame["value"] = rng.normal(size=len(frame)) + np.where(frame["layer"] == 0, 2.0, 0.0)
    got = aggregate(frame, seed=0)
    np.testing.assert_allclose(got["p_adjusted"], benjamini_hochberg(got["p_value"]))
    assert got.loc[got["layer"] == 0, "significant"].item()
    assert got["significant"].sum() <= 2  # one real effect; at most a rare false discovery
    assert (got["boot_low"] <= got["mean"]).all() and (got["mean"] <= got["boot_high"]).all()
    assert aggregate(frame, seed=0).equals(got)  # seeded: the same numbers again
    with pytest.raises(al.StatisticsError, match=r"alpha=1\.5"):
        component_statistics(frame, ["layer"], "value", alpha=1.5)


def test_summary_of_a_per_prompt_patch_and_its_marked_heatmap():
    model = al.load("zoo:gpt2")
    from anylens.datasets import IOI_TEMPLATES, ioi_pairs

    pairs = ioi_pairs(model.tokenizer, 12, templates=IOI_TEMPLATES[:1])
    result = al.patch(
        model, pairs, pairs, role="resid_pre", over=("layer", "pos"), metric="logit_diff", per_prompt=True
    )
    summary = result.summary(seed=0)
    assert {"mean", "boot_low", "boot_high", "p_value", "p_adjusted", "significant"} <= set(summary.frame.columns)
    assert len(summary.frame) == len(result.frame) // len(pairs)
    row = summary.frame.iloc[0]
    one = result.frame[(result.frame.layer == row.layer) & (result.frame.pos == row.pos)][result.value]
    assert row["mean"] == pytest.approx(one.mean()) and row["count"] == len(pairs)
    figure = summary.plot(significant=True)
    stars = [t for t in figure.axes[0].texts if t.get_text() == "*"]
    assert len(stars) == int(summary.frame["significant"].sum())
    with pytest.raises(al.StatisticsError, match="per_prompt=True"):
        al.patch(model, pairs, pairs, role="resid_pre", over=("layer",), metric="logit_diff").summary()


def test_aggregate_keeps_key_dtypes_and_groups_without_values():
    """Nullable integer keys keep their dtype; a group whose values are all NaN stays, untested."""
    frame = pd.DataFrame(
        {
            "layer": [0, 0, 0, 0, 1, 1],
            "head": pd.array([1, 1, None, None, 2, 2], dtype="Int64"),
            "value": [1.0, 2.0, np.nan, np.nan, 3.0, 5.0],
        }
    )
    got = aggregate(frame)
    assert got["head"].dtype == "Int64" and len(got) == 3
    empty = got[got["head"].isna()].iloc[0]
    assert empty["count"] == 0 and np.isnan(empty["p_value"]) and not empty["significant"]
    assert got.loc[got["head"] == 2, "p_value"].item() == pytest.approx(0.5)  # two values: 2 of 4 flips
