"""A built Hugging Face model and a given adapter spec, as an AnyModel.

Which adapter serves a model is the registry's question (``al.wrap`` asks it); this module only
puts a model and an already chosen spec together, so that adapter inference can check candidate
specs without going through the registry.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from .errors import AnylensError
from .model import AnyModel
from .spec import AdapterSpec


def wrap_with_spec(
    hf_model: torch.nn.Module,
    spec: AdapterSpec,
    tokenizer: Any = None,
    *,
    attn_implementation: str | None = None,
) -> AnyModel:
    """``hf_model`` wrapped with ``spec`` (specialised to its config).

    Attention models are switched to eager attention unless ``attn_implementation`` says otherwise,
    because only eager attention materialises the probabilities that ``pattern`` reads and writes.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import PreTrainedModel

    spec = spec.specialize(getattr(hf_model, "config", None))
    hf_model.eval()
    if "pattern" in spec.roles and hasattr(hf_model, "set_attn_implementation") and hasattr(hf_model, "config"):
        wanted = attn_implementation or "eager"
        if getattr(hf_model.config, "_attn_implementation", None) != wanted:
            cast(Any, hf_model).set_attn_implementation(wanted)  # checked with hasattr above
    if not isinstance(hf_model, PreTrainedModel):
        # A plain torch model (e.g. mamba-ssm's MambaLMHeadModel, or a user's own): nnsight's
        # generic wrapper, called as core/forward.py says; a tokenizer is optional.
        from nnsight import NNsight

        return AnyModel(NNsight(hf_model), spec, tokenizer)
    if tokenizer is None:
        tokenizer = _tokenizer_for(hf_model)
    nn_model = TransformersModel(hf_model, tokenizer=tokenizer)
    return AnyModel(nn_model, spec, tokenizer)


def _tokenizer_for(hf_model: torch.nn.Module) -> Any:
    from transformers import AutoTokenizer

    name = getattr(hf_model.config, "_name_or_path", "")
    if name:
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception:
            pass
    raise AnylensError(
        f"no tokenizer for {type(hf_model).__name__}: pass one, al.wrap(model, tokenizer) "
        "(any transformers tokenizer; experiments on strings need it)"
    )
