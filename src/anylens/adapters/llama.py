"""LLaMA: RMSNorm, rotary positions (``q``/``k`` are read before RoPE), GQA, gated SiLU MLP."""

from anylens import AdapterSpec, hookimpl
from anylens.core.spec import eager_pattern

#: The role table shared by the LLaMA-style decoders (LLaMA, Mistral, Qwen2, ...).
LLAMA_STYLE_ROLES = {
    "embed": "model.embed_tokens.output",
    "resid_pre": "model.layers.{i}.input",
    "resid_mid": "model.layers.{i}.post_attention_layernorm.input",
    "resid_post": "model.layers.{i}.output",
    "attn_in": "model.layers.{i}.input_layernorm.input",
    "mixer_in": "model.layers.{i}.input_layernorm.input",
    "mlp_in": "model.layers.{i}.post_attention_layernorm.input",
    "attn_out": "model.layers.{i}.self_attn.output",
    "mixer_out": "model.layers.{i}.self_attn.output",  # the token-mixing sublayer: attention
    "mlp_out": "model.layers.{i}.mlp.output",
    "z": "model.layers.{i}.self_attn.o_proj.input|heads",
    "q": "model.layers.{i}.self_attn.q_proj.output|heads",
    "k": "model.layers.{i}.self_attn.k_proj.output|kv_heads",
    "v": "model.layers.{i}.self_attn.v_proj.output|kv_heads",
    "pattern": eager_pattern("model.layers.{i}.self_attn"),
    "mlp_post": "model.layers.{i}.mlp.down_proj.input",
    "final_norm": "model.norm.output",
    "logits": "output.logits",
}

LLAMA = AdapterSpec(
    name="llama",
    architectures=("LlamaForCausalLM",),
    layers="model.layers",
    out_proj="model.layers.{i}.self_attn.o_proj",
    roles=LLAMA_STYLE_ROLES,
    description="LLaMA (LlamaForCausalLM)",
)


@hookimpl
def anylens_adapters():
    return [LLAMA]
