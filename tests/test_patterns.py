"""Attention patterns and head scores against the Hugging Face model's own
``output_attentions=True`` (no module knowledge needed), and the error for attention-free models."""

from __future__ import annotations

import matplotlib
import pytest
import torch

import anylens as al
from anylens import MissingRoleError, PromptError
from anylens.testing import TINY_BUILDERS, tiny

matplotlib.use("Agg")

ATOL = 1e-5
PROMPT = "The capital of France is Paris"
PROMPTS = ["The cat sat on the mat", "When Mary and John went"]


@pytest.fixture(scope="module", params=list(TINY_BUILDERS))
def model(request: pytest.FixtureRequest) -> al.AnyModel:
    try:
        return tiny(request.param)
    except ImportError as error:  # a family whose package (and hardware) is optional
        pytest.skip(f"tiny {request.param!r} cannot be built here: {error}")


def needs_pattern(model: al.AnyModel) -> None:
    if "pattern" not in model.roles:
        pytest.skip(f"{model.adapter.name} has no role 'pattern'")


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


def test_head_scores_equal_a_hand_computation(model: al.AnyModel) -> None:
    needs_pattern(model)
    seq_len = 6
    scores = al.head_scores(model, seq_len=seq_len, seed=1, batch=2)
    tokens = torch.tensor(scores.meta["induction_tokens"])
    offset = tokens.shape[1] - 2 * seq_len
    assert torch.equal(tokens[:, offset : offset + seq_len], tokens[:, offset + seq_len :])
    special = set(model.tokenizer.all_special_ids)
    assert not special & set(tokens[:, offset:].flatten().tolist())
    attentions = hf_attentions(model, tokens)

    frame = scores.to_frame()
    assert set(frame["kind"]) == {"previous_token", "induction"}
    assert len(frame) == 2 * model.n_layers * model.n_heads
    for layer, pattern in enumerate(attentions):
        for head in range(model.n_heads):
            induction = [
                float(pattern[b, head, t, t - seq_len + 1])
                for b in range(tokens.shape[0])
                for t in range(offset + seq_len, offset + 2 * seq_len)
            ]
            previous = [float(pattern[b, head, t, t - 1]) for b in range(tokens.shape[0]) for t in range(1, tokens.shape[1])]
            row = frame[(frame["layer"] == layer) & (frame["head"] == head)].set_index("kind")["score"]
            assert row["induction"] == pytest.approx(sum(induction) / len(induction), abs=ATOL)
            assert row["previous_token"] == pytest.approx(sum(previous) / len(previous), abs=ATOL)


def test_previous_token_scores_on_padded_prompts(model: al.AnyModel) -> None:
    needs_pattern(model)
    scores = al.head_scores(model, prompts=PROMPTS, seq_len=4, batch=1)
    frame = scores.to_frame()
    frame = frame[frame["kind"] == "previous_token"]
    steps: dict[tuple[int, int], list[float]] = {}
    for prompt in PROMPTS:  # each prompt on its own: no padding in the reference
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        for layer, pattern in enumerate(hf_attentions(model, ids)):
            for head in range(model.n_heads):
                steps.setdefault((layer, head), []).extend(float(pattern[0, head, t, t - 1]) for t in range(1, ids.shape[1]))
    for (layer, head), values in steps.items():
        got = frame[(frame["layer"] == layer) & (frame["head"] == head)]["score"].item()
        assert got == pytest.approx(sum(values) / len(values), abs=ATOL)


def test_plots_frames_and_errors() -> None:
    model = tiny(next(iter(TINY_BUILDERS)))
    result = al.attention_patterns(model, PROMPT)
    assert {"model", "layer", "head", "query_pos", "key_pos", "value"} <= set(result.to_frame().columns)
    assert result.meta["tokens"] == model.to_str_tokens(PROMPT)
    figure = result.plot(layer=1)
    assert sum(ax.get_visible() and bool(ax.images) for ax in figure.axes) == model.n_heads
    scores = al.head_scores(model, seq_len=4, batch=1)
    assert scores.plot("previous_token").axes
    with pytest.raises(KeyError, match="kinds"):
        scores.plot("copying")
    with pytest.raises(KeyError, match="layers"):
        result.pattern(model.n_layers)
    with pytest.raises(PromptError, match="one prompt"):
        al.attention_patterns(model, PROMPTS)
