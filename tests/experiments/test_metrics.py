"""Metrics against hand arithmetic on logits chosen so that the answers are known."""

from __future__ import annotations

import math

import pytest
import torch
from families import ANY_FAMILY

import anylens as al
from anylens.experiments import metrics
from anylens.testing import tiny

PARIS, ROME, MARY = 300, 301, 299  # " Paris", " Rome", " Mary" in the tiny tokenizer
VOCAB = 400


@pytest.fixture(scope="module")
def model():
    return tiny(ANY_FAMILY)  # only its tokenizer matters here


def logits_with(last_rows: list[dict[int, float]], positions: int = 3) -> torch.Tensor:
    """Logits [batch, positions, vocab]: zeros, except the given entries at the last position.

    Earlier positions hold large junk values, so a metric reading the wrong position fails.
    """
    logits = torch.zeros(len(last_rows), positions, VOCAB)
    logits[:, :-1] = torch.randn(len(last_rows), positions - 1, VOCAB, generator=torch.Generator().manual_seed(0)) * 50
    for row, entries in enumerate(last_rows):
        for token, value in entries.items():
            logits[row, -1, token] = value
    return logits


def test_the_tokens_used_here_are_single_tokens(model):
    assert [model.token_id(w) for w in (" Paris", " Rome", " Mary")] == [PARIS, ROME, MARY]


def test_logit_diff(model):
    logits = logits_with([{PARIS: 2.5, ROME: -1.0}, {PARIS: 0.25, ROME: 4.0}])
    got = metrics.logit_diff(" Paris", " Rome")(logits, model)
    assert got.tolist() == pytest.approx([3.5, -3.75])
    # Token ids work as targets too, and [batch, vocab] logits are read as the last position.
    assert metrics.logit_diff(PARIS, ROME)(logits[:, -1], model).tolist() == pytest.approx([3.5, -3.75])


def test_prob_and_log_prob(model):
    # Every logit 0 but the target's, log(3): p = 3 / (399 + 3).
    logits = logits_with([{PARIS: math.log(3.0)}, {}])
    expected = [3 / 402, 1 / 400]
    assert metrics.prob(" Paris")(logits, model).tolist() == pytest.approx(expected, rel=1e-6)
    assert metrics.log_prob(" Paris")(logits, model).tolist() == pytest.approx(
        [math.log(p) for p in expected], rel=1e-6
    )


def test_rank(model):
    logits = logits_with([{PARIS: 5.0, ROME: 1.0}, {PARIS: 1.0, ROME: 2.0, MARY: 3.0}])
    assert metrics.rank(" Paris")(logits, model).tolist() == [0.0, 2.0]
    assert metrics.rank(" Rome")(logits, model).tolist() == [1.0, 1.0]
    assert metrics.rank(" Paris").higher_is_clean is False


def test_kl_against_the_clean_distribution(model):
    # Clean puts log(3) on Paris, the run puts log(3) on Rome; KL(clean || run) by hand:
    # p(Paris) = 3/402, q(Paris) = 1/402; p(Rome) = 1/402, q(Rome) = 3/402; other 398 tokens equal.
    clean = logits_with([{PARIS: math.log(3.0)}])
    run = logits_with([{ROME: math.log(3.0)}, {PARIS: math.log(3.0)}])
    expected = (3 / 402) * math.log(3) + (1 / 402) * math.log(1 / 3)
    got = metrics.kl()(run, model, clean_logits=clean)  # one clean row serves every run row
    assert got.tolist() == pytest.approx([expected, 0.0], abs=1e-7)
    with pytest.raises(ValueError, match="clean"):
        metrics.kl()(run, model)


@pytest.mark.parametrize(
    "metric",
    [metrics.logit_diff(" Paris", " Rome"), metrics.prob(" Paris"), metrics.log_prob(" Paris"), metrics.rank(" Paris")],
    ids=lambda m: m.name,
)
def test_metrics_that_say_they_ignore_the_clean_logits_do(model, metric):
    """Sweeps do not hand such metrics the clean logits; a metric that read them would break."""
    assert metric.reads_clean_logits is False
    run = logits_with([{PARIS: 1.5, ROME: 0.5}, {ROME: 2.0}])
    clean = logits_with([{PARIS: 9.0}, {MARY: 9.0}])
    assert torch.equal(metric(run, model), metric(run, model, clean_logits=clean))


def test_comparing_and_unknown_metrics_get_the_clean_logits(model):
    assert metrics.kl().reads_clean_logits is True
    assert metrics.Metric.reads_clean_logits is True  # a metric of one's own gets them unless it says not


def test_sweeps_hand_the_clean_logits_only_to_metrics_that_read_them(model):
    from anylens.engine import score_rows

    seen = []

    class Spy(metrics.Metric):
        def __call__(self, logits, model, clean_logits=None):
            seen.append(clean_logits)
            return logits[:, 0]

    class Blind(Spy):
        reads_clean_logits = False

    run, clean = torch.randn(3, VOCAB), torch.randn(2, VOCAB)
    rows = torch.tensor([1, 0, 1])
    score_rows(Spy(), model, run, rows, 2, clean)
    score_rows(Blind(), model, run, rows, 2, clean)
    assert torch.equal(seen[0], clean[rows]) and seen[1] is None


def test_normalized():
    patched = torch.tensor([0.0, 1.0, 2.0, 0.5])
    clean, corrupt = torch.tensor(2.0), torch.tensor(0.0)
    assert metrics.normalized(patched, clean, corrupt).tolist() == [0.0, 0.5, 1.0, 0.25]
    # A metric that falls when the clean behaviour returns (a KL, a rank) normalises the same way.
    assert metrics.normalized(torch.tensor([3.0, 1.0]), torch.tensor(1.0), torch.tensor(3.0)).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="same metric value"):
        metrics.normalized(patched, torch.tensor(1.0), torch.tensor(1.0))


def test_target_of_several_tokens_shows_how_it_splits(model):
    logits = logits_with([{}])
    pieces = [model.tokenizer.decode([i]) for i in model.tokenizer("Paris", add_special_tokens=False)["input_ids"]]
    assert len(pieces) > 1
    with pytest.raises(al.TokenizationError) as error:
        metrics.logit_diff("Paris", " Rome")(logits, model)
    message = str(error.value)
    assert str(pieces) in message
    assert "'Paris'" in message and f"{len(pieces)} tokens" in message


def test_targets_per_prompt(model):
    logits = logits_with([{PARIS: 2.0, ROME: 1.0}, {PARIS: 1.0, ROME: 5.0, MARY: -2.0}])
    metric = metrics.logit_diff([" Paris", " Rome"], [" Rome", " Mary"])
    assert metric(logits, model).tolist() == pytest.approx([1.0, 7.0])
    assert metrics.prob([" Paris", PARIS])(logits, model).shape == (2,)
    with pytest.raises(al.PromptError, match="3 targets for 2 prompts"):
        metrics.logit_diff([" Paris", " Rome", " Mary"], " Rome")(logits, model)
