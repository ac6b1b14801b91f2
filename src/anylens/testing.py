"""Helpers for the test-suite: the tiny random models of :mod:`anylens.tiny`, under the names the
tests import. Production code imports :mod:`anylens.tiny` instead."""

from __future__ import annotations

from .tiny import (
    DEFAULT_SHAPE,
    GROUPED_FAMILIES,
    TINY_BUILDERS,
    VOCAB,
    TinyShape,
    default_shape,
    tiny,
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
