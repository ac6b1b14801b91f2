"""al.cache against an independent reference: plain torch hooks on the Hugging Face modules.

The reference runs each prompt on its own (no padding); the cache runs them as one left-padded
batch, so agreement at every real position also checks the padding convention. The per-family
module knowledge of the reference is the table below; it never consults an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from families import ANY_FAMILY, has_head_decomposition

import anylens as al
from anylens import MissingRoleError
from anylens.core.roles import ALL_ROLES
from anylens.experiments.extraction import ActivationCache
from anylens.testing import tiny

ATOL = 1e-5
PROMPTS = ["The cat sat on the mat", "The capital of France is Paris and the"]  # different lengths


@dataclass(frozen=True)
class Modules:
    """Module paths: model-level ones from the root, the others relative to a block."""

    layers: str
    embed: str
    final_norm: str
    pos_embed: str | None = None
    attn: str | None = None  # its (first) output is what attention adds to the residual
    mlp: str | None = None  # its output is what the MLP adds
    mixer: str | None = None  # its output is what an SSM mixer adds
    out_proj: str | None = None  # its input is z, [batch, pos, heads * d_head]


_LLAMA_LIKE = Modules(
    "model.layers", "model.embed_tokens", "model.norm", attn="self_attn", mlp="mlp", out_proj="self_attn.o_proj"
)
_MAMBA_LIKE = Modules("backbone.layers", "backbone.embeddings", "backbone.norm_f", mixer="mixer")
REFERENCE: dict[str, Modules] = {
    "GPT2LMHeadModel": Modules(
        "transformer.h", "transformer.wte", "transformer.ln_f", "transformer.wpe", "attn", "mlp", out_proj="attn.c_proj"
    ),
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Phi3ForCausalLM": _LLAMA_LIKE,
    # Gemma 2 norms each sublayer's output before adding it.
    "Gemma2ForCausalLM": Modules(
        "model.layers",
        "model.embed_tokens",
        "model.norm",
        attn="post_attention_layernorm",
        mlp="post_feedforward_layernorm",
        out_proj="self_attn.o_proj",
    ),
    "GPTNeoXForCausalLM": Modules(
        "gpt_neox.layers",
        "gpt_neox.embed_in",
        "gpt_neox.final_layer_norm",
        attn="attention",
        mlp="mlp",
        out_proj="attention.dense",
    ),
    "GPTJForCausalLM": Modules(
        "transformer.h", "transformer.wte", "transformer.ln_f", attn="attn", mlp="mlp", out_proj="attn.out_proj"
    ),
    # OPT has no MLP module: fc2's output (flattened over tokens) is what the MLP adds.
    "OPTForCausalLM": Modules(
        "model.decoder.layers",
        "model.decoder.embed_tokens",
        "model.decoder.final_layer_norm",
        "model.decoder.embed_positions",
        "self_attn",
        "fc2",
        out_proj="self_attn.out_proj",
    ),
    "MambaForCausalLM": _MAMBA_LIKE,
    "Mamba2ForCausalLM": _MAMBA_LIKE,
}


def build(family: str) -> al.AnyModel:
    try:
        return tiny(family)
    except ImportError as error:  # a family whose package (and hardware) is optional
        pytest.skip(f"tiny {family!r} cannot be built here: {error}")


@pytest.fixture(scope="module")
def model(family: str) -> al.AnyModel:
    return build(family)


def modules_of(hf: torch.nn.Module) -> Modules:
    name = type(hf).__name__
    if name not in REFERENCE:
        pytest.fail(
            f"tests/experiments/test_extraction.py has no reference module paths for {name}: add it to REFERENCE"
        )
    return REFERENCE[name]


def _tensor(value: object, n_pos: int) -> torch.Tensor:
    tensor = value[0] if isinstance(value, tuple) else value
    return tensor.unsqueeze(0) if tensor.dim() == 2 and tensor.shape[0] == n_pos else tensor  # token-flattened


def reference_run(hf: torch.nn.Module, ids: torch.Tensor) -> dict[tuple[str, int | None], torch.Tensor]:
    """One unpadded prompt ``[1, pos]`` through the plain model, read with forward hooks."""
    paths = modules_of(hf)
    n_pos = ids.shape[1]
    seen: dict[tuple[str, int | None], torch.Tensor] = {}
    handles = []

    def output_hook(key):
        def hook(module, args, output):
            seen[key] = _tensor(output, n_pos).detach().clone()

        return hook

    def input_hook(key):
        def hook(module, args, kwargs):
            value = args[0] if args else kwargs["hidden_states"]
            seen[key] = _tensor(value, n_pos).detach().clone()

        return hook

    def on(path: str, key, hook_input: bool = False):
        module = hf.get_submodule(path)
        if hook_input:
            handles.append(module.register_forward_pre_hook(input_hook(key), with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(output_hook(key)))

    on(paths.embed, ("embed", None))
    on(paths.final_norm, ("final_norm", None))
    if paths.pos_embed:
        on(paths.pos_embed, ("pos_embed", None))
    for i in range(len(hf.get_submodule(paths.layers))):
        block = f"{paths.layers}.{i}"
        on(block, ("resid_pre", i), hook_input=True)
        on(block, ("resid_post", i))
        for role, relative in (("attn_out", paths.attn), ("mlp_out", paths.mlp), ("mixer_out", paths.mixer)):
            if relative:
                on(f"{block}.{relative}", (role, i))
        if paths.out_proj:
            on(f"{block}.{paths.out_proj}", ("z", i), hook_input=True)
    try:
        with torch.no_grad():
            seen[("logits", None)] = hf(input_ids=ids).logits.detach().clone()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def single_ids(model: al.AnyModel, prompt: str) -> torch.Tensor:
    return model.tokenizer(prompt, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def batch(model: al.AnyModel) -> ActivationCache:
    """Every role of the two prompts, as one left-padded batch."""
    return al.cache(model, PROMPTS)


@pytest.fixture(scope="module")
def references(model: al.AnyModel) -> list[dict]:
    """The hook reference of each prompt on its own."""
    return [reference_run(model.hf, single_ids(model, prompt)) for prompt in PROMPTS]


# -- values ---------------------------------------------------------------------------------------
def test_cache_matches_hooks_on_a_left_padded_batch(
    model: al.AnyModel, batch: ActivationCache, references: list[dict]
) -> None:
    cache = batch
    lengths = [single_ids(model, p).shape[1] for p in PROMPTS]
    assert lengths[0] != lengths[1], "the prompts must differ in length to exercise padding"
    width = max(lengths)
    assert cache.tokens.shape == (2, width)
    compared = set()
    for row, prompt in enumerate(PROMPTS):
        ids = single_ids(model, prompt)
        n = ids.shape[1]
        # Left padding: the prompt's real tokens are the last n, the mask says so.
        assert torch.equal(cache.tokens[row, -n:], ids[0])
        assert cache.attention_mask[row].tolist() == [0] * (width - n) + [1] * n
        reference = references[row]
        for (role, layer), want in reference.items():
            if role not in model.roles:
                continue
            got = cache[role] if layer is None else cache[role, layer]
            got = got[row, -n:]
            if role == "z":
                got = got.flatten(-2)
            torch.testing.assert_close(
                got, want[0], atol=ATOL, rtol=0, msg=lambda m, r=role, i=layer, b=row: f"{r}[{i}] row {b}: {m}"
            )
            compared.add(role)
        # The single prompt's last token is the batch's position -1, whatever the padding.
        last = reference[("resid_post", model.n_layers - 1)][0, -1]
        torch.testing.assert_close(cache["resid_post", -1][row, -1], last, atol=ATOL, rtol=0)
        if "resid_mid" in model.roles and "attn_out" in model.roles:
            for i in range(model.n_layers):
                mid = reference[("resid_pre", i)] + reference[("attn_out", i)]
                torch.testing.assert_close(cache["resid_mid", i][row, -n:], mid[0], atol=ATOL, rtol=0)
    assert {"resid_pre", "resid_post", "logits", "embed", "final_norm"} <= compared
    assert compared & {"attn_out", "mlp_out", "mixer_out"}, "no residual writer was checked"


def test_decomposition_sums_back_to_resid_post(
    model: al.AnyModel, batch: ActivationCache, references: list[dict]
) -> None:
    cache = batch
    reference = references[1]  # the longer prompt: no padding in the batch
    heads = "z" in model.roles and model.adapter.z_feeds_residual and model.adapter.out_proj is not None
    for layer in sorted({0, model.n_layers - 1}):
        for per_head in (False, True):
            components, labels = cache.decompose_resid(layer=layer, per_head=per_head)
            assert components.shape == (len(labels), *cache["resid_post", layer].shape)
            assert labels[0] == "embed"
            assert ("pos_embed" in labels) == ("pos_embed" in model.roles)
            total = components.sum(0)
            torch.testing.assert_close(total, cache["resid_post", layer], atol=ATOL, rtol=0)
            torch.testing.assert_close(total[1], reference[("resid_post", layer)][0], atol=ATOL, rtol=0)
            if per_head and heads:
                assert f"head {layer}.{model.n_heads - 1}" in labels and "attn bias" in labels
                assert f"attn {layer}" not in labels
            else:
                writers = [r.removesuffix("_out") for r in ("attn_out", "mlp_out", "mixer_out") if r in model.roles]
                assert [f"{w} {layer}" for w in writers] == [lab for lab in labels if lab.endswith(f" {layer}")]


@pytest.mark.needs_roles(where=has_head_decomposition)
def test_one_head_of_the_decomposition_is_z_times_its_output_weights(
    model: al.AnyModel, batch: ActivationCache, references: list[dict]
) -> None:
    paths = modules_of(model.hf)
    layer, head = model.n_layers - 1, model.n_heads - 1
    z = references[1][("z", layer)][0]  # [pos, heads * d_head]
    out_proj = model.hf.get_submodule(f"{paths.layers}.{layer}.{paths.out_proj}")
    weight = out_proj.weight if type(out_proj).__name__ == "Conv1D" else out_proj.weight.T  # [in, out]
    d_head = z.shape[-1] // model.n_heads
    rows = slice(head * d_head, (head + 1) * d_head)
    by_hand = z[:, rows] @ weight[rows]
    components, labels = batch.decompose_resid(per_head=True)
    torch.testing.assert_close(components[labels.index(f"head {layer}.{head}")][1], by_hand, atol=ATOL, rtol=0)


# -- the cache's interface ------------------------------------------------------------------------
def test_cache_interface(model: al.AnyModel, batch: ActivationCache) -> None:
    cache = batch
    assert set(cache.roles) == set(model.roles)
    n = model.n_layers
    stacked = al.stack(cache, "resid_post")
    assert stacked.shape == (n, 2, cache.tokens.shape[1], model.d_model)
    assert torch.equal(stacked[-1], cache["resid_post", -1]) and torch.equal(
        cache["resid_post", -1], cache["resid_post", n - 1]
    )
    assert ("resid_post", 0) in cache and ("resid_post", n) not in cache

    last = al.cache(model, PROMPTS, roles=["resid_post", "logits"], layers=[0, -1], positions=-1)
    assert last.roles == ("resid_post", "logits") and last.layers == [0, n - 1]
    assert torch.equal(last["resid_post", -1], cache["resid_post", -1][:, -1:])
    assert torch.equal(last["logits"], cache["logits"][:, -1:])
    with pytest.raises(KeyError, match="not in this cache"):
        last["resid_pre", 0]
    with pytest.raises(KeyError, match="index it with a layer"):
        cache["resid_post"]

    # Equal lengths: no padding, and roles the model computes once per batch broadcast.
    same = al.cache(model, [PROMPTS[0], PROMPTS[0]])
    components, _ = same.decompose_resid()
    torch.testing.assert_close(components.sum(0), same["resid_post", -1], atol=ATOL, rtol=0)

    missing = [role for role in ALL_ROLES if role not in model.roles]
    if missing:
        with pytest.raises(MissingRoleError, match="provides"):
            al.cache(model, PROMPTS, roles=["resid_post", missing[0]])


@pytest.mark.needs_roles("pattern")
def test_pattern_positions_select_queries(model: al.AnyModel, batch: ActivationCache) -> None:
    full = batch
    some = al.cache(model, PROMPTS, roles=["pattern"], layers=[0], positions=[0, -1])
    width = full.tokens.shape[1]
    assert some["pattern", 0].shape[-2:] == (2, width)
    assert torch.equal(some["pattern", 0], full["pattern", 0][:, :, [0, width - 1]])


def test_norm_frames() -> None:
    model = build(ANY_FAMILY)
    cache = al.cache(model, PROMPTS, roles=["resid_post"], positions=[-2, -1])
    frame = cache.to_frame()
    assert len(frame) == model.n_layers * 2 * 2
    row = frame[(frame.layer == 1) & (frame.prompt == 0) & (frame.pos == cache.tokens.shape[1] - 1)]
    assert row["norm"].item() == pytest.approx(float(cache["resid_post", 1][0, -1].norm()), rel=1e-6)
    parts = al.cache(model, PROMPTS).decompose_resid()
    frame = parts.to_frame()
    assert list(dict.fromkeys(frame["component"])) == parts.labels
    assert len(frame) == len(parts.labels) * 2 * cache.tokens.shape[1]


def test_reads_in_the_wrong_order_fall_back_to_one_trace_per_role(monkeypatch: pytest.MonkeyPatch) -> None:
    from anylens.experiments import extraction

    model = build(ANY_FAMILY)
    roles = ["resid_pre", "attn_out", "resid_post", "logits"]
    in_order = al.cache(model, PROMPTS, roles=roles)
    forward = extraction.forward_order
    monkeypatch.setattr(extraction, "forward_order", lambda role, layer: tuple(-k for k in forward(role, layer)))
    traces = []
    read = extraction._read_in_one_trace
    monkeypatch.setattr(extraction, "_read_in_one_trace", lambda *args: traces.append(args[2]) or read(*args))
    backwards = al.cache(model, PROMPTS, roles=roles)
    assert len(traces) == 1 + len(roles)  # the failed single trace, then one per role
    assert in_order.keys() and set(backwards.keys()) == set(in_order.keys())
    for key, value in in_order.items():
        assert torch.equal(backwards[key], value)
