"""Tiny random models, built from configs with no hub access: the one place production code takes
them from (``al.load("tiny:FAMILY")``, adapter inference, the reference table); the test-suite
reaches them through :mod:`anylens.testing`.

:mod:`.models` holds the tiny tokenizer and one tiny model per built-in family; :mod:`.arch`
builds a tiny instance of any transformers causal-LM class. Both import only the core. ``tiny``
wraps a family's model, so it resolves the adapter through the registry (imported when called).
"""

from __future__ import annotations

from typing import Any

import torch

from .models import (
    DEFAULT_SHAPE,
    GROUPED_FAMILIES,
    TINY_BUILDERS,
    VOCAB,
    TinyShape,
    default_shape,
    tiny_model,
    tiny_tokenizer,
)

__all__ = [
    "DEFAULT_SHAPE",
    "GROUPED_FAMILIES",
    "TINY_BUILDERS",
    "VOCAB",
    "TinyShape",
    "default_shape",
    "tiny",
    "tiny_model",
    "tiny_tokenizer",
]


def tiny(
    family: str,
    seed: int = 0,
    shape: TinyShape | None = None,
    dtype: torch.dtype = torch.float32,
    **wrap_kwargs: Any,
):
    """A tiny random model of ``family`` (of ``shape``, parameters in ``dtype``) wrapped as an
    :class:`anylens.AnyModel`."""
    from ..core.wrapping import wrap_with_spec
    from ..registry.resolve import adapter_for

    model, tokenizer = tiny_model(family, seed, shape, dtype)
    adapter = adapter_for(model, wrap_kwargs.pop("adapter", None))
    return wrap_with_spec(model, adapter, tokenizer, **wrap_kwargs)
