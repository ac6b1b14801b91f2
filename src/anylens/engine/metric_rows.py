"""A metric scored over the rows of a batched sweep, each row running one of the prompts."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import PromptError

if TYPE_CHECKING:
    from ..core.model import AnyModel


def metric_for_rows(metric: Any, prompt_of_row: torch.Tensor, n_prompts: int) -> Any:
    """``metric`` with per-prompt targets re-indexed so there is one target per batch row.

    A metric's targets may be one word, or one word per prompt; a sweep runs each prompt many
    times, so a per-prompt list must follow the rows. Metrics without such fields pass unchanged.
    """
    if not dataclasses.is_dataclass(metric):
        return metric
    changes = {}
    for field in dataclasses.fields(metric):
        value = getattr(metric, field.name)
        if isinstance(value, (str, bytes, int)) or not isinstance(value, Sequence):
            continue
        if len(value) != n_prompts:
            raise PromptError(
                f"metric {getattr(metric, 'name', type(metric).__name__)!r} has {len(value)} {field.name} targets "
                f"for {n_prompts} prompts: give one target, or one per prompt"
            )
        changes[field.name] = [value[int(i)] for i in prompt_of_row]
    return dataclasses.replace(metric, **changes) if changes else metric


def score_rows(
    metric: Any,
    model: AnyModel,
    last: torch.Tensor,
    prompt_of_row: torch.Tensor,
    n_prompts: int,
    reference_last: torch.Tensor | None = None,
) -> torch.Tensor:
    """The metric on final-position logits ``[k, vocab]`` whose rows run the given prompts.

    ``reference_last[prompt]`` is the logits a comparing metric (KL) measures against, handed
    over only to metrics that read them.
    """
    reference = None
    if reference_last is not None and getattr(metric, "reads_clean_logits", True):
        reference = reference_last[prompt_of_row.to(reference_last.device)]
    return metric_for_rows(metric, prompt_of_row, n_prompts)(last, model, reference)


__all__ = ["metric_for_rows", "score_rows"]
