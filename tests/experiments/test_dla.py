"""Direct logit attribution against hand computations with the Hugging Face modules.

The reference freezes the final norm's scale by its textbook formula (std for LayerNorm, rms for
RMSNorm, ``1 + w`` gains for Gemma), per family from the table below, while anylens measures it
from the module without knowing its kind; agreement checks both the linearisation and the
component bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib
import pytest
import torch
from families import ANY_FAMILY, has_head_decomposition

import anylens as al
from anylens.testing import tiny

matplotlib.use("Agg")

ATOL = 1e-5
PROMPTS = ["The capital of France is", "The cat sat on the"]


@dataclass(frozen=True)
class Reference:
    layers: str
    final_norm: str
    norm: str  # "layer" | "rms" | "rms_1p" (gain is 1 + weight)
    writer: str  # relative to a block: the MLP (or mixer) whose output joins the residual
    writer_label: str  # its row in the attribution: "mlp" or "mixer"
    out_proj: str | None = None  # relative to a block; its input is z
    softcap: str | None = None  # config attribute of the final-logit soft-cap


_LLAMA_LIKE = Reference("model.layers", "model.norm", "rms", "mlp", "mlp", "self_attn.o_proj")
_MAMBA_LIKE = Reference("backbone.layers", "backbone.norm_f", "rms", "mixer", "mixer")
REFERENCE: dict[str, Reference] = {
    "GPT2LMHeadModel": Reference("transformer.h", "transformer.ln_f", "layer", "mlp", "mlp", "attn.c_proj"),
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Phi3ForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": Reference("model.layers", "model.norm", "rms_1p", "mlp", "mlp", "self_attn.o_proj"),
    "Gemma2ForCausalLM": Reference(
        "model.layers",
        "model.norm",
        "rms_1p",
        "post_feedforward_layernorm",
        "mlp",
        "self_attn.o_proj",
        softcap="final_logit_softcapping",
    ),
    "GPTNeoXForCausalLM": Reference(
        "gpt_neox.layers", "gpt_neox.final_layer_norm", "layer", "mlp", "mlp", "attention.dense"
    ),
    "GPTJForCausalLM": Reference("transformer.h", "transformer.ln_f", "layer", "mlp", "mlp", "attn.out_proj"),
    "OPTForCausalLM": Reference(
        "model.decoder.layers", "model.decoder.final_layer_norm", "layer", "fc2", "mlp", "self_attn.out_proj"
    ),
    "MambaForCausalLM": _MAMBA_LIKE,
    "Mamba2ForCausalLM": _MAMBA_LIKE,
}


@pytest.fixture(scope="module")
def model(family: str) -> al.AnyModel:
    try:
        return tiny(family)
    except ImportError as error:  # a family whose package (and hardware) is optional
        pytest.skip(f"tiny {family!r} cannot be built here: {error}")


def reference_of(hf: torch.nn.Module) -> Reference:
    name = type(hf).__name__
    if name not in REFERENCE:
        pytest.fail(f"tests/experiments/test_dla.py has no reference for {name}: add it to REFERENCE")
    return REFERENCE[name]


def run_by_hand(model: al.AnyModel, prompt: str, layer: int) -> dict[str, torch.Tensor]:
    """One unpadded prompt: last-position values read with plain hooks, and the logits; the
    writer and z are those of ``layer``."""
    hf, ref = model.hf, reference_of(model.hf)
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    block = hf.get_submodule(ref.layers)[layer]
    last_block = hf.get_submodule(ref.layers)[-1]
    seen: dict[str, torch.Tensor] = {}

    def keep(name, from_input=False):
        def hook(module, args, output=None):
            value = args[0] if from_input else output
            value = value[0] if isinstance(value, tuple) else value
            seen[name] = value.reshape(ids.shape[1], -1)[-1].detach().clone()  # [features] at the last token

        return hook

    handles = [
        last_block.register_forward_hook(keep("resid")),
        block.get_submodule(ref.writer).register_forward_hook(keep("writer")),
    ]
    if ref.out_proj:
        handles.append(block.get_submodule(ref.out_proj).register_forward_pre_hook(keep("z", from_input=True)))
    try:
        with torch.no_grad():
            seen["logits"] = hf(input_ids=ids).logits[0, -1].float()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def frozen_norm_by_hand(model: al.AnyModel, resid: torch.Tensor):
    """(linear map with the real scale frozen, bias) of the final norm, by its textbook formula."""
    ref = reference_of(model.hf)
    norm = model.hf.get_submodule(ref.final_norm)
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    weight = norm.weight.detach().float()
    if ref.norm == "layer":
        scale = torch.sqrt(resid.var(unbiased=False) + eps)
        bias = norm.bias.detach().float() if norm.bias is not None else torch.zeros_like(weight)
        return (lambda v: (v - v.mean()) * weight / scale), bias
    gain = 1 + weight if ref.norm == "rms_1p" else weight
    scale = torch.sqrt(resid.pow(2).mean() + eps)
    return (lambda v: v * gain / scale), torch.zeros_like(weight)


def unembedding(model: al.AnyModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.hf.get_output_embeddings()
    return head.weight.detach().float(), None if head.bias is None else head.bias.detach().float()


def answer_ids(model: al.AnyModel) -> tuple[int, int]:
    vocab = model.tokenizer.get_vocab()
    return vocab["ĠParis"], vocab["ĠRome"]  # byte-level BPE spells a leading space as Ġ


def pre_cap_logits(model: al.AnyModel, resid: torch.Tensor) -> torch.Tensor:
    norm = model.hf.get_submodule(reference_of(model.hf).final_norm)
    W_U, b_U = unembedding(model)
    with torch.no_grad():
        logits = norm(resid[None, None])[0, 0].float() @ W_U.T
    return logits + b_U if b_U is not None else logits


@pytest.fixture(scope="module")
def hand(model: al.AnyModel) -> list[dict[str, torch.Tensor]]:
    """The hook reference of each prompt on its own, at the last layer."""
    return [run_by_hand(model, prompt, model.n_layers - 1) for prompt in PROMPTS]


@pytest.fixture(scope="module")
def attribution(model: al.AnyModel) -> al.Result:
    """Per-head attribution of logit(Paris) - logit(Rome) on the two prompts (left-padded batch)."""
    return al.direct_logit_attribution(model, PROMPTS, metric=al.metrics.logit_diff(" Paris", " Rome"), per_head=True)


def values_of(result: al.Result, prompt: int) -> dict[str, float]:
    frame = result.to_frame()
    frame = frame[frame["prompt"] == prompt]
    return dict(zip(frame["component"], frame["value"]))


# -- the sum ----------------------------------------------------------------------------------
def test_contributions_sum_to_the_real_logit_difference(model: al.AnyModel, hand: list, attribution: al.Result) -> None:
    paris, rome = answer_ids(model)
    cap = getattr(model.hf.config, reference_of(model.hf).softcap or "", None)
    by_hand, real = [], []
    for seen in hand:
        logits = pre_cap_logits(model, seen["resid"])
        by_hand.append(float(logits[paris] - logits[rome]))
        real.append(float(seen["logits"][paris] - seen["logits"][rome]))
    if not cap:  # without a soft-cap the model's own logits are the pre-cap logits
        assert by_hand == pytest.approx(real, abs=ATOL)
    whole_layers = al.direct_logit_attribution(model, PROMPTS, metric=(" Paris", " Rome"), per_head=False)
    for result in (attribution, whole_layers):
        sums = result.to_frame().groupby("prompt")["value"].sum()
        assert sums.tolist() == pytest.approx(by_hand, abs=ATOL)
        assert result.meta["logit_diff"] == pytest.approx(by_hand, abs=ATOL)
        assert result.meta["model_logit_diff"] == pytest.approx(real, abs=ATOL)
    # Whole layers are the sums of their heads (and the attention biases).
    heads, layers = values_of(attribution, 0), values_of(whole_layers, 0)
    if "attn bias" in heads:
        attention = sum(v for k, v in heads.items() if k.startswith("head ") or k == "attn bias")
        assert attention == pytest.approx(sum(v for k, v in layers.items() if k.startswith("attn ")), abs=ATOL)


def test_a_single_target_attributes_its_logit(model: al.AnyModel, hand: list) -> None:
    paris, _ = answer_ids(model)
    result = al.direct_logit_attribution(model, PROMPTS[0], metric=" Paris")
    assert result.to_frame()["value"].sum() == pytest.approx(
        float(pre_cap_logits(model, hand[0]["resid"])[paris]), abs=ATOL
    )


# -- single components by hand ----------------------------------------------------------------
def test_the_bias_row_and_a_layer_component_equal_hand_computations(
    model: al.AnyModel, hand: list, attribution: al.Result
) -> None:
    ref = reference_of(model.hf)
    layer = model.n_layers - 1
    paris, rome = answer_ids(model)
    W_U, b_U = unembedding(model)
    direction = W_U[paris] - W_U[rome]
    seen = hand[0]
    linear, bias = frozen_norm_by_hand(model, seen["resid"])
    values = values_of(attribution, 0)

    want = float(linear(seen["writer"].float()) @ direction)
    assert values[f"{ref.writer_label} {layer}"] == pytest.approx(want, abs=ATOL)
    bias_by_hand = bias @ direction + (b_U[paris] - b_U[rome] if b_U is not None else 0.0)
    assert values["bias"] == pytest.approx(float(bias_by_hand), abs=ATOL)


@pytest.mark.needs_roles(where=has_head_decomposition)
def test_one_head_equals_a_hand_computation(model: al.AnyModel, hand: list, attribution: al.Result) -> None:
    ref = reference_of(model.hf)
    layer, head = model.n_layers - 1, 1
    paris, rome = answer_ids(model)
    W_U, _ = unembedding(model)
    seen = hand[0]
    out_proj = model.hf.get_submodule(ref.layers)[layer].get_submodule(ref.out_proj)
    weight = out_proj.weight if type(out_proj).__name__ == "Conv1D" else out_proj.weight.T  # [in, out]
    d_head = seen["z"].shape[-1] // model.n_heads
    rows = slice(head * d_head, (head + 1) * d_head)
    head_out = seen["z"][rows] @ weight[rows].detach()
    linear, _ = frozen_norm_by_hand(model, seen["resid"])
    want = float(linear(head_out.float()) @ (W_U[paris] - W_U[rome]))

    assert values_of(attribution, 0)[f"head {layer}.{head}"] == pytest.approx(want, abs=ATOL)
    assert attribution.heads().shape == (model.n_layers, model.n_heads)


# -- interface ----------------------------------------------------------------------------------
def test_frame_plot_and_errors() -> None:
    model = tiny(ANY_FAMILY)
    result = al.direct_logit_attribution(model, PROMPTS[0], metric=(" Paris", " Rome"), per_head=False)
    frame = result.to_frame()
    assert {"model", "prompt", "component", "kind", "layer", "head", "value"} <= set(frame.columns)
    assert frame["component"].iloc[0] == "embed" and frame["component"].iloc[-1] == "bias"
    assert frame.loc[frame["component"] == "mlp 0", "layer"].item() == 0
    assert result.plot().axes
    with pytest.raises(TypeError, match="linear"):
        al.direct_logit_attribution(model, PROMPTS[0], metric=al.metrics.prob(" Paris"))
    with pytest.raises(TypeError, match="pair"):
        al.direct_logit_attribution(model, PROMPTS[0], metric=[" Paris", " Rome", " Mary"])


# -- the linearisation on its own: textbook norms of odd and even widths --------------------------
class OnePlusRMSNorm(torch.nn.Module):
    """Gemma's RMSNorm: the stored weight is an offset from a gain of 1."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


@pytest.mark.parametrize("width", [7, 8])
@pytest.mark.parametrize("kind", ["layer", "rms", "rms_1p", "identity"])
def test_freeze_final_norm_recovers_textbook_norms(kind: str, width: int) -> None:
    from types import SimpleNamespace

    from anylens.experiments.dla import freeze_final_norm

    torch.manual_seed(0)
    norm = {
        "layer": lambda: torch.nn.LayerNorm(width),
        "rms": lambda: torch.nn.RMSNorm(width, eps=1e-6),
        "rms_1p": lambda: OnePlusRMSNorm(width),
        "identity": lambda: torch.nn.Identity(),
    }[kind]()
    for parameter in norm.parameters():
        parameter.data.add_(torch.randn_like(parameter) * 0.3)
    x = torch.randn(2, 3, width) * 3 + 1
    frozen = freeze_final_norm(SimpleNamespace(apply_final_norm=norm, name=kind), x)
    assert frozen.centre == (kind == "layer")
    with torch.no_grad():
        if kind == "layer":
            torch.testing.assert_close(frozen.scale, torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps))
            torch.testing.assert_close(frozen.gain, norm.weight.detach(), atol=1e-5, rtol=0)
            torch.testing.assert_close(frozen.bias, norm.bias.detach())
        elif kind != "identity":
            gain = norm.weight.detach() + (1 if kind == "rms_1p" else 0)
            torch.testing.assert_close(frozen.scale, torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
            torch.testing.assert_close(frozen.gain, gain, atol=1e-5, rtol=0)
        # Linear in its argument, and exact at the real input.
        a, b = torch.randn(2, 3, width), torch.randn(2, 3, width)
        torch.testing.assert_close(frozen.linear(a + b), frozen.linear(a) + frozen.linear(b))
        torch.testing.assert_close(frozen.linear(x) + frozen.bias, norm(x), atol=1e-5, rtol=0)


def test_freeze_final_norm_refuses_a_norm_of_another_form() -> None:
    from types import SimpleNamespace

    from anylens.experiments.dla import LinearisationError, freeze_final_norm

    with pytest.raises(LinearisationError, match="one scale per position"):
        freeze_final_norm(SimpleNamespace(apply_final_norm=torch.tanh, name="tanh"), torch.randn(1, 2, 8) * 3)
