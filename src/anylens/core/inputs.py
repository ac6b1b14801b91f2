"""Checks on what reaches the model's forward: a prompt with no tokens, or one longer than the
model's positions.

One forward pre-hook on the wrapped model sees every input, whether a trace tokenized a string,
an invoker batched prompts, or token ids were passed. It reads shapes only (no device sync).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from .errors import PositionLimitWarning, PromptError

if TYPE_CHECKING:
    from .model import AnyModel


def position_limit(model: AnyModel) -> int | None:
    """How many positions the model was built for (the adapter's ``max_positions`` config
    attribute), or None for a model without one (an SSM)."""
    name = model.adapter.max_positions
    value = getattr(model.config, name, None) if name else None
    return int(value) if isinstance(value, int) and value > 0 else None


def token_count(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The sequence length of a forward's input ids (or embeddings), if it has any."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
        return int(ids.shape[-1])
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
        return int(embeds.shape[-2])
    return None


def check_inputs(model: AnyModel) -> None:
    """Install the check on ``model``'s forward.

    Past its limit an absolute-position model (one with a ``pos_embed`` role) has no embedding to
    look up: an error. A rotary model still runs, on positions it never saw in training: a warning.
    """
    limit = position_limit(model)
    absolute = "pos_embed" in model.adapter.roles
    name, attribute = model.adapter.name, model.adapter.max_positions

    def check(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        count = token_count(args, kwargs)
        if count == 0:
            raise PromptError(
                "the prompt has no tokens (an empty string with a tokenizer that adds no BOS token): "
                "give a prompt of at least one token"
            )
        if limit is None or count is None or count <= limit:
            return
        message = (
            f"the prompt is {count} tokens but this model (adapter {name!r}) has {limit} positions (config.{attribute})"
        )
        if absolute:
            raise PromptError(f"{message}: shorten the prompt to at most {limit} tokens or split it")
        warnings.warn(
            f"{message}; positions past {limit} were never trained, so results there may not mean much",
            PositionLimitWarning,
            stacklevel=2,
        )

    model.hf.register_forward_pre_hook(check, with_kwargs=True)
