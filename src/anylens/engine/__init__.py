"""The batched patching engine: many patched runs of a model, a few forwards.

An experiment describes its patched runs as a :class:`PatchPlan` (one row per run: the input it
runs, the component it patches, the source written in), records the runs it needs with
:func:`record_runs` and hands the plan and a metric to :func:`run_patches`, the one entry point
that runs and scores them. Rows share forwards; with reuse, work a patch cannot change is done
once (:mod:`.reuse`). What the engine learns about a model lives in its :class:`EngineState`.

The engine builds on :mod:`anylens.core` only and knows no architecture.
"""

from .baseline import Baseline, record
from .final_position import (
    cut_to_final_position,
    final_logits,
    last_logits,
    last_logits_kwargs,
    last_mlp,
    metric_columns,
    read_last,
)
from .memory import rows_for_budget, steady_budget
from .metric_rows import score_rows
from .plan import (
    DIMS,
    HEADED_ROLES,
    Component,
    OverError,
    PatchPlan,
    PlanStats,
    check_over,
    enumerate_components,
    n_heads_of,
    normalize_positions,
)
from .run import RecordedRuns, record_runs, run_patches
from .scheduling import one_forward
from .state import EngineState, engine_state

__all__ = [
    "DIMS",
    "HEADED_ROLES",
    "Baseline",
    "Component",
    "EngineState",
    "OverError",
    "PatchPlan",
    "PlanStats",
    "RecordedRuns",
    "check_over",
    "cut_to_final_position",
    "engine_state",
    "enumerate_components",
    "final_logits",
    "last_logits",
    "last_logits_kwargs",
    "last_mlp",
    "metric_columns",
    "n_heads_of",
    "normalize_positions",
    "one_forward",
    "read_last",
    "record",
    "record_runs",
    "rows_for_budget",
    "steady_budget",
    "run_patches",
    "score_rows",
]
