"""The engine's entry point: record the runs a sweep needs, then run and score its patched rows.

An experiment says what to patch (a :class:`.plan.PatchPlan`) and what to measure (a metric).
:func:`record_runs` records the unpatched run of the inputs being patched, and the source run
activations are copied from, in the form the executors need; :func:`run_patches` runs every
row, reusing unpatched work (:mod:`.reuse`) or in full (:mod:`.executor`), and scores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .baseline import Baseline, record, record_for_plan, record_pair
from .executor import patched_forward, run_plain
from .final_position import metric_columns
from .memory import rows_for_budget
from .metric_rows import score_rows
from .plan import PatchPlan, PlanStats
from .reuse import run_reusing
from .scheduling import one_forward

if TYPE_CHECKING:
    from ..core.model import AnyModel


@dataclass
class RecordedRuns:
    """The runs a sweep records before it patches.

    ``unpatched_last`` is the final-position logits of the inputs being patched, unpatched, and
    ``unpatched_acts`` their role activations (when asked for); ``sources`` and ``source_last``
    the role and final-position logits of the source run, where one was given. ``reuse``: whether
    the sweep reuses unpatched work; ``columns``: the only logits its metric reads, computed
    alone with reuse (the other logits are NaN). ``baseline`` is what reuse recorded.
    """

    reuse: bool
    columns: torch.Tensor | None
    unpatched_last: torch.Tensor
    unpatched_acts: dict[int, torch.Tensor] | None = None
    sources: dict[int, torch.Tensor] | None = None
    source_last: torch.Tensor | None = None
    baseline: Baseline | None = None


def record_runs(
    model: AnyModel,
    role: str,
    layers: Sequence[int],
    inputs: torch.Tensor,
    metric: Any,
    *,
    source_inputs: torch.Tensor | None = None,
    need_acts: bool = False,
    memory_budget: int | None = None,
    reuse: bool = True,
) -> RecordedRuns:
    """Record the unpatched run of ``inputs`` (and ``role`` at ``layers`` in it, with
    ``need_acts``) and, given ``source_inputs``, the source run: ``role`` at ``layers`` and its
    final-position logits.

    With ``reuse`` the unpatched run is recorded as reuse needs it (block outputs and caches, if
    they fit the ``memory_budget``), the two runs in one forward where that is cheaper, and only
    the logits ``metric`` reads. A remote model does not reuse work: reuse runs blocks here.
    """
    reuse = reuse and not model.remote  # reuse runs blocks here, which a remote model cannot
    columns = metric_columns(model, metric) if reuse else None
    layers = list(layers)
    if source_inputs is None:
        if reuse:
            baseline = record_for_plan(model, role, inputs, layers, {}, memory_budget, need_acts, columns)
            return RecordedRuns(reuse, columns, baseline.last, baseline.acts, baseline=baseline)
        rows = rows_for_budget(model, inputs.shape[1], memory_budget)
        acts, last = record(model, role, inputs, layers if need_acts else [], rows)
        return RecordedRuns(reuse, columns, last, acts if need_acts else None)

    if reuse and one_forward(model, source_inputs, inputs):  # both runs recorded in one forward
        sources, source_last, baseline = record_pair(model, role, source_inputs, inputs, layers, columns)
        return RecordedRuns(reuse, columns, baseline.last, baseline.acts, sources, source_last, baseline)
    rows = rows_for_budget(model, source_inputs.shape[1], memory_budget)
    sources, source_last = record(model, role, source_inputs, layers, rows, last_only=reuse, columns=columns)
    if reuse:
        baseline = record_for_plan(model, role, inputs, layers, sources, memory_budget, need_acts, columns)
        return RecordedRuns(reuse, columns, baseline.last, baseline.acts, sources, source_last, baseline)
    acts, last = record(model, role, inputs, layers if need_acts else [], rows)
    return RecordedRuns(reuse, columns, last, acts if need_acts else None, sources, source_last)


def run_patches(
    model: AnyModel,
    plan: PatchPlan,
    metric: Any,
    *,
    reference: torch.Tensor | None = None,
    recorded: RecordedRuns | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    reuse: bool = True,
) -> tuple[torch.Tensor, PlanStats]:
    """Run every patched row of ``plan``, many rows per forward, and measure ``metric`` on each.

    Returns the ``[n_rows]`` metric values and how the plan ran. ``reference[input]`` is the
    logits a comparing metric (KL) measures an input's rows against. ``batch_size`` sets the rows
    per forward; otherwise they are sized to ``memory_budget`` bytes (default: a share of the
    free memory). With ``reuse`` (the default; only where ``recorded`` reused too) work a patch
    cannot change is done once, not once per row, with the same results; ``recorded`` (from
    :func:`record_runs`) hands over the unpatched run already recorded and the metric's columns.
    ``reuse=False`` runs every row through the whole model.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of rows, got {batch_size!r}")
    reuse = reuse and not model.remote and (recorded is None or recorded.reuse)
    n_inputs = plan.inputs.shape[0]

    def score(last: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return score_rows(metric, model, last, plan.input_rows[rows], n_inputs, reference)

    def in_full(rows: torch.Tensor) -> torch.Tensor:  # should a guard of reuse fail
        return patched_forward(model, plan, rows)

    if reuse and len(plan):
        baseline = None if recorded is None else recorded.baseline
        columns = metric_columns(model, metric) if recorded is None else recorded.columns
        return run_reusing(model, plan, score, in_full, batch_size, memory_budget, baseline, columns)
    return run_plain(model, plan, score, batch_size, memory_budget)


__all__ = ["RecordedRuns", "record_runs", "run_patches"]
