"""al.logit_lens against the model's own logits and against the lens computed by hand with the
Hugging Face modules (layer output hook -> final norm -> lm_head -> soft-cap)."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from families import ANY_FAMILY

import anylens as al
from anylens import PromptError, TokenizationError
from anylens.testing import tiny

matplotlib.use("Agg")

ATOL = 1e-5
PROMPT = "The capital of France is"
TARGETS = [" Paris", " Rome", 7]  # words (single tokens) and a raw token id

#: class -> (block list, final norm, unembedding, config attribute of a final-logit soft-cap)
REFERENCE: dict[str, tuple[str, str, str, str | None]] = {
    "GPT2LMHeadModel": ("transformer.h", "transformer.ln_f", "lm_head", None),
    "LlamaForCausalLM": ("model.layers", "model.norm", "lm_head", None),
    "MistralForCausalLM": ("model.layers", "model.norm", "lm_head", None),
    "Qwen2ForCausalLM": ("model.layers", "model.norm", "lm_head", None),
    "GemmaForCausalLM": ("model.layers", "model.norm", "lm_head", None),
    "Gemma2ForCausalLM": ("model.layers", "model.norm", "lm_head", "final_logit_softcapping"),
    "Phi3ForCausalLM": ("model.layers", "model.norm", "lm_head", None),
    "GPTNeoXForCausalLM": ("gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head", None),
    "GPTJForCausalLM": ("transformer.h", "transformer.ln_f", "lm_head", None),
    "OPTForCausalLM": ("model.decoder.layers", "model.decoder.final_layer_norm", "lm_head", None),
    "MambaForCausalLM": ("backbone.layers", "backbone.norm_f", "lm_head", None),
    "Mamba2ForCausalLM": ("backbone.layers", "backbone.norm_f", "lm_head", None),
}


@pytest.fixture(scope="module")
def model(family: str) -> al.AnyModel:
    try:
        return tiny(family)
    except ImportError as error:  # a family whose package (and hardware) is optional
        pytest.skip(f"tiny {family!r} cannot be built here: {error}")


def reference_of(hf: torch.nn.Module) -> tuple[str, str, str, str | None]:
    name = type(hf).__name__
    if name not in REFERENCE:
        pytest.fail(
            f"tests/experiments/test_logit_lens.py has no reference module paths for {name}: add it to REFERENCE"
        )
    return REFERENCE[name]


def prompt_ids(model: al.AnyModel) -> torch.Tensor:
    return model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]


def lens_by_hand(hf: torch.nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """log-probs ``[pos, vocab]`` of layer's output read through the final norm and lm_head."""
    layers, norm, unembed, cap_name = reference_of(hf)
    seen = {}

    def hook(module, args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output

    handle = hf.get_submodule(layers)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            hf(input_ids=ids)
            logits = hf.get_submodule(unembed)(hf.get_submodule(norm)(seen["h"]))[0]
    finally:
        handle.remove()
    cap = getattr(hf.config, cap_name, None) if cap_name else None
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.float().log_softmax(-1)


def assert_layer_matches(result: al.Result, layer: int, log_probs: torch.Tensor, model: al.AnyModel) -> None:
    frame = result.to_frame()
    rows = frame[frame["layer"] == layer]
    assert len(rows) == log_probs.shape[0] * len(TARGETS)
    for target in TARGETS:
        target_id = model.token_id(target)
        per_target = rows[rows["target_id"] == target_id].sort_values("pos")
        want = log_probs[:, target_id]
        torch.testing.assert_close(torch.tensor(per_target["log_prob"].to_numpy()), want, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(per_target["prob"].to_numpy()), want.exp(), atol=ATOL, rtol=0)
        rank = (log_probs > want[:, None]).sum(-1)
        assert per_target["rank"].tolist() == rank.tolist()
    top = result.top_k()
    top = top[top["layer"] == layer].sort_values(["pos", "rank"])
    want_lp, want_ids = log_probs.topk(5, dim=-1)
    torch.testing.assert_close(
        torch.tensor(top["log_prob"].to_numpy()).reshape(want_lp.shape), want_lp, atol=ATOL, rtol=0
    )
    # Ties aside, the same tokens in the same order.
    assert (torch.tensor(top["top_id"].to_numpy()).reshape(want_ids.shape) == want_ids).float().mean() > 0.95


def test_last_layer_equals_the_models_logits(model: al.AnyModel) -> None:
    ids = prompt_ids(model)
    with torch.no_grad():
        log_probs = model.hf(input_ids=ids).logits[0].float().log_softmax(-1)
    result = al.logit_lens(model, PROMPT, metric=TARGETS, k=5)
    assert_layer_matches(result, model.n_layers - 1, log_probs, model)


def test_a_middle_layer_equals_the_lens_by_hand(model: al.AnyModel) -> None:
    layer = model.n_layers // 2
    assert 0 < layer < model.n_layers - 1 or model.n_layers < 3
    result = al.logit_lens(model, PROMPT, metric=TARGETS, k=5)
    assert_layer_matches(result, layer, lens_by_hand(model.hf, prompt_ids(model), layer), model)


def test_result_frames_plot_and_persistence(tmp_path) -> None:
    model = tiny(ANY_FAMILY)
    n_pos = prompt_ids(model).shape[1]
    result = al.logit_lens(model, PROMPT, metric=[" Paris", " Rome"], k=3, positions=[-2, -1])
    frame = result.to_frame()
    assert {"model", "layer", "pos", "token", "target", "prob", "log_prob", "rank", "top_token", "value"} <= set(
        frame.columns
    )
    assert sorted(frame["pos"].unique()) == [n_pos - 2, n_pos - 1]
    assert len(frame) == model.n_layers * 2 * 2
    assert (frame["token"][frame["pos"] == n_pos - 1] == " is").all()
    assert len(result.top_k()) == model.n_layers * 2 * 3
    assert result.meta["tokens"] == model.to_str_tokens(prompt_ids(model)[0])

    assert result.plot(target=" Rome").axes
    with pytest.raises(KeyError, match="targets"):
        result.plot(target=" Mary")
    loaded = type(result).load(result.save(tmp_path / "lens.json"))
    assert loaded.top_k().shape == result.top_k().shape and loaded.to_frame().shape == frame.shape

    plain = al.logit_lens(model, PROMPT)
    plain_frame = plain.to_frame()
    assert "target" not in plain_frame.columns
    assert (plain_frame["value"] == plain_frame["top_prob"]).all()
    assert plain.plot().axes

    with pytest.raises(TokenizationError, match="not one"):
        al.logit_lens(model, PROMPT, metric=["capital of"])
    with pytest.raises(PromptError, match="one prompt"):
        al.logit_lens(model, [PROMPT, "The cat"])
