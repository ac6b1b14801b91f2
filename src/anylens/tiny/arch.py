"""Tiny random instances of any transformers causal-LM class, built from its config class.

Used by ``python -m anylens.inference.infer arch:<ClassName>``, the reference table and ``benchmarks/coverage.py``.
The config's own defaults are shrunk through the standard attribute names (layers, width, heads,
KV heads, MLP width, vocabulary, positions, experts, state sizes); everything else keeps its
default, so the tiny model has the structure of the real one. Some configs tie sizes together in
ways a fixed table cannot know; those are retried with fewer attributes shrunk (head sizes first,
then state-space and expert settings), and the first tiny model that runs a forward
pass on token ids is used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..core.errors import TinyBuildError

VOCAB = 400
N_LAYERS = 2
D_MODEL = 64
N_HEADS = 4
N_KV_HEADS = 2
D_HEAD = 16
D_MLP = 128
MAX_POSITIONS = 128
MAX_LAYERS = 4  # hybrids keep one layer of each distinct type, up to this many


def _keys(names: str, value: Any) -> dict[str, Any]:
    return dict.fromkeys(names.split(), value)


#: Overrides in the order they are given up when a config rejects them (see module docstring).
HEAD_SIZES = {
    **_keys("head_dim kv_channels dim_head v_head_dim", D_HEAD),
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "rotary_dim": D_HEAD // 2,
}
STATE_AND_EXPERTS = {
    **_keys("num_experts num_local_experts n_routed_experts moe_num_experts", 4),
    **_keys("num_experts_per_tok moe_topk moe_k top_k_experts", 2),
    **_keys("state_size ssm_state_size mamba_d_state", 8),
    **_keys("mamba_n_heads n_mamba_heads", 4),
    **_keys("n_groups mamba_n_groups", 1),
    **_keys("chunk_size mamba_chunk_size", 16),  # the reference scan pads sequences to a chunk
    "mamba_d_head": 32,  # 4 heads x 32 = expand (2) x d_model
    "mamba_d_ssm": 128,
    "time_step_rank": 8,
    **_keys("linear_num_key_heads linear_num_value_heads linear_num_heads", 2),
    **_keys("linear_key_head_dim linear_value_head_dim linear_head_dim", 16),
    # hybrids: an attention layer and an expert layer within two layers
    **_keys("attn_layer_period expert_layer_period", 2),
    **_keys("attn_layer_offset expert_layer_offset", 1),
    "attn_layer_indices": [1],
}
WIDTHS = {
    **_keys("hidden_size n_embd d_model dim embed_dim model_dim", D_MODEL),
    **_keys("num_attention_heads n_head n_heads num_heads decoder_attention_heads", N_HEADS),
    **_keys("num_key_value_heads n_kv_heads num_kv_heads multi_query_group_num", N_KV_HEADS),
    **_keys(
        "intermediate_size ffn_dim n_inner decoder_ffn_dim ffn_hidden_size d_ff dim_ff moe_intermediate_size "
        "shared_expert_intermediate_size shared_intermediate_size shared_experts_intermediate_size "
        "prefix_dense_intermediate_size",
        D_MLP,
    ),
}
ALWAYS = {
    **_keys("num_hidden_layers n_layer n_layers num_layers decoder_layers", N_LAYERS),
    "vocab_size": VOCAB,
    **_keys("max_position_embeddings n_positions n_ctx max_seq_len seq_length", MAX_POSITIONS),
    # token ids must exist in the tiny vocabulary
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "is_decoder": True,  # encoder families used as causal LMs
}
#: Each retry gives up one more of these groups of overrides.
LADDER = (
    {**ALWAYS, **WIDTHS, **STATE_AND_EXPERTS, **HEAD_SIZES},
    {**ALWAYS, **WIDTHS, **STATE_AND_EXPERTS},
    {**ALWAYS, **WIDTHS, **HEAD_SIZES},
    {**ALWAYS, **WIDTHS},
)

#: Config attributes listing each layer's type: hybrids keep one layer of each type.
LAYER_PATTERN_KEYS = ("layer_types", "layers_block_type", "block_types", "mlp_layer_types", "hybrid_override_pattern")


def causal_lm_classes() -> dict[str, str]:
    """model type -> causal-LM class name, as transformers' auto mapping lists them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_class(class_name: str) -> type:
    import transformers

    if class_name not in causal_lm_classes().values():
        raise TinyBuildError(
            f"{class_name!r} is not a transformers causal-LM class; see MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
        )
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise TinyBuildError(f"transformers exports no class {class_name!r}")
    return cls


def _get(config: Any, key: str) -> Any:
    """An attribute of a config, or None (some configs refuse per-layer attributes globally)."""
    try:
        return getattr(config, key, None)
    except Exception:
        return None


def tiny_config(config_class: type, overrides: dict[str, Any]) -> Any:
    """``config_class`` with its defaults shrunk by ``overrides`` (sub-model configs shrunk the same way)."""
    default = config_class()
    if _get(default, "is_encoder_decoder"):
        raise TinyBuildError("encoder-decoder model: its causal LM needs encoder states")
    declared = set(vars(default))
    if dataclasses.is_dataclass(config_class):
        declared |= {f.name for f in dataclasses.fields(config_class)}
    values = {key: value for key, value in overrides.items() if key in declared}
    for key in ("num_key_value_heads", "n_kv_heads", "num_kv_heads"):
        if key in values and _get(default, key) in (None, _get(default, "num_attention_heads")):
            values[key] = values.get("num_attention_heads", _get(default, "num_attention_heads") or N_HEADS)
    if {"expand", "num_heads", "head_dim"} <= declared and "head_dim" in values and "hidden_size" in values:
        # state-space duality: heads x head_dim must equal expand x d_model
        values["head_dim"] = int(_get(default, "expand")) * values["hidden_size"] // values.get("num_heads", 1)
    if _get(default, "sliding_window") and "sliding_window" in declared:
        values["sliding_window"] = 8  # shorter than the check's sequences, so the window really masks
    if "attention_types" in declared and "num_layers" in values:
        values["attention_types"] = [[["global", "local"], values["num_layers"] // 2]]
    values.update(_layer_pattern(default, declared))
    for key in sorted(declared):
        sub = _get(default, key)
        # a sub-model (text, vision, audio tower) is shrunk too; other nested settings are kept
        if hasattr(sub, "to_dict") and hasattr(sub, "model_type") and any(_get(sub, k) for k in ALWAYS):
            values[key] = tiny_config(type(sub), overrides)
    return config_class(**values)


def _layer_pattern(default: Any, declared: set[str]) -> dict[str, Any]:
    """One layer of each distinct layer type of the full model, so hybrids stay hybrid."""
    for key in LAYER_PATTERN_KEYS:
        types = _get(default, key)
        if key not in declared or not types or not isinstance(types, (list, tuple, str)):
            continue
        distinct = list(dict.fromkeys(types))[:MAX_LAYERS]
        n_layers = max(N_LAYERS, len(distinct))
        pattern = (distinct * n_layers)[:n_layers]
        values: dict[str, Any] = {key: "".join(pattern) if isinstance(types, str) else pattern}
        values.update(dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers"), n_layers))
        return {k: v for k, v in values.items() if k in declared}
    return {}


def tiny_model(class_name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random float32 instance of a transformers causal-LM class, in eval mode.

    Raises :class:`TinyBuildError` with the last reason when no tiny config builds and runs.
    """
    cls = model_class(class_name)
    reason = "no config"
    for overrides in LADDER:
        try:
            config = tiny_config(cls.config_class, overrides)
            # eager attention from the start, as al.load(..., attn_implementation="eager") does: some
            # older models cannot switch later, and only eager attention materialises the pattern
            config._attn_implementation = "eager"
            torch.manual_seed(seed)
            model = cls(config).float().eval()
            with torch.no_grad():
                model(torch.randint(4, VOCAB, (2, 12)))
        except TinyBuildError:
            raise
        except Exception as error:
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
            continue
        # Random init leaves biases and norm weights at constants; perturb everything so that a
        # wrong mapping cannot hide behind symmetric values.
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
        return model
    raise TinyBuildError(f"cannot build a tiny {class_name}: {reason}")
