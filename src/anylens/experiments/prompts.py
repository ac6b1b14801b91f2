"""Tokenizing the prompts an experiment compares, with the checks that keep positions honest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import PromptError

if TYPE_CHECKING:
    from ..core.model import AnyModel

Prompts = str | Sequence[str] | torch.Tensor


def as_batch(prompts: Prompts, side: str = "clean") -> list[str] | torch.Tensor:
    """A list of prompt texts, or token ids ``[batch, pos]``.

    Prompt pairs (dataset pairs such as ``IOIPair``, or dicts) stand for their ``side`` prompt:
    ``clean``, or ``corrupt`` where an experiment reads its corrupt prompts.
    """
    if isinstance(prompts, torch.Tensor):
        batch = prompts if prompts.dim() == 2 else prompts[None]
        if batch.numel() == 0:
            raise PromptError(f"the token ids have shape {list(prompts.shape)}: give at least one prompt of one token")
        return batch
    batch = [prompts] if isinstance(prompts, (str, dict)) or _is_pair(prompts) else list(prompts)
    if not batch:
        raise PromptError("the prompt list is empty: give at least one prompt")
    return [_text(prompt, side) for prompt in batch]


def _is_pair(prompt: Any) -> bool:
    return isinstance(getattr(prompt, "clean", None), str)


def _text(prompt: Any, side: str) -> str:
    if isinstance(prompt, str):
        return prompt
    text = prompt.get(side) if isinstance(prompt, dict) else getattr(prompt, side, None) if _is_pair(prompt) else None
    if not isinstance(text, str):
        raise PromptError(
            f"cannot use {prompt!r} as a {side} prompt: give strings, token ids, or prompt pairs with a {side!r} text"
        )
    return text


def tokenize(model: AnyModel, prompts: Prompts) -> dict[str, torch.Tensor]:
    """Token ids and attention mask ``[batch, pos]``; a tensor passes through unmasked."""
    batch = as_batch(prompts)
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
    return model.to_tokens(batch)


def tokenize_aligned(model: AnyModel, prompts: Prompts, side: str = "clean") -> torch.Tensor:
    """Token ids of prompts that must all have the same number of tokens (no padding)."""
    batch = as_batch(prompts, side)
    if isinstance(batch, torch.Tensor):
        return batch
    model.require_tokenizer(batch)
    encoded = [model.tokenizer(p, return_tensors="pt")["input_ids"][0] for p in batch]
    lengths = {len(e) for e in encoded}
    if len(lengths) > 1:
        shown = "; ".join(f"{p!r} -> {len(e)} tokens {model.to_str_tokens(e)}" for p, e in zip(batch, encoded))
        raise PromptError(f"prompts must have the same number of tokens to be compared position by position: {shown}")
    return torch.stack(encoded)


def paired(model: AnyModel, clean: Prompts, corrupt: Prompts, align: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupt token ids of equal length, or a clear error showing both tokenizations.

    With ``align`` (a pair of equal-length position lists, clean and corrupt) prompts of different
    lengths are accepted; the caller then maps positions through it.
    """
    clean_ids, corrupt_ids = tokenize_aligned(model, clean), tokenize_aligned(model, corrupt, "corrupt")
    if clean_ids.shape[0] != corrupt_ids.shape[0] and corrupt_ids.shape[0] != 1 and clean_ids.shape[0] != 1:
        raise PromptError(
            f"{clean_ids.shape[0]} clean prompts but {corrupt_ids.shape[0]} corrupt prompts: give as many of each"
        )
    if clean_ids.shape[1] != corrupt_ids.shape[1] and align is None:
        clean_text = as_batch(clean)[0] if not isinstance(clean, torch.Tensor) else clean_ids[0]
        corrupt_text = as_batch(corrupt, "corrupt")[0] if not isinstance(corrupt, torch.Tensor) else corrupt_ids[0]
        raise PromptError(
            "clean and corrupt prompts have different token lengths, so positions cannot be matched: "
            f"clean {clean_text!r} -> {clean_ids.shape[1]} tokens {model.to_str_tokens(clean_ids[0])}; "
            f"corrupt {corrupt_text!r} -> {corrupt_ids.shape[1]} tokens {model.to_str_tokens(corrupt_ids[0])}. "
            "Rephrase one so both tokenize to the same length, or pass align=(clean_positions, corrupt_positions)."
        )
    return clean_ids, corrupt_ids
