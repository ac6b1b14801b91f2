"""``al.attribute(..., verify=k)``: exact patching of the top-k components, the correlation it
reports against a separate ``al.patch`` call, and the warning where the linear estimate fails."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from tiny_models import random_prompt_pairs

import anylens as al
from anylens.datasets import IOI_TEMPLATES, ioi_pairs

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(float)  # no ties among these values


def zoo_ioi():
    model = al.load("zoo:gpt2")
    pairs = ioi_pairs(model.tokenizer, 8, templates=IOI_TEMPLATES[:1])
    return model, pairs, pairs, "logit_diff", "z", ("layer", "head")


def tiny_two_token_answer():
    clean, corrupt = random_prompt_pairs(different=(1, 2))
    return al.load("tiny:llama"), clean, corrupt, al.metrics.log_prob(" Paris Rome"), "resid_pre", ("layer", "pos")


@pytest.mark.parametrize("case", [zoo_ioi, tiny_two_token_answer])
def test_verify_reports_the_correlation_with_a_separate_patch(case):
    model, clean, corrupt, metric, role, over = case()
    k = 6
    with warnings.catch_warnings():
        warnings.simplefilter("error", al.LinearityWarning)  # a linear case: no warning
        estimate = al.attribute(model, clean, corrupt, role=role, over=over, metric=metric, verify=k)
    exact = al.patch(model, clean, corrupt, role=role, over=over, metric=metric)
    keys = list(over)
    top = estimate.frame.reindex(estimate.frame["estimate"].abs().sort_values(ascending=False).index).head(k)
    matched = top[keys + ["metric"]].merge(exact.frame[keys + ["metric"]], on=keys, suffixes=("_estimated", "_exact"))
    assert len(matched) == k
    guess, truth = matched["metric_estimated"].to_numpy(), matched["metric_exact"].to_numpy()
    report = estimate.meta["verify"]
    assert report["k"] == k and report["threshold"] == 0.5
    assert [{d: c[d] for d in keys} for c in report["components"]] == top[keys].astype(int).to_dict("records")
    np.testing.assert_allclose(report["exact"], truth, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(report["estimated"], guess, atol=1e-5, rtol=1e-5)
    # The frame holds float32 values; the report correlates the float64 means: agreement to 1e-5.
    assert report["pearson"] == pytest.approx(np.corrcoef(guess, truth)[0, 1], abs=1e-5)
    assert report["spearman"] == pytest.approx(np.corrcoef(ranks(guess), ranks(truth))[0, 1], abs=1e-9)
    assert report["pearson"] > 0.5


@dataclass(frozen=True)
class Squared(al.metrics.Metric):
    """The square of a logit difference: it falls and rises again as a patch moves the difference
    through zero, so the gradient at the corrupt run points the wrong way for large patches."""

    inner: Any = None
    name = "squared"
    reads_clean_logits = False

    def __call__(self, logits, model, clean_logits=None):
        return self.inner(logits, model) ** 2


def test_verify_warns_where_the_linear_estimate_fails():
    model = al.load("zoo:gpt2")
    metric = Squared(al.metrics.logit_diff(" Mary", " John"))
    with pytest.warns(al.LinearityWarning, match=r"Pearson r is -?\d\.\d\d, under 0\.5.*al\.patch") as caught:
        result = al.attribute(model, CLEAN, CORRUPT, role="resid_pre", over=("layer", "pos"), metric=metric, verify=10)
    assert result.meta["verify"]["pearson"] < 0.5
    assert caught[0].filename == __file__  # the warning points at the caller
