"""Gemma: the LLaMA layout with a GeGLU MLP, ``(1 + weight)`` RMSNorms and an embedding module
that already multiplies by ``sqrt(d_model)`` — so ``embed`` is the scaled value the first layer
reads, and no extra scaling is needed anywhere."""

from anylens import AdapterSpec, hookimpl
from anylens.adapters.llama import LLAMA_STYLE_ROLES

GEMMA = AdapterSpec(
    name="gemma",
    architectures=("GemmaForCausalLM",),
    layers="model.layers",
    out_proj="model.layers.{i}.self_attn.o_proj",
    roles=LLAMA_STYLE_ROLES,
    description="Gemma (GemmaForCausalLM)",
)


@hookimpl
def anylens_adapters():
    return [GEMMA]
