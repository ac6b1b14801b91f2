"""Phi-3: the LLaMA block with fused projections.

``qkv_proj`` emits q, k and v one after another (``[q: n_heads*d_head | k: n_kv*d_head |
v: n_kv*d_head]``, GQA-sized), read through the ``qkv_fused`` views; ``gate_up_proj`` emits gate
and up halves, so the neurons (``mlp_post``) are read where they are combined: the input of
``down_proj``.
"""

from anylens import AdapterSpec, hookimpl
from anylens.core.spec import eager_pattern

_LAYER = "model.layers.{i}"

PHI3 = AdapterSpec(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    layers="model.layers",
    out_proj=f"{_LAYER}.self_attn.o_proj",
    roles={
        "embed": "model.embed_tokens.output",
        "resid_pre": f"{_LAYER}.input",
        "resid_mid": f"{_LAYER}.post_attention_layernorm.input",
        "resid_post": f"{_LAYER}.output",
        "attn_in": f"{_LAYER}.input_layernorm.input",
        "mixer_in": f"{_LAYER}.input_layernorm.input",
        "mlp_in": f"{_LAYER}.post_attention_layernorm.input",
        "attn_out": f"{_LAYER}.self_attn.output",
        "mixer_out": f"{_LAYER}.self_attn.output",  # the token-mixing sublayer: attention
        "mlp_out": f"{_LAYER}.mlp.output",
        "z": f"{_LAYER}.self_attn.o_proj.input|heads",
        "q": f"{_LAYER}.self_attn.qkv_proj.output|qkv_fused:q",
        "k": f"{_LAYER}.self_attn.qkv_proj.output|qkv_fused:k",
        "v": f"{_LAYER}.self_attn.qkv_proj.output|qkv_fused:v",
        "pattern": eager_pattern(f"{_LAYER}.self_attn"),
        "mlp_post": f"{_LAYER}.mlp.down_proj.input",
        "final_norm": "model.norm.output",
        "logits": "output.logits",
    },
    description="Phi-3 (Phi3ForCausalLM)",
)


@hookimpl
def anylens_adapters():
    return [PHI3]
