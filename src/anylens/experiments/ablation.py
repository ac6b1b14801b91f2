"""Ablation: knock out one component at a time and measure how far the metric moves.

Three ways to knock out a component's activation:

* ``zero`` — replace it with zeros;
* ``mean`` — replace it with its mean over a reference batch, per position (``mean_over="batch"``)
  or over every position too (``mean_over="positions"``);
* ``resample`` — replace it with the activation of another prompt of the reference batch, chosen
  by a seeded random permutation.

Ablated runs are batched like patching: each batch row carries one ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import PromptError
from ..core.operations import only_role_operations
from ..engine import (
    PatchPlan,
    check_over,
    enumerate_components,
    normalize_positions,
    record,
    record_runs,
    run_patches,
    score_rows,
)
from . import metrics as metrics_
from .answers import teacher_forcing
from .pair_positions import named_indices
from .patching import sweep_frame
from .prompts import Prompts, tokenize_aligned
from .renamed import renamed
from .results import Result

if TYPE_CHECKING:
    from ..core.model import AnyModel

METHODS = ("zero", "mean", "resample")
MEAN_OVER = ("batch", "positions")


@dataclass(repr=False)
class AblationResult(Result):
    """One row per component: ``metric`` after ablation, ``baseline`` without, ``value`` = the change."""

    @property
    def baseline(self) -> float:
        return self.meta["baseline"]


@renamed()
@only_role_operations("role")
def ablate(
    model: AnyModel,
    prompts: Prompts,
    *,
    role: str = "z",
    over: Sequence[str] = ("layer", "head"),
    method: str = "zero",
    metric: Any = None,
    reference: Prompts | None = None,
    mean_over: str = "batch",
    seed: int = 0,
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | str | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    per_prompt: bool = False,
    reuse: bool = True,
) -> AblationResult:
    """Ablate every component of ``role`` over ``over``; ``value`` = ablated - unablated metric.

    ``metric`` defaults to KL divergence from the unablated run. ``reference`` is the batch that
    means and resampled activations come from (default: ``prompts``); without one, ``resample``
    gives every prompt the activations of a different prompt of ``prompts``. Prompts must share
    a token length (and the reference too, unless ``mean_over="positions"``). ``reuse`` (on by
    default) skips the blocks before each ablated layer and, where an ablation leaves earlier
    positions alone, those positions, and computes only the logits ``metric`` reads, with the same
    results; ``reuse=False`` runs every ablated row through the whole model.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {METHODS}")
    if mean_over not in MEAN_OVER:
        raise ValueError(f"mean_over={mean_over!r}: use 'batch' (a mean per position) or 'positions' (one mean)")
    role = model.first_role(role)  # a list: the first role this model has
    over = check_over(model, role, over)
    metric = metrics_.resolve(metric, prompts)
    ids = tokenize_aligned(model, prompts)
    n_prompts, length = ids.shape
    if method == "mean" and mean_over == "batch" and reference is None and bool((ids == ids[:1]).all()):
        # The per-position mean over copies of one prompt is that prompt: the "ablation" would change nothing.
        raise PromptError(
            f"mean ablation needs at least two different prompts, or a reference batch to take the mean over: "
            f"the per-position mean over {'one prompt' if n_prompts == 1 else f'{n_prompts} copies of one prompt'} is "
            "that prompt itself, so nothing would be ablated; pass more prompts, reference=[...] prompts, or "
            "mean_over='positions'"
        )
    layer_list = model.layers(layers)
    positions, labels = named_indices(prompts, positions, length)  # names the prompts define, as indices
    targets = list(range(length)) if positions is None else normalize_positions(positions, length, "prompt")
    components = enumerate_components(model, role, over, layer_list, targets)

    run_options = {"batch_size": batch_size, "memory_budget": memory_budget, "reuse": reuse}

    def ablated(inputs: torch.Tensor, metric: Any, recorded: Any, sources: Any, source_of_prompt: Any) -> _Ablated:
        return _ablated(
            model, role, inputs, components, targets, metric, recorded, sources, source_of_prompt, **run_options
        )

    def recorded_run(inputs: torch.Tensor, metric: Any) -> Any:
        return record_runs(
            model, role, layer_list, inputs, metric, need_acts=True, memory_budget=memory_budget, reuse=reuse
        )

    def replacements(acts: dict[int, torch.Tensor]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        return _replacements(model, role, method, acts, ids, reference, mean_over, seed, layer_list)

    forced = teacher_forcing(metric, model, n_prompts)
    if forced is None:
        recorded = recorded_run(ids, metric)
        sources, source_of_prompt = replacements(recorded.unpatched_acts)
        steps = [ablated(ids, metric, recorded, sources, source_of_prompt)]
        values, baseline = steps[0].values, steps[0].baseline
    else:  # an answer of several tokens: one run per answer token (see .answers)
        # What is written in comes from the prompts alone: appended answer tokens enter no mean.
        sources, source_of_prompt = replacements(record(model, role, ids, layer_list)[0])
        steps = []
        for step in forced.steps:
            inputs = torch.cat([ids[step.pairs], step.appended.to(ids.dtype)], 1)
            part = ablated(
                inputs, step.metric, recorded_run(inputs, step.metric), sources, source_of_prompt[step.pairs]
            )
            steps.append(part)
        values, baseline = (forced.total([getattr(m, part) for m in steps]) for part in ("values", "baseline"))
        if forced.exp:
            values, baseline = values.exp(), baseline.exp()
    stats, recorded_reuse = steps[0].stats, steps[0].reuse
    base = baseline[None, :].expand_as(values)
    columns = {"metric": values, "baseline": base, "value": values - base}
    frame = sweep_frame(model, components, over, ids, columns, per_prompt, labels=labels)
    meta = {
        "model": model.name,
        "adapter": model.adapter.name,
        "role": role,
        "over": list(over),
        "method": method,
        "mean_over": mean_over if method == "mean" else None,
        "seed": seed if method == "resample" else None,
        "resample_sources": source_of_prompt.tolist() if method == "resample" else None,
        "metric": getattr(metric, "name", type(metric).__name__),
        "metric_spec": repr(metric),
        "tokens": model.to_str_tokens(ids[0]),
        "n_prompts": n_prompts,
        "baseline": float(baseline.mean()),
        "baseline_per_prompt": baseline.tolist(),
        "patches": sum(m.stats.patches for m in steps),
        "forwards": sum(m.stats.forwards for m in steps),
        "patches_per_forward": stats.patches_per_forward,
        "reuse": recorded_reuse,
        "unchanged": sum(m.stats.unchanged for m in steps),
        "work_fraction": stats.work_fraction,
    }
    if forced is not None:
        meta["teacher_forced_runs"] = len(steps)
    return AblationResult("ablate", frame, meta, value="value")


@dataclass
class _Ablated:
    """One ablation sweep: the ablated metric ``[components, prompts]``, the unablated metric
    ``[prompts]``, how it ran, and whether it reused work."""

    values: torch.Tensor
    baseline: torch.Tensor
    stats: Any
    reuse: bool


def _ablated(
    model: AnyModel,
    role: str,
    ids: torch.Tensor,
    components: list,
    targets: list[int],
    metric: Any,
    recorded: Any,
    sources: dict[int, torch.Tensor],
    source_of_prompt: torch.Tensor,
    *,
    batch_size: int | None,
    memory_budget: int | None,
    reuse: bool,
) -> _Ablated:
    n_prompts = ids.shape[0]
    baseline_last = recorded.unpatched_last
    every_prompt = torch.arange(n_prompts)
    baseline = score_rows(metric, model, baseline_last, every_prompt, n_prompts, baseline_last).float().cpu()
    plan = PatchPlan(
        role=role,
        inputs=ids,
        components=[c for c in components for _ in range(n_prompts)],
        input_rows=every_prompt.repeat(len(components)),
        source_rows=source_of_prompt.repeat(len(components)),
        sources=sources,
        target_positions=targets,
        source_positions=targets,
    )
    values, stats = run_patches(
        model,
        plan,
        metric,
        reference=baseline_last,
        recorded=recorded,
        batch_size=batch_size,
        memory_budget=memory_budget,
        reuse=reuse,
    )
    return _Ablated(values.reshape(len(components), n_prompts), baseline, stats, recorded.reuse)


def _replacements(
    model: AnyModel,
    role: str,
    method: str,
    acts: dict[int, torch.Tensor],
    ids: torch.Tensor,
    reference: Prompts | None,
    mean_over: str,
    seed: int,
    layers: list[int],
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per layer, the activations written in; and which of their rows each prompt takes."""
    n_prompts = ids.shape[0]
    take_first = torch.zeros(n_prompts, dtype=torch.long)
    if method == "zero":
        return {layer: torch.zeros_like(acts[layer][:1]) for layer in layers}, take_first

    reference_acts = acts
    if reference is not None:
        reference_ids = tokenize_aligned(model, reference)
        if reference_ids.shape[1] != ids.shape[1] and not (method == "mean" and mean_over == "positions"):
            raise PromptError(
                f"the reference prompts have {reference_ids.shape[1]} tokens but the prompts have {ids.shape[1]}: "
                "positions must match to take per-position means or resampled activations; use reference prompts "
                "of the same token length (or method='mean', mean_over='positions')"
            )
        reference_acts, _ = record(model, role, reference_ids, layers)
    n_reference = next(iter(reference_acts.values())).shape[0]

    if method == "mean":
        pos_dim = 2 if role == "pattern" else 1  # pattern is [batch, head, query, key]
        dims = (0,) if mean_over == "batch" else (0, pos_dim)
        return {layer: reference_acts[layer].mean(dim=dims, keepdim=True) for layer in layers}, take_first

    generator = torch.Generator().manual_seed(seed)
    if reference is None:
        if n_prompts < 2:
            raise PromptError("resample ablation needs at least two prompts, or a reference batch to resample from")
        source = _random_derangement(n_prompts, generator)
    else:
        source = torch.randint(n_reference, (n_prompts,), generator=generator)
    return reference_acts, source


def _random_derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded permutation with no fixed point: every prompt takes another prompt's activations.

    Visiting the prompts in a random order and giving each the next one's activations forms a
    single cycle, so nobody is paired with itself.
    """
    order = torch.randperm(n, generator=generator)
    source = torch.empty(n, dtype=torch.long)
    source[order] = order.roll(-1)
    return source


__all__ = ["METHODS", "AblationResult", "ablate"]
