"""Mistral: the LLaMA layout (RMSNorm, rotary positions, GQA, gated SiLU MLP) with sliding-window
attention, which changes the mask but none of the module paths."""

from anylens import AdapterSpec, hookimpl
from anylens.adapters.llama import LLAMA_STYLE_ROLES

MISTRAL = AdapterSpec(
    name="mistral",
    architectures=("MistralForCausalLM",),
    layers="model.layers",
    out_proj="model.layers.{i}.self_attn.o_proj",
    roles=LLAMA_STYLE_ROLES,
    description="Mistral (MistralForCausalLM)",
)


@hookimpl
def anylens_adapters():
    return [MISTRAL]
