"""Tiny models for the experiment tests, built once per test module."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch

from anylens.testing import tiny


def model_cache() -> Callable[[str], object]:
    """``model_of(family)``: the tiny wrapped model, cached for the calling module, or a skip
    naming why it cannot be built here (e.g. mamba-ssm, whose kernels need a CUDA build of torch)."""

    @cache
    def build(family: str):
        try:
            return tiny(family)
        except ImportError as error:
            return error

    def model_of(family: str):
        model = build(family)
        if isinstance(model, ImportError):
            pytest.skip(f"tiny {family!r} cannot be built here: {model}")
        return model

    return model_of


def random_prompt_pairs(seed: int = 0, length: int = 6, different: tuple[int, ...] = (2,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random clean prompts of ``length`` tokens; each corrupt prompt differs at ``different``."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, 400, (2, length), generator=generator)
    corrupt = clean.clone()
    for pos in different:
        corrupt[:, pos] = torch.randint(4, 400, (2,), generator=generator)
    return clean, corrupt
