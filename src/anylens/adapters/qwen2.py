"""Qwen2: the LLaMA layout with biases on the q/k/v projections (so ``q``/``k``/``v`` include
them) and none on the output projection."""

from anylens import AdapterSpec, hookimpl
from anylens.adapters.llama import LLAMA_STYLE_ROLES

QWEN2 = AdapterSpec(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    layers="model.layers",
    out_proj="model.layers.{i}.self_attn.o_proj",
    roles=LLAMA_STYLE_ROLES,
    description="Qwen2 (Qwen2ForCausalLM)",
)


@hookimpl
def anylens_adapters():
    return [QWEN2]
