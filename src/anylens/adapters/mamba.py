"""Mamba (transformers' ``MambaForCausalLM``): no attention and no MLP.

Each block is ``x + mixer(norm(x))``: the selective-state-space mixer is the only thing a layer
adds to the residual stream (``mixer_out``). There are no heads, queries or attention patterns,
so ``z``/``q``/``k``/``v``/``pattern``/``attn_out``/``mlp_out`` are absent. On a CPU the mixer
runs transformers' pure-torch scan (slow, but exact).
"""

from anylens import AdapterSpec, hookimpl

#: The role table of transformers' Mamba-style models (``backbone.layers.{i}.mixer``).
MAMBA_STYLE_ROLES = {
    "embed": "backbone.embeddings.output",
    "resid_pre": "backbone.layers.{i}.input",
    "resid_post": "backbone.layers.{i}.output",
    "mixer_in": "backbone.layers.{i}.norm.input",
    "mixer_out": "backbone.layers.{i}.mixer.output",
    "final_norm": "backbone.norm_f.output",
    "logits": "output.logits",
}

MAMBA = AdapterSpec(
    name="mamba",
    architectures=("MambaForCausalLM",),
    layers="backbone.layers",
    roles=MAMBA_STYLE_ROLES,
    description="Mamba (MambaForCausalLM)",
    reference_modules={
        name: f"backbone.layers.{{i}}.mixer.{name}" for name in ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
    },
)


@hookimpl
def anylens_adapters():
    return [MAMBA]
