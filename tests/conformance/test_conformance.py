"""Per-architecture conformance: every built-in adapter, one parametrized test per property.

The reference side of these tests does not use anylens: it reads the Hugging Face modules with
plain torch hooks, guided by ``LAYOUTS`` below — a second, independent statement of where each
component sits in each family. An adapter passes only if anylens (through its adapter, inside an
nnsight trace) and the hooks (through this table) see the same numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from dataclasses import dataclass
from functools import cache

import pytest
import torch
import transformers

import anylens as al
from anylens.registry.verify import tolerance
from anylens.testing import TINY_ADAPTERS, TINY_BUILDERS, tiny, tiny_model, tiny_tokenizer

# -- the independent description of each family ----------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where each component of a family sits, as module paths *under one block* (unless noted).

    ``heads`` is (query heads, key/value heads, head width) of the tiny test model, written out
    rather than read from the config.
    """

    blocks: str  # the list of blocks, from the model root
    embed: str  # token embedding, from the model root
    heads: tuple[int, int, int] | None = None  # None: no attention
    pos_embed: str | None = None  # learned position embedding, from the model root
    attn: str | None = None  # output (element 0 of a tuple) is what attention adds to the stream
    mlp: str | None = None  # output is what the MLP adds
    mixer: str | None = None  # output is what an SSM mixer adds
    mid: str | None = None  # input is the stream between attention and MLP
    # The norms that start each branch: their inputs are what the branch reads from the stream.
    attn_norm: str | None = None  # starts attention (or the SSM mixer)
    mlp_norm: str | None = None  # starts the MLP (the same module as attn_norm where one norm feeds both)
    out_proj: str | None = None  # input is the per-head values z
    qkv: tuple[str, ...] = ()  # the projection(s) producing q, k, v
    qkv_layout: str = "separate"  # separate | consecutive (q|k|v) | interleaved (per head [q k v])
    neurons: str | None = None  # input is the MLP hidden activations
    flat_tokens: bool = False  # the MLP sees [batch * pos, d] (OPT)
    residual_tensors: bool = True  # block input / output are the residual stream
    has_final_norm: bool = True  # read from output_hidden_states[-1], which transformers reports normed
    hf: bool = True  # a transformers model (output_hidden_states / output_attentions)
    # For a model that is not (hf=False), from the model root: the final norm, and under one block
    # the module whose output is the attention probabilities.
    final_norm: str | None = None
    probs: str | None = None


_LLAMA_LIKE = dict(
    blocks="model.layers",
    embed="model.embed_tokens",
    heads=(4, 2, 16),
    attn="self_attn",
    mlp="mlp",
    mid="post_attention_layernorm",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    out_proj="self_attn.o_proj",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    neurons="mlp.down_proj",
)
_NEOX = dict(
    blocks="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    heads=(4, 4, 16),
    attn="attention",
    mlp="mlp",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    out_proj="attention.dense",
    qkv=("attention.query_key_value",),
    qkv_layout="interleaved",
    neurons="mlp.dense_4h_to_h",
)
_MAMBA = dict(blocks="backbone.layers", embed="backbone.embeddings", mixer="mixer", attn_norm="norm")

LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout(
        blocks="transformer.h",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        heads=(4, 4, 16),
        attn="attn",
        mlp="mlp",
        mid="ln_2",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        out_proj="attn.c_proj",
        qkv=("attn.c_attn",),
        qkv_layout="consecutive",
        neurons="mlp.c_proj",
    ),
    "llama": Layout(**_LLAMA_LIKE),
    "mistral": Layout(**_LLAMA_LIKE),
    "qwen2": Layout(**_LLAMA_LIKE),
    "gemma": Layout(**_LLAMA_LIKE),
    # Gemma 2 normalises each sublayer's output before adding it to the stream.
    "gemma2": Layout(
        **{
            **_LLAMA_LIKE,
            "attn": "post_attention_layernorm",
            "mlp": "post_feedforward_layernorm",
            "mid": "pre_feedforward_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
        }
    ),
    "phi3": Layout(**{**_LLAMA_LIKE, "qkv": ("self_attn.qkv_proj",), "qkv_layout": "consecutive"}),
    "gpt_neox": Layout(**_NEOX),
    "gpt_neox_sequential": Layout(**_NEOX, mid="post_attention_layernorm"),
    "opt": Layout(
        blocks="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        pos_embed="model.decoder.embed_positions",
        heads=(4, 4, 16),
        attn="self_attn",
        mlp="fc2",
        mid="final_layer_norm",
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        out_proj="self_attn.out_proj",
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        neurons="fc2",
        flat_tokens=True,
    ),
    "gptj": Layout(
        blocks="transformer.h",
        embed="transformer.wte",
        heads=(4, 4, 16),
        attn="attn",
        mlp="mlp",
        attn_norm="ln_1",
        mlp_norm="ln_1",
        out_proj="attn.out_proj",
        qkv=("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        neurons="mlp.fc_out",
    ),
    "mamba": Layout(**_MAMBA),
    "mamba2": Layout(**_MAMBA),
    # Native mamba-ssm: blocks pass (mixer output, residual) on, so no block boundary carries the
    # residual stream; the default fused add+norm kernel never calls norm_f as a module.
    "mamba_ssm": Layout(
        blocks="backbone.layers",
        embed="backbone.embedding",
        mixer="mixer",
        residual_tensors=False,
        has_final_norm=False,
        hf=False,
    ),
    # A plain torch model with its own names, no config and a bare-tensor output.
    "plain": Layout(
        blocks="blocks",
        embed="embedding",
        pos_embed="positions",
        heads=(4, 4, 16),
        attn="mix",
        mlp="ff",
        mid="norm_b",
        attn_norm="norm_a",
        mlp_norm="norm_b",
        out_proj="mix.out",
        qkv=("mix.query", "mix.key", "mix.value"),
        neurons="ff.down",
        has_final_norm=False,
        hf=False,
        final_norm="norm_out",
        probs="mix.softmax",
    ),
}

#: Which adapter must claim each tiny family.
ADAPTER_OF = {family: family for family in LAYOUTS} | {"gpt_neox_sequential": "gpt_neox"}

#: Full-size default configs of each family with a built-in adapter: (config class, model class,
#: config overrides). A family whose adapter is its own data (TINY_ADAPTERS) has no full size.
FULL_SIZE = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "gpt_neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"use_parallel_residual": False}),
    "opt": ("OPTConfig", "OPTForCausalLM", {}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {}),
    "mamba": ("MambaConfig", "MambaForCausalLM", {}),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", {}),
    "mamba_ssm": (
        "mamba_ssm.models.config_mamba.MambaConfig",
        "mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel",
        {},
    ),
}

FAMILIES = list(LAYOUTS)
TOL = 1e-5


def test_every_tiny_family_is_described():
    assert set(TINY_BUILDERS) == set(LAYOUTS) == set(FULL_SIZE) | set(TINY_ADAPTERS)


def _require(family: str) -> None:
    if family == "mamba_ssm":
        pytest.importorskip(
            "mamba_ssm", reason="mamba-ssm is not importable here (its kernels need a CUDA build of torch)"
        )
        if not torch.cuda.is_available():
            pytest.skip("mamba-ssm runs only on CUDA")


# -- shared tiny models ----------------------------------------------------------------------

PROMPTS = [
    "The capital of France is Paris and the",
    "When Mary and John went to the store, John",
]
SEQ = 8  # short: Mamba's CPU scan is slow


@cache
def _prompt_ids() -> torch.Tensor:
    rows = [tiny_tokenizer()(p, add_special_tokens=False)["input_ids"][:SEQ] for p in PROMPTS]
    assert all(len(r) == SEQ for r in rows)
    return torch.tensor(rows)


@cache
def _models(family: str) -> tuple[al.AnyModel, torch.nn.Module]:
    """The wrapped tiny model, and an untouched copy of the same weights for the hook side."""
    hf, tokenizer = tiny_model(family)
    reference = copy.deepcopy(hf)
    if LAYOUTS[family].heads is not None and LAYOUTS[family].hf:
        reference.set_attn_implementation("eager")  # the only implementation that returns patterns
    return al.wrap(hf, tokenizer, adapter=TINY_ADAPTERS.get(family)), reference


# -- (a) the invariants ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_check_passes(family):
    _require(family)
    model, _ = _models(family)
    assert model.adapter.name == ADAPTER_OF[family]
    report = al.check(model)
    assert report.passed, str(report)


# -- (b) values against plain torch hooks ----------------------------------------------------


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _logits(output):
    """A model output's logits: a plain model may return the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.logits


def _hidden_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _reference_values(family: str, ids: torch.Tensor) -> dict[str, object]:
    """Every role this family has, computed with forward hooks on the untouched model copy."""
    layout = LAYOUTS[family]
    _, ref = _models(family)
    blocks = ref.get_submodule(layout.blocks)
    n_layers, (batch, seq) = len(blocks), ids.shape
    captured: dict[str, list] = {}
    handles = []

    def hook_output(module, name, transform=lambda x: x):
        def hook(module, args, output):
            captured[name].append(transform(output).detach().clone())

        captured.setdefault(name, [])
        handles.append(module.register_forward_hook(hook))

    def hook_input(module, name, transform=lambda x: x):
        def hook(module, args, kwargs):
            captured[name].append(transform(_hidden_input(args, kwargs)).detach().clone())

        captured.setdefault(name, [])
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def tokens(x):  # [batch * pos, ...] -> [batch, pos, ...]
        return x.reshape(batch, seq, *x.shape[1:]) if layout.flat_tokens else x

    def split_heads(n_heads):  # [batch, pos, n_heads * d_head] -> [batch, pos, n_heads, d_head]
        return lambda x: x.reshape(batch, seq, n_heads, layout.heads[2])

    hook_output(ref.get_submodule(layout.embed), "embed")
    if layout.final_norm:
        hook_output(ref.get_submodule(layout.final_norm), "final_norm")
    if layout.pos_embed:
        hook_output(ref.get_submodule(layout.pos_embed), "pos_embed")
    for block in blocks:
        if layout.residual_tensors:
            hook_input(block, "resid_pre")
            hook_output(block, "resid_post", _first)
        if layout.attn:
            hook_output(block.get_submodule(layout.attn), "attn_out", _first)
        if layout.mid:
            hook_input(block.get_submodule(layout.mid), "resid_mid", tokens)
        if layout.mlp:
            hook_output(block.get_submodule(layout.mlp), "mlp_out", lambda x: tokens(_first(x)))
        if layout.mixer:
            hook_output(block.get_submodule(layout.mixer), "mixer_out", _first)
        if layout.attn_norm:
            hook_input(block.get_submodule(layout.attn_norm), "attn_in" if layout.attn else "mixer_in")
        if layout.mlp_norm:
            hook_input(block.get_submodule(layout.mlp_norm), "mlp_in", tokens)
        if layout.neurons:
            hook_input(block.get_submodule(layout.neurons), "mlp_post", tokens)
        if layout.probs:
            hook_output(block.get_submodule(layout.probs), "pattern")
        if layout.heads:
            n_q, n_kv, _ = layout.heads
            hook_input(block.get_submodule(layout.out_proj), "z", split_heads(n_q))
            if layout.qkv_layout == "separate":
                for name, module, n_heads in zip("qkv", layout.qkv, (n_q, n_kv, n_kv)):
                    hook_output(block.get_submodule(module), name, split_heads(n_heads))
            else:
                hook_output(block.get_submodule(layout.qkv[0]), "qkv")
    try:
        with torch.no_grad():
            if layout.hf:
                kwargs = {"output_attentions": True} if layout.heads else {}
                out = ref(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **kwargs)
            else:
                out = ref(ids)
    finally:
        for handle in handles:
            handle.remove()

    values: dict[str, object] = {"logits": _logits(out)}
    for name in ("embed", "pos_embed", "final_norm"):
        if name in captured:
            values[name] = captured.pop(name)[0]
    if layout.has_final_norm:
        values["final_norm"] = out.hidden_states[-1]
    if layout.heads and layout.hf:
        values["pattern"] = list(out.attentions)
        if "qkv" in captured:
            values.update(_split_qkv(captured.pop("qkv"), layout, batch, seq))
    values.update(captured)
    if "attn_out" in values and not layout.mixer:  # attention is the token mixer
        values["mixer_out"] = values["attn_out"]
        if "attn_in" in values:
            values["mixer_in"] = values["attn_in"]
    for name, per_layer in values.items():
        if isinstance(per_layer, list):
            assert len(per_layer) == n_layers, f"{name}: {len(per_layer)} hook calls for {n_layers} layers"
    return values


def _split_qkv(outputs: list[torch.Tensor], layout: Layout, batch: int, seq: int) -> dict[str, list]:
    n_q, n_kv, d_head = layout.heads
    split: dict[str, list] = {"q": [], "k": [], "v": []}
    for fused in outputs:
        if layout.qkv_layout == "consecutive":
            q, k, v = fused.split([n_q * d_head, n_kv * d_head, n_kv * d_head], dim=-1)
            parts = (
                q.reshape(batch, seq, n_q, d_head),
                k.reshape(batch, seq, n_kv, d_head),
                v.reshape(batch, seq, n_kv, d_head),
            )
        else:  # interleaved: each head owns a [q | k | v] block of 3 * d_head
            parts = fused.reshape(batch, seq, n_q, 3, d_head).unbind(3)
        for name, part in zip("qkv", parts):
            split[name].append(part)
    return split


def _anylens_values(model: al.AnyModel, ids: torch.Tensor) -> dict[str, object]:
    values: dict[str, object] = {}
    for role in model.roles:
        per_layer = role in al.LAYER_ROLES
        saved: list[torch.Tensor] = []
        with torch.no_grad(), model.trace(ids):  # one trace per role: no read-order assumptions
            if per_layer:
                for layer in range(model.n_layers):
                    saved.append(getattr(model, role)[layer].clone().save())
            else:
                saved.append(getattr(model, role).clone().save())
        values[role] = saved if per_layer else saved[0]
    return values


@pytest.mark.parametrize("family", FAMILIES)
def test_values_match_plain_hooks(family):
    _require(family)
    model, _ = _models(family)
    ids = _prompt_ids().to(model.device)
    expected = _reference_values(family, ids)
    got = _anylens_values(model, ids)
    assert set(got) == set(expected), (
        f"adapter roles {sorted(got)} differ from the roles this family has {sorted(expected)}"
    )
    worst = 0.0
    for role, want in expected.items():
        pairs = zip(got[role], want) if isinstance(want, list) else [(got[role], want)]
        for layer, (a, b) in enumerate(pairs):
            assert a.shape == b.shape, f"{role}[{layer}]: shape {tuple(a.shape)} != reference {tuple(b.shape)}"
            error = float((a.float() - b.float()).abs().max())
            assert error <= TOL, f"{role}[{layer}]: max abs error {error:.2e} > {TOL}"
            worst = max(worst, error)
    print(f"{family}: max abs error over all roles {worst:.2e}")


# -- (c) paths exist in the full-size default models -----------------------------------------


def _import(dotted: str):
    if "." not in dotted:
        return getattr(transformers, dotted)
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("family", list(FULL_SIZE))
def test_paths_resolve_on_full_size_model(family):
    from anylens.core.spec import RolePath

    config_name, model_name, overrides = FULL_SIZE[family]
    if family == "mamba_ssm":
        pytest.importorskip("mamba_ssm", reason="mamba-ssm is not importable here (it needs a CUDA build of torch)")
    with torch.device("meta"):
        model = _import(model_name)(_import(config_name)(**overrides))
    spec = al.registry().resolve(model)
    assert spec.name == ADAPTER_OF[family]
    spec = spec.specialize(model.config)
    n_layers = len(model.get_submodule(spec.layers))
    assert n_layers > 3  # a real depth, not a tiny model
    for role, text in spec.roles.items():
        path = RolePath.parse(text)
        for layer in (0, n_layers - 1) if path.per_layer else (None,):
            module = path.torch_module_path(layer)
            try:
                model.get_submodule(module)
            except AttributeError:
                pytest.fail(f"role {role!r}: {type(model).__name__} has no module {module!r}")
    model.get_submodule(spec.unembed)
    if spec.out_proj:
        model.get_submodule(spec.out_proj.replace("{i}", str(n_layers - 1)))
    if {"z", "q", "k", "v", "pattern"} & set(spec.roles):
        assert getattr(model.config, spec.n_heads, None), f"config has no {spec.n_heads!r}"
    if spec.logit_softcap:
        assert getattr(model.config, spec.logit_softcap, None), f"config has no {spec.logit_softcap!r}"


# -- (d) wrong mappings are caught -------------------------------------------------------------

WRONG_MAPPINGS = {
    "llama: attn_out at the MLP": ("llama", {"attn_out": "model.layers.{i}.mlp.output"}, {}),
    "llama: z at the query projection": ("llama", {"z": "model.layers.{i}.self_attn.q_proj.output|heads"}, {}),
    "llama: resid_mid at the layer input": ("llama", {"resid_mid": "model.layers.{i}.input"}, {}),
    "gemma2: attn_out before its post-norm": ("gemma2", {"attn_out": "model.layers.{i}.self_attn.output"}, {}),
    "gemma2: logit soft-cap forgotten": ("gemma2", {}, {"logit_softcap": None}),
    "gpt_neox: v read as consecutive q|k|v": (
        "gpt_neox",
        {"v": "gpt_neox.layers.{i}.attention.query_key_value.output|qkv_fused:v"},
        {},
    ),
    "gpt_neox: resid_mid on a parallel block": (
        "gpt_neox",
        {"resid_mid": "gpt_neox.layers.{i}.post_attention_layernorm.input"},
        {},
    ),
    "gpt2: layer output indexed [0] (batch row 0)": ("gpt2", {"resid_post": "transformer.h.{i}.output.0"}, {}),
    # Right value, wrong place: writing the block's input changes the residual too, not attention alone.
    "gpt2: attn_in at the block input": (
        "gpt2",
        {"attn_in": "transformer.h.{i}.input", "mixer_in": "transformer.h.{i}.input"},
        {},
    ),
    "llama: mlp_in at the attention's norm": ("llama", {"mlp_in": "model.layers.{i}.input_layernorm.input"}, {}),
}


def _check_wrong_mapping(case: str, dtype: torch.dtype) -> al.CheckReport:
    family, roles, facts = WRONG_MAPPINGS[case]
    spec = al.registry().adapter(ADAPTER_OF[family])
    wrong = dataclasses.replace(spec, name=f"{spec.name}-wrong", roles={**spec.roles, **roles}, **facts)
    hf, tokenizer = tiny_model(family, dtype=dtype)
    model = al.wrap(hf, tokenizer, adapter=wrong)
    return al.check(model, write_layers=[0])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("case", list(WRONG_MAPPINGS))
def test_wrong_mapping_fails_check(case, dtype):
    report = _check_wrong_mapping(case, getattr(torch, dtype))
    assert report.dtype == dtype
    assert not report.passed, f"check missed a wrong mapping ({case}) in {dtype}:\n{report}"
    if dtype != "float32":
        # The tolerance that grows with the dtype's epsilon is not vacuous: exactly the rows that
        # fail in float32 fail here too.
        failing = {(row.invariant, row.layer) for row in report.failures}
        in_float32 = {(row.invariant, row.layer) for row in _check_wrong_mapping(case, torch.float32).failures}
        assert failing == in_float32, f"{dtype} fails {sorted(failing, key=str)}, float32 {sorted(in_float32, key=str)}"


# -- (e) writes reach the model exactly like a hook-made ablation ------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_write_matches_hook_ablation(family):
    """Zero one head of z (or an SSM mixer's output) at the last position, both ways."""
    _require(family)
    model, ref = _models(family)
    layout = LAYOUTS[family]
    ids = _prompt_ids().to(model.device)
    layer, head = 1, 2
    block = ref.get_submodule(layout.blocks)[layer]

    if layout.heads:
        d_head = layout.heads[2]

        def ablate(module, args):
            z = args[0].clone()
            z[:, -1, head * d_head : (head + 1) * d_head] = 0
            return (z, *args[1:])

        handle = block.get_submodule(layout.out_proj).register_forward_pre_hook(ablate)
    else:

        def ablate(module, args, output):
            output = output.clone()
            output[:, -1] = 0
            return output

        handle = block.get_submodule(layout.mixer).register_forward_hook(ablate)
    try:
        with torch.no_grad():
            expected = _logits(ref(ids))
    finally:
        handle.remove()

    with torch.no_grad(), model.trace(ids):
        if layout.heads:
            model.z[layer][:, -1, head] = 0
        else:
            model.mixer_out[layer][:, -1] = 0
        logits = model.logits.save()

    with torch.no_grad():
        clean = _logits(ref(ids))
    assert float((expected - clean).abs().max()) > 1e-4, "the ablation should move the logits"
    error = float((logits - expected).abs().max())
    assert error <= TOL, f"anylens write differs from the hook ablation by {error:.2e}"


# -- (f) half precision ---------------------------------------------------------------------------

ZOO = ["zoo:gpt2", "zoo:llama", "zoo:mistral", "zoo:mamba"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("source", ZOO)
def test_check_passes_in_half_precision(source, dtype):
    model = al.load(source, dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    report = al.check(model)
    assert report.dtype == dtype and report.eps == torch.finfo(model.dtype).eps
    assert report.passed, str(report)


@pytest.mark.parametrize("magnitude", [0.01, 1.0, 300.0])
def test_float32_tolerance_is_not_looser_than_1e_4_per_unit_of_magnitude(magnitude):
    assert tolerance(magnitude, torch.finfo(torch.float32).eps) <= 1e-4 * max(1.0, magnitude)


def test_an_op_missing_for_the_dtype_shows_as_failing_reads_with_torchs_message(monkeypatch):
    """No kernel these models use is missing in float16 on a CPU in torch 2.13; one that is missing
    elsewhere must surface, not vanish into a pass."""
    model = tiny("llama", dtype=torch.float16)
    message = "\"addmm_impl_cpu_\" not implemented for 'Half'"

    def missing(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(model.hf.model.layers[1].mlp, "forward", missing)
    report = al.check(model)
    reads = [row for row in report.rows if row.invariant.startswith("read ")]
    assert reads and not report.passed
    assert all(not row.passed and message in row.detail for row in reads)
