"""Attention patterns and head scores against the Hugging Face model's own
``output_attentions=True`` (no module knowledge needed), and the error for attention-free models."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from families import ANY_FAMILY

import anylens as al
from anylens import MissingRoleError, PromptError
from anylens.testing import tiny

matplotlib.use("Agg")

ATOL = 1e-5
PROMPT = "The capital of France is Paris"
PROMPTS = ["The cat sat on the mat", "When Mary and John went"]


@pytest.fixture(scope="module")
def model(family: str) -> al.AnyModel:
    try:
        return tiny(family)
    except ImportError as error:  # a family whose package (and hardware) is optional
        pytest.skip(f"tiny {family!r} cannot be built here: {error}")


def hf_attentions(model: al.AnyModel, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [a.float() for a in model.hf(input_ids=ids, output_attentions=True).attentions]


def test_patterns_equal_output_attentions_or_raise_missing_role(model: al.AnyModel) -> None:
    if "pattern" not in model.roles:  # attention-free (Mamba): the model's own error, naming its roles
        with pytest.raises(MissingRoleError, match="provides"):
            al.attention_patterns(model, PROMPT)
        with pytest.raises(MissingRoleError, match="provides"):
            al.head_scores(model)
        return
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    n_pos = ids.shape[1]
    reference = hf_attentions(model, ids)
    result = al.attention_patterns(model, PROMPT)
    frame = result.to_frame()
    assert len(frame) == model.n_layers * model.n_heads * n_pos * n_pos
    for layer in range(model.n_layers):
        got = torch.tensor(result.pattern(layer), dtype=torch.float32)
        torch.testing.assert_close(got, reference[layer][0], atol=ATOL, rtol=0)
    some = al.attention_patterns(model, PROMPT, layers=[-1])
    assert set(some.to_frame()["layer"]) == {model.n_layers - 1}


def previous_token_by_hand(model: al.AnyModel, sequences: list[torch.Tensor]) -> dict[tuple[int, int], float]:
    """Mean attention from t to t - 1 over unpadded sequences, from ``output_attentions``."""
    steps: dict[tuple[int, int], list[float]] = {}
    for ids in sequences:
        for layer, pattern in enumerate(hf_attentions(model, ids[None])):
            for head in range(model.n_heads):
                steps.setdefault((layer, head), []).extend(
                    float(pattern[0, head, t, t - 1]) for t in range(1, len(ids))
                )
    return {key: sum(values) / len(values) for key, values in steps.items()}


@pytest.mark.needs_roles("pattern")
def test_head_scores_equal_a_hand_computation(model: al.AnyModel) -> None:
    seq_len = 6
    scores = al.head_scores(model, prompts=PROMPTS, seq_len=seq_len, seed=1, n_sequences=2)
    frame = scores.to_frame()
    assert set(frame["kind"]) == {"previous_token", "induction"}
    assert len(frame) == 2 * model.n_layers * model.n_heads
    score = frame.set_index(["kind", "layer", "head"])["score"]

    # Induction: random tokens (no special ones) repeated, after an optional BOS.
    tokens = torch.tensor(scores.meta["induction_tokens"])
    offset = tokens.shape[1] - 2 * seq_len
    assert torch.equal(tokens[:, offset : offset + seq_len], tokens[:, offset + seq_len :])
    assert not set(model.tokenizer.all_special_ids) & set(tokens[:, offset:].flatten().tolist())
    for layer, pattern in enumerate(hf_attentions(model, tokens)):
        for head in range(model.n_heads):
            induction = [
                float(pattern[b, head, t, t - seq_len + 1])
                for b in range(tokens.shape[0])
                for t in range(offset + seq_len, offset + 2 * seq_len)
            ]
            assert score["induction", layer, head] == pytest.approx(sum(induction) / len(induction), abs=ATOL)

    # Previous-token on the prompts: the batch is left-padded, the reference runs each on its own.
    prompts = [model.tokenizer(p, return_tensors="pt")["input_ids"][0] for p in PROMPTS]
    assert len(prompts[0]) != len(prompts[1])
    for (layer, head), want in previous_token_by_hand(model, prompts).items():
        assert score["previous_token", layer, head] == pytest.approx(want, abs=ATOL)


@pytest.mark.needs_roles("pattern")
def test_head_scores_on_given_sequences(model: al.AnyModel) -> None:
    given = torch.tensor([[5, 9, 13, 17, 21], [6, 10, 14, 18, 22]])
    scores = al.head_scores(model, sequences=given)
    tokens = torch.tensor(scores.meta["induction_tokens"])
    offset = tokens.shape[1] - 2 * given.shape[1]
    assert torch.equal(tokens[:, offset:], torch.cat([given, given], dim=1))
    score = scores.to_frame().set_index(["kind", "layer", "head"])["score"]
    seq_len = given.shape[1]
    for layer, pattern in enumerate(hf_attentions(model, tokens)):
        for head in range(model.n_heads):
            want = pattern[:, head, offset + seq_len :, :].diagonal(offset=offset + 1, dim1=-2, dim2=-1).mean()
            assert score["induction", layer, head] == pytest.approx(float(want), abs=ATOL)
    with pytest.raises(PromptError, match="same number of tokens"):
        al.head_scores(model, sequences=[PROMPT, PROMPT + PROMPT])


def test_plots_frames_and_errors() -> None:
    model = tiny(ANY_FAMILY)
    result = al.attention_patterns(model, PROMPT)
    assert {"model", "layer", "head", "query_pos", "key_pos", "value"} <= set(result.to_frame().columns)
    assert result.meta["tokens"] == model.to_str_tokens(PROMPT)
    figure = result.plot(layer=1)
    assert sum(ax.get_visible() and bool(ax.images) for ax in figure.axes) == model.n_heads
    scores = al.head_scores(model, seq_len=4, n_sequences=1)
    # Without prompts, previous-token scores come from the random repeated sequences.
    tokens = torch.tensor(scores.meta["induction_tokens"])
    score = scores.to_frame().set_index(["kind", "layer", "head"])["score"]
    for (layer, head), want in previous_token_by_hand(model, list(tokens)).items():
        assert score["previous_token", layer, head] == pytest.approx(want, abs=ATOL)
    assert scores.plot("previous_token").axes
    with pytest.raises(KeyError, match="kinds"):
        scores.plot("copying")
    with pytest.raises(KeyError, match="layers"):
        result.pattern(model.n_layers)
    with pytest.raises(PromptError, match="one prompt"):
        al.attention_patterns(model, PROMPTS)
