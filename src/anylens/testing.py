"""Helpers for the test-suite: the tiny random models of :mod:`anylens.tiny`, under the names the
tests import. Production code imports :mod:`anylens.tiny` instead."""

from __future__ import annotations

from .tiny import TINY_BUILDERS, VOCAB, tiny, tiny_model, tiny_tokenizer

__all__ = ["TINY_BUILDERS", "VOCAB", "tiny", "tiny_model", "tiny_tokenizer"]
