"""Mamba-2 (transformers' ``Mamba2ForCausalLM``): the Mamba block layout with the SSD mixer.

The mixer has SSM heads (``num_heads`` x ``head_dim`` channels before its gated norm and
``out_proj``), but they are not attention heads: there is no query/key/value or pattern, so the
role set is Mamba's — ``embed``, ``resid_pre``, ``resid_post``, ``mixer_out``, ``final_norm``,
``logits``.
"""

from anylens import AdapterSpec, hookimpl
from anylens.adapters.mamba import MAMBA_STYLE_ROLES

MAMBA2 = AdapterSpec(
    name="mamba2",
    architectures=("Mamba2ForCausalLM",),
    layers="backbone.layers",
    roles=MAMBA_STYLE_ROLES,
    description="Mamba-2 (Mamba2ForCausalLM)",
    reference_modules={
        name: f"backbone.layers.{{i}}.mixer.{name}" for name in ("in_proj", "conv1d", "norm", "out_proj")
    },
)


@hookimpl
def anylens_adapters():
    return [MAMBA2]
