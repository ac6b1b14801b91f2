"""The plain executor: every patched row runs through the whole model, many rows per forward."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .memory import rows_for_budget
from .plan import PatchPlan, PlanStats, writes_by_layer

if TYPE_CHECKING:
    from ..core.model import AnyModel


def run_plain(
    model: AnyModel,
    plan: PatchPlan,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int | None = None,
    memory_budget: int | None = None,
) -> tuple[torch.Tensor, PlanStats]:
    """Run every row of ``plan`` in full, ``batch_size`` rows per forward (or as many as fit
    ``memory_budget``, in even batches); ``score`` each batch's final-position logits."""
    n = len(plan)
    rows_per_forward = batch_size or rows_for_budget(model, plan.inputs.shape[1], memory_budget)
    if batch_size is None and n:
        forwards = -(-n // rows_per_forward)
        rows_per_forward = -(-n // forwards)  # even batches: 96 rows under a cap of 64 run as 48 + 48
    scores = torch.empty(n)
    stats = PlanStats(patches=n, rows_per_forward=min(rows_per_forward, n))
    for start in range(0, n, rows_per_forward):
        rows = torch.arange(start, min(start + rows_per_forward, n))
        last = patched_forward(model, plan, rows)
        scores[rows] = score(last, rows).detach().float().cpu()
        stats.forwards += 1
    return scores, stats


def patched_forward(model: AnyModel, plan: PatchPlan, rows: torch.Tensor) -> torch.Tensor:
    """One forward over ``rows`` of the plan, each row carrying its own patch."""
    access = model.role(plan.role)
    device = model.device
    ids = plan.inputs[plan.input_rows[rows]].to(device)
    writes = writes_by_layer(plan, rows, device)
    with torch.no_grad(), model.trace(ids):
        for layer in sorted(writes):  # ascending layers: reads must follow the forward order
            target = access.read(layer)
            for target_index, source_index in writes[layer]:
                target[target_index] = plan.sources[layer][source_index].to(target.dtype)
        last = model.logits[:, -1].save()
    return last


__all__ = ["patched_forward", "run_plain"]
