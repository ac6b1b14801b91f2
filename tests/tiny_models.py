"""Tiny models for the experiment tests, built once per test module."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
import torch

from anylens.testing import tiny


class PlainLM(torch.nn.Module):
    """A language model of plain torch modules, no transformers class: an embedding, ``blocks``
    (each ``[batch, pos, width] -> [batch, pos, width]``), a final norm and an unembedding."""

    def __init__(self, blocks: list[torch.nn.Module], vocab: int, width: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(blocks)
        self.norm_f = torch.nn.LayerNorm(width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)
        self.config = type("Config", (), {"d_model": width, "vocab_size": vocab})()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return self.lm_head(self.norm_f(hidden))


def plain_lm_adapter(name: str, **layer_roles: str) -> dict:
    """An adapter declaration for :class:`PlainLM`: its embedding, residual stream, final norm and
    logits, plus ``layer_roles`` (role name -> path) for what its blocks hold."""
    roles = {"embed": "embedding.output", "resid_pre": "layers.{i}.input", "resid_post": "layers.{i}.output"}
    roles.update(layer_roles, final_norm="norm_f.output", logits="output")
    return {"name": name, "architectures": ["PlainLM"], "layers": "layers", "roles": roles}


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


def random_prompt_pairs(
    seed: int = 0, length: int = 6, different: tuple[int, ...] = (2,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random clean prompts of ``length`` tokens; each corrupt prompt differs at ``different``."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(4, 400, (2, length), generator=generator)
    corrupt = clean.clone()
    for pos in different:
        corrupt[:, pos] = torch.randint(4, 400, (2,), generator=generator)
    return clean, corrupt
