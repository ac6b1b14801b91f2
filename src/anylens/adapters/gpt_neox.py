"""GPT-NeoX (Pythia): parallel residual by default, fused interleaved QKV, partial rotary.

``query_key_value`` emits, per head, a ``[q | k | v]`` block of ``3 * d_head`` (read through
the ``qkv_interleaved`` views). With ``use_parallel_residual`` (the default, and every Pythia
model) attention and MLP both read the layer input, so there is no ``resid_mid``; the variant for
``use_parallel_residual=False`` adds it at the input of the MLP's norm.
"""

from anylens import AdapterSpec, Variant, hookimpl
from anylens.core.spec import eager_pattern

_LAYER = "gpt_neox.layers.{i}"

GPT_NEOX = AdapterSpec(
    name="gpt_neox",
    architectures=("GPTNeoXForCausalLM",),
    layers="gpt_neox.layers",
    out_proj=f"{_LAYER}.attention.dense",
    parallel=True,
    roles={
        "embed": "gpt_neox.embed_in.output",
        "resid_pre": f"{_LAYER}.input",
        "resid_post": f"{_LAYER}.output",
        "attn_in": f"{_LAYER}.input_layernorm.input",
        "mixer_in": f"{_LAYER}.input_layernorm.input",
        "mlp_in": f"{_LAYER}.post_attention_layernorm.input",
        "attn_out": f"{_LAYER}.attention.output",
        "mixer_out": f"{_LAYER}.attention.output",  # the token-mixing sublayer: attention
        "mlp_out": f"{_LAYER}.mlp.output",
        "z": f"{_LAYER}.attention.dense.input|heads",
        "q": f"{_LAYER}.attention.query_key_value.output|qkv_interleaved:q",
        "k": f"{_LAYER}.attention.query_key_value.output|qkv_interleaved:k",
        "v": f"{_LAYER}.attention.query_key_value.output|qkv_interleaved:v",
        "pattern": eager_pattern(f"{_LAYER}.attention"),
        "mlp_post": f"{_LAYER}.mlp.dense_4h_to_h.input",
        "final_norm": "gpt_neox.final_layer_norm.output",
        "logits": "output.logits",
    },
    variants=(
        Variant(
            when={"use_parallel_residual": False},
            roles={"resid_mid": f"{_LAYER}.post_attention_layernorm.input"},
            facts={"parallel": False},
        ),
    ),
    description="GPT-NeoX / Pythia (GPTNeoXForCausalLM)",
)


@hookimpl
def anylens_adapters():
    return [GPT_NEOX]
