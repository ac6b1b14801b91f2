"""Activation patching: copy one component's activation between a clean and a corrupt run.

Denoising patches clean activations into the corrupt run (which components restore the clean
behaviour?); noising patches corrupt activations into the clean run (which ones break it?).
Every patched run is a row of a batch: the run's prompt is repeated along the batch and each row
carries its own patch, so a sweep costs a few forwards, not one per patch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.errors import PromptError
from ..core.operations import only_role_operations
from ..engine import (
    PatchPlan,
    check_over,
    enumerate_components,
    record_runs,
    run_patches,
    score_rows,
)
from . import metrics as metrics_
from .alignment import AUTO
from .answers import teacher_forcing
from .pair_groups import Grouping, group_pairs, run_in_groups
from .prompts import Prompts, paired
from .renamed import renamed
from .results import ComparesRuns, Result

if TYPE_CHECKING:
    from ..core.model import AnyModel

DIRECTIONS = ("denoise", "noise")


@dataclass(repr=False)
class PatchResult(ComparesRuns, Result):
    """A patching (or attribution) sweep: one row per component, with the metric and its score.

    Columns: the swept dimensions (``layer``, ``head``, ``pos``), ``token`` at ``pos`` in the run
    being patched, ``metric`` (the patched run's metric, averaged over prompt pairs) and
    ``normalized`` = (metric - corrupt) / (clean - corrupt): 0 is corrupt behaviour, 1 clean.
    """


@dataclass
class PairedRuns:
    """Clean and corrupt token ids, which one is patched, and which positions pair up."""

    clean: torch.Tensor  # [n_pairs, T_clean]
    corrupt: torch.Tensor  # [n_pairs, T_corrupt]
    direction: str
    target_positions: list[int]  # positions of the patched run
    source_positions: list[int]  # the matching positions of the run activations come from
    labels: dict[int, str] | None = None  # target position -> the name it was asked for by

    @property
    def patched(self) -> torch.Tensor:
        """The run that receives patches: corrupt when denoising, clean when noising."""
        return self.corrupt if self.direction == "denoise" else self.clean

    @property
    def source(self) -> torch.Tensor:
        return self.clean if self.direction == "denoise" else self.corrupt

    @property
    def n_pairs(self) -> int:
        return self.clean.shape[0]


def prepare_pairs(
    model: AnyModel,
    clean: Prompts,
    corrupt: Prompts,
    direction: str = "denoise",
    align: Any = None,
    positions: Any = None,
    grouping: Grouping | None = None,
) -> PairedRuns:
    """Tokenize prompt pairs and work out which positions are patched from where.

    Every pair must patch the same positions (see :mod:`.pair_positions`); ``patch`` and
    ``attribute`` split a list whose pairs do not into groups first (:mod:`.pair_groups`) and
    pass that ``grouping`` on, so that the pairs are not resolved a second time.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: use 'denoise' (clean into corrupt) or 'noise' (corrupt into clean)")
    if grouping is None:
        grouping = group_pairs(model, clean, corrupt, direction, align, positions)
    if len(grouping.groups) > 1:
        raise PromptError(
            f"these prompt pairs fall into {len(grouping.groups)} groups of different token lengths or patched "
            "positions, which cannot share a batch: patch each group, or use al.patch / al.attribute, which do"
        )
    grouping.warn(stacklevel=6)  # Grouping.warn, here, patch or attribute, and their two wrappers
    clean_ids, corrupt_ids = paired(model, clean, corrupt, align=AUTO)  # lengths were checked pair by pair
    n_pairs = max(clean_ids.shape[0], corrupt_ids.shape[0])
    clean_ids = clean_ids.expand(n_pairs, -1)
    corrupt_ids = corrupt_ids.expand(n_pairs, -1)
    chosen = grouping.positions[0]
    labels = {t: label for t, label in zip(chosen.target, chosen.labels) if label is not None}
    return PairedRuns(clean_ids, corrupt_ids, direction, list(chosen.target), list(chosen.source), labels)


@renamed()
@only_role_operations("role")
def patch(
    model: AnyModel,
    clean: Prompts,
    corrupt: Prompts,
    *,
    role: str = "resid_pre",
    over: Sequence[str] = ("layer", "pos"),
    metric: Any = None,
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | str | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    align: Any = None,
    normalize: bool = True,
    per_prompt: bool = False,
    reuse: bool = True,
) -> PatchResult:
    """Patch every component of ``role`` over ``over`` and measure ``metric`` at the last position.

    ``metric`` defaults to KL divergence from the clean run. ``clean`` and ``corrupt`` are one
    prompt each or lists of pairs (the metric is averaged over pairs; ``per_prompt=True`` keeps a
    row per pair). Prompts must have the same number of tokens unless ``align`` pairs positions
    up: ``"auto"`` (common prefix and suffix, and the differing spans' last tokens; see
    :func:`anylens.show_alignment`), ``(clean_positions, corrupt_positions)``, or a list with one
    of those per pair; ``pos`` is then a position of the patched run. ``positions`` may name
    positions the pairs define (``["S2", "END"]``); rows carry ``pos_label``, the name or the
    token. Pairs whose lengths or positions differ are patched a group at a time, and their rows
    matched by ``pos_label`` (see docs/experiments.md).
    ``batch_size`` sets the patched runs per forward; otherwise they are sized to
    ``memory_budget`` bytes (default: a share of the free memory). ``reuse`` (on by default)
    computes once what a patch cannot change — blocks before the patched layer, positions before
    the patched position, patches that write the values already there — with the same results;
    ``reuse=False`` runs every patched row through the whole model.
    """
    role = model.first_role(role)  # a list: the first role this model has
    over = check_over(model, role, over)
    metric = metrics_.resolve(metric, clean)
    grouping = group_pairs(model, clean, corrupt, direction, align, positions) if direction in DIRECTIONS else None
    if grouping is not None and len(grouping.groups) > 1:  # pairs that cannot share a batch
        grouping.warn(stacklevel=5)
        options = dict(role=role, direction=direction, layers=layers, positions=positions, batch_size=batch_size)
        options.update(memory_budget=memory_budget, reuse=reuse)
        value = "normalized" if normalize else "metric"
        return run_in_groups(
            patch, model, clean, corrupt, grouping, metric=metric, align=align, over=over, per_prompt=per_prompt,
            normalize=normalize, value=value, **options,
        )  # fmt: skip
    runs = prepare_pairs(model, clean, corrupt, direction, align, positions, grouping)
    layer_list = model.layers(layers)
    components = enumerate_components(model, role, over, layer_list, runs.target_positions)

    values, clean_values, corrupt_values, steps = patched_values(
        model, runs, role, layer_list, components, metric, batch_size, memory_budget, reuse
    )
    stats, reused = steps[0].stats, steps[0].reuse
    normalizer = (clean_values, corrupt_values) if normalize else None
    frame = sweep_frame(model, components, over, runs.patched, {"metric": values}, per_prompt, normalizer, runs.labels)
    meta = sweep_meta(model, role, over, metric, runs, clean_values, corrupt_values, align)
    meta.update(
        patches=sum(m.stats.patches for m in steps),
        forwards=sum(m.stats.forwards for m in steps),
        patches_per_forward=stats.patches_per_forward,
        reuse=reused,
        unchanged=sum(m.stats.unchanged for m in steps),
        work_fraction=stats.work_fraction,
    )
    if len(steps) > 1:
        meta["teacher_forced_runs"] = len(steps)
    return PatchResult("patch", frame, meta, value="normalized" if normalize else "metric")


def patched_values(
    model: AnyModel,
    runs: PairedRuns,
    role: str,
    layer_list: list[int],
    components: list,
    metric: Any,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    reuse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[_Measured]]:
    """The patched metric of each of ``components`` per pair ``[components, pairs]``, the clean
    and corrupt runs' metric ``[pairs]``, and the sweeps that measured them: one, or one per
    answer token of a multi-token answer (see :mod:`.answers`)."""

    def measure(runs: PairedRuns, metric: Any) -> _Measured:
        return _measure(model, runs, role, layer_list, components, metric, batch_size, memory_budget, reuse)

    forced = teacher_forcing(metric, model, runs.n_pairs)
    if forced is None:
        steps = [measure(runs, metric)]
        return steps[0].values, steps[0].clean, steps[0].corrupt, steps
    steps = [measure(forced.runs(runs, step), step.metric) for step in forced.steps]
    values, clean, corrupt = (
        forced.total([getattr(m, part) for m in steps]) for part in ("values", "clean", "corrupt")
    )
    if forced.exp:
        values, clean, corrupt = values.exp(), clean.exp(), corrupt.exp()
    return values, clean, corrupt, steps


@dataclass
class _Measured:
    """One patching sweep's metric values ``[components, pairs]``, its clean and corrupt runs'
    values ``[pairs]``, how it ran, and whether it reused work."""

    values: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    stats: Any
    reuse: bool


def _measure(
    model: AnyModel,
    runs: PairedRuns,
    role: str,
    layer_list: list[int],
    components: list,
    metric: Any,
    batch_size: int | None,
    memory_budget: int | None,
    reuse: bool,
) -> _Measured:
    direction = runs.direction
    recorded = record_runs(
        model,
        role,
        layer_list,
        runs.patched,
        metric,
        source_inputs=runs.source,
        memory_budget=memory_budget,
        reuse=reuse,
    )
    source_last, patched_last = recorded.source_last, recorded.unpatched_last
    clean_last, corrupt_last = (source_last, patched_last) if direction == "denoise" else (patched_last, source_last)
    n_pairs = runs.n_pairs
    every_pair = torch.arange(n_pairs)
    clean_values = score_rows(metric, model, clean_last, every_pair, n_pairs, clean_last).float().cpu()
    corrupt_values = score_rows(metric, model, corrupt_last, every_pair, n_pairs, clean_last).float().cpu()

    # Rows are component-major: row = component * n_pairs + pair.
    plan = PatchPlan(
        role=role,
        inputs=runs.patched,
        components=[c for c in components for _ in range(n_pairs)],
        input_rows=every_pair.repeat(len(components)),
        source_rows=every_pair.repeat(len(components)),
        sources=recorded.sources,
        target_positions=runs.target_positions,
        source_positions=runs.source_positions,
    )
    values, stats = run_patches(
        model,
        plan,
        metric,
        reference=clean_last,
        recorded=recorded,
        batch_size=batch_size,
        memory_budget=memory_budget,
        reuse=reuse,
    )
    return _Measured(values.reshape(len(components), n_pairs), clean_values, corrupt_values, stats, recorded.reuse)


# -- tidy output, shared with attribution -----------------------------------------------------
def sweep_frame(
    model: AnyModel,
    components: list,
    over: tuple[str, ...],
    patched_ids: torch.Tensor,
    columns: dict[str, torch.Tensor],
    per_prompt: bool = False,
    normalize: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: dict[int, str] | None = None,
) -> pd.DataFrame:
    """One row per component (or per component and prompt), with the given value columns.

    Each column is ``[n_components, n_prompts]`` and is averaged over prompts unless
    ``per_prompt``. ``normalize=(clean, corrupt)`` (each ``[n_prompts]``) adds ``normalized``,
    computed from the averages (or per prompt). ``patched_ids`` are the patched run's tokens,
    ``[T]`` or ``[n_prompts, T]``: per prompt, each row's ``token`` is its own prompt's.
    ``labels`` names positions (``pos_label``; the token where a position has no name).
    """
    if not per_prompt:
        columns = {name: value.mean(1, keepdim=True) for name, value in columns.items()}
    if normalize is not None:
        clean, corrupt = (v[None, :] if per_prompt else v.mean().reshape(1, 1) for v in normalize)
        columns["normalized"] = _normalized(columns["metric"], clean, corrupt)
    n_prompts = next(iter(columns.values())).shape[1]

    def each_row(values: list) -> list:  # component-major, a row per prompt within each
        return [value for value in values for _ in range(n_prompts)]

    data: dict[str, Any] = {"layer": each_row([c.layer for c in components])}
    if "head" in over:
        data["head"] = each_row([c.head for c in components])
    if "pos" in over:
        data["pos"] = each_row([c.pos for c in components])
        ids = patched_ids if patched_ids.dim() == 2 else patched_ids[None]
        tokens = [model.to_str_tokens(row) for row in (ids if per_prompt else ids[:1])]
        data["token"] = [tokens[p if per_prompt else 0][c.pos] for c in components for p in range(n_prompts)]
        # The name a position was asked for by, else its token: how rows of prompts of different
        # lengths are matched (sweep aggregates group by it).
        names = labels or {}
        data["pos_label"] = [
            names.get(c.pos, tokens[p if per_prompt else 0][c.pos]) for c in components for p in range(n_prompts)
        ]
    if per_prompt:
        data["prompt"] = list(range(n_prompts)) * len(components)
    for name, value in columns.items():
        data[name] = value.detach().double().cpu().reshape(-1).numpy()
    return pd.DataFrame(data)


def _normalized(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """The normalised score; NaN (with a warning) where clean and corrupt do not differ."""
    gap = (clean - corrupt).expand_as(patched)
    flat = gap.abs() < 1e-8
    if flat.any():
        warnings.warn(
            "clean and corrupt runs give the same metric value for some prompt pairs, so their normalised "
            "score is undefined (NaN); choose prompts or a metric that tell the runs apart",
            stacklevel=3,
        )
    score = (patched - corrupt) / torch.where(flat, torch.ones_like(gap), gap)
    return torch.where(flat, torch.full_like(score, float("nan")), score)


def sweep_meta(
    model: AnyModel,
    role: str,
    over: tuple[str, ...],
    metric: Any,
    runs: PairedRuns,
    clean_values: torch.Tensor,
    corrupt_values: torch.Tensor,
    align: Any,
) -> dict[str, Any]:
    clean_tokens, corrupt_tokens = model.to_str_tokens(runs.clean[0]), model.to_str_tokens(runs.corrupt[0])
    return {
        "model": model.name,
        "adapter": model.adapter.name,
        "role": role,
        "over": list(over),
        "metric": getattr(metric, "name", type(metric).__name__),
        "metric_spec": repr(metric),
        "direction": runs.direction,
        "tokens": corrupt_tokens if runs.direction == "denoise" else clean_tokens,  # the patched run
        "clean_tokens": clean_tokens,
        "corrupt_tokens": corrupt_tokens,
        "n_prompts": runs.n_pairs,
        "clean_metric": float(clean_values.mean()),
        "corrupt_metric": float(corrupt_values.mean()),
        "clean_metric_per_prompt": clean_values.tolist(),
        "corrupt_metric_per_prompt": corrupt_values.tolist(),
        "align": None if align is None else _align_meta(runs),
        "position_names": sorted(set((runs.labels or {}).values())),
    }


def _align_meta(runs: PairedRuns) -> dict[str, list[int]]:
    if runs.direction == "denoise":
        return {"clean": runs.source_positions, "corrupt": runs.target_positions}
    return {"clean": runs.target_positions, "corrupt": runs.source_positions}


__all__ = ["DIRECTIONS", "PairedRuns", "PatchResult", "patch", "patched_values", "prepare_pairs"]
