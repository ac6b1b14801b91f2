"""GPT-2: learned absolute positions, fused QKV (``c_attn``), ``Conv1D`` projections."""

from anylens import AdapterSpec, hookimpl
from anylens.core.spec import eager_pattern

GPT2 = AdapterSpec(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    layers="transformer.h",
    out_proj="transformer.h.{i}.attn.c_proj",
    roles={
        "embed": "transformer.wte.output",
        "pos_embed": "transformer.wpe.output",
        "resid_pre": "transformer.h.{i}.input",
        "resid_mid": "transformer.h.{i}.ln_2.input",
        "resid_post": "transformer.h.{i}.output",
        "attn_in": "transformer.h.{i}.ln_1.input",
        "mixer_in": "transformer.h.{i}.ln_1.input",
        "mlp_in": "transformer.h.{i}.ln_2.input",
        "attn_out": "transformer.h.{i}.attn.output",
        "mixer_out": "transformer.h.{i}.attn.output",  # the token-mixing sublayer: attention
        "mlp_out": "transformer.h.{i}.mlp.output",
        "z": "transformer.h.{i}.attn.c_proj.input|heads",
        "q": "transformer.h.{i}.attn.c_attn.output|qkv_fused:q",
        "k": "transformer.h.{i}.attn.c_attn.output|qkv_fused:k",
        "v": "transformer.h.{i}.attn.c_attn.output|qkv_fused:v",
        "pattern": eager_pattern("transformer.h.{i}.attn"),
        "mlp_post": "transformer.h.{i}.mlp.c_proj.input",
        "final_norm": "transformer.ln_f.output",
        "logits": "output.logits",
    },
    description="GPT-2 (GPT2LMHeadModel)",
)


@hookimpl
def anylens_adapters():
    return [GPT2]
