"""Gemma 2: every sublayer output passes a norm before it joins the residual stream.

The block is ``x + post_attention_layernorm(attn(input_layernorm(x)))`` followed by
``x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``. So ``attn_out`` and
``mlp_out`` are the outputs of the *post* norms, ``resid_mid`` is the input of the
pre-feedforward norm, and ``z @ W_O`` is not what attention adds (``z_feeds_residual=False``).
Attention scores are soft-capped inside the attention function (``pattern`` is read after the
softmax, so it is unaffected) and the final logits are soft-capped after ``lm_head``, which
``logit_softcap`` tells ``model.unembed`` to apply. Attention is always eager.
"""

from anylens import AdapterSpec, hookimpl
from anylens.core.spec import eager_pattern

_LAYER = "model.layers.{i}"

GEMMA2 = AdapterSpec(
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    layers="model.layers",
    out_proj=f"{_LAYER}.self_attn.o_proj",
    logit_softcap="final_logit_softcapping",
    z_feeds_residual=False,
    roles={
        "embed": "model.embed_tokens.output",
        "resid_pre": f"{_LAYER}.input",
        "resid_mid": f"{_LAYER}.pre_feedforward_layernorm.input",
        "resid_post": f"{_LAYER}.output",
        "attn_in": f"{_LAYER}.input_layernorm.input",
        "mixer_in": f"{_LAYER}.input_layernorm.input",
        "mlp_in": f"{_LAYER}.pre_feedforward_layernorm.input",
        "attn_out": f"{_LAYER}.post_attention_layernorm.output",
        "mixer_out": f"{_LAYER}.post_attention_layernorm.output",  # the token-mixing sublayer: attention
        "mlp_out": f"{_LAYER}.post_feedforward_layernorm.output",
        "z": f"{_LAYER}.self_attn.o_proj.input|heads",
        "q": f"{_LAYER}.self_attn.q_proj.output|heads",
        "k": f"{_LAYER}.self_attn.k_proj.output|kv_heads",
        "v": f"{_LAYER}.self_attn.v_proj.output|kv_heads",
        "pattern": eager_pattern(f"{_LAYER}.self_attn"),
        "mlp_post": f"{_LAYER}.mlp.down_proj.input",
        "final_norm": "model.norm.output",
        "logits": "output.logits",
    },
    description="Gemma 2 (Gemma2ForCausalLM)",
)


@hookimpl
def anylens_adapters():
    return [GEMMA2]
