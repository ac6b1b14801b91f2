"""Attribution patching: a first-order estimate of every patch from one backward pass.

The effect of patching a component is estimated as ``grad · (source - activation)``: the
gradient of the metric on the run being patched (the corrupt run when denoising) times the
difference the patch would make, summed over the component's features. Two forward passes
(source and patched run) and one backward pass cover every component at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.operations import only_role_operations
from ..engine import (
    HEADED_ROLES,
    check_over,
    cut_to_final_position,
    enumerate_components,
    last_logits,
    last_logits_kwargs,
    last_mlp,
    metric_columns,
    one_forward,
    read_last,
    record,
    score_rows,
)
from . import metrics as metrics_
from .answers import teacher_forcing
from .linearity import check_verify, verify_estimate
from .pair_groups import group_pairs, run_in_groups
from .patching import DIRECTIONS, PairedRuns, PatchResult, prepare_pairs, sweep_frame, sweep_meta
from .prompts import Prompts
from .renamed import renamed

if TYPE_CHECKING:
    from ..core.model import AnyModel


def role_gradients(
    model: AnyModel,
    ids: torch.Tensor,
    role: str,
    metric: Any,
    layers: Sequence[int] | None = None,
    reference_last: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """Activations of ``role``, the gradient of ``metric`` (summed over prompts) with respect to
    them, and the final-position logits: one forward and one backward pass.

    The gradient is taken with respect to a zero perturbation added to the role, so every
    use of the activation downstream counts, including roles that are views of a module's
    input (per-head ``z``) or tensors shared with the residual stream (``resid_mid``).
    """
    run = _gradient_run(model, ids, None, role, metric, sorted(model.layers(layers)), reference_last)
    return run.acts, run.grads, run.last


@dataclass
class _GradientRun:
    acts: dict[int, torch.Tensor]
    grads: dict[int, torch.Tensor]
    last: torch.Tensor
    rider_acts: dict[int, torch.Tensor] | None = None  # the no-grad rows run along, if any
    rider_last: torch.Tensor | None = None


def _gradient_run(
    model: AnyModel,
    ids: torch.Tensor,
    riders: torch.Tensor | None,
    role: str,
    metric: Any,
    layer_list: list[int],
    reference_last: torch.Tensor | None,
    riders_are_reference: bool = False,
) -> _GradientRun:
    """:func:`role_gradients` of ``ids``; ``riders`` (same shape) run first in the same forward,
    their activations and logits recorded but not differentiated. With ``riders_are_reference``
    each rider's logits are the reference of the row at the same index of ``ids``.
    """
    access = model.role(role)
    columns = metric_columns(model, metric)
    mlp_cut = last_mlp(model, role, layer_list)
    n_riders = 0 if riders is None else riders.shape[0]
    inputs = ids if riders is None else torch.cat([riders, ids])
    acts: dict[int, torch.Tensor] = {}
    perturbations: dict[int, torch.Tensor] = {}
    with torch.enable_grad():
        # Final-position logits only: the metric reads nothing else, so the rest is wasted both ways.
        with model.trace(inputs.to(model.device), **last_logits_kwargs(model)):
            for layer in layer_list:  # ascending: reads follow the forward order
                value, zeros = access.perturb(layer)  # rider rows get a zero gradient
                acts[layer] = value.detach().clone().save()
                perturbations[layer] = zeros.save()
            cut_to_final_position(model, mlp_cut)
            saved = read_last(model, columns)
        last = last_logits(model, saved, columns)
        rider_last = last[:n_riders].detach()
        if riders_are_reference:
            reference_last = rider_last
        last = last[n_riders:]
        n = ids.shape[0]
        values = score_rows(metric, model, last, torch.arange(n), n, reference_last)
        inputs = [perturbations[layer] for layer in layer_list]
        grads = torch.autograd.grad(values.sum(), inputs, allow_unused=True)
    gradients = {
        layer: access.view_of(torch.zeros_like(zeros) if grad is None else grad, layer)[n_riders:].detach()
        for layer, zeros, grad in zip(layer_list, inputs, grads)
    }
    run = _GradientRun({layer: act[n_riders:] for layer, act in acts.items()}, gradients, last.detach())
    if riders is not None:
        run.rider_acts = {layer: act[:n_riders] for layer, act in acts.items()}
        run.rider_last = rider_last
    return run


@renamed()
@only_role_operations("role")
def attribute(
    model: AnyModel,
    clean: Prompts,
    corrupt: Prompts,
    *,
    role: str = "z",
    over: Sequence[str] = ("layer", "head"),
    metric: Any = None,
    direction: str = "denoise",
    layers: Sequence[int] | None = None,
    positions: Sequence[int | str] | str | None = None,
    align: Any = None,
    normalize: bool = True,
    per_prompt: bool = False,
    verify: int | None = None,
) -> PatchResult:
    """Estimate :func:`anylens.patch` for every component of ``role`` from gradients.

    Arguments mean what they mean for ``patch`` (``align="auto"``, named ``positions`` and lists of
    pairs of different lengths included). The frame's ``estimate`` is the estimated
    patched metric minus the unpatched run's metric (patched - corrupt when denoising),
    ``metric`` the estimated patched metric, and ``normalized`` its normalised score.
    ``metric`` defaults to KL divergence from the clean run (whose gradient vanishes on the clean
    run itself, so give a target metric when noising). ``verify=k`` patches the ``k`` components of
    largest ``|estimate|`` exactly and puts the correlations in ``meta["verify"]``, with a
    :class:`~anylens.LinearityWarning` when Pearson r is under 0.5 (:mod:`.linearity`).
    """
    verify = check_verify(verify)
    role = model.first_role(role)  # a list: the first role this model has
    over = check_over(model, role, over)
    metric = metrics_.resolve(metric, clean)
    grouping = group_pairs(model, clean, corrupt, direction, align, positions) if direction in DIRECTIONS else None
    if grouping is not None and len(grouping.groups) > 1:  # pairs that cannot share a batch
        grouping.warn(stacklevel=5)
        value = "normalized" if normalize else "estimate"
        return run_in_groups(
            attribute, model, clean, corrupt, grouping, metric=metric, align=align, over=over, per_prompt=per_prompt,
            normalize=normalize, value=value, role=role, direction=direction, layers=layers, positions=positions,
            verify=verify,
        )  # fmt: skip
    runs = prepare_pairs(model, clean, corrupt, direction, align, positions, grouping)
    layer_list = model.layers(layers)
    components = enumerate_components(model, role, over, layer_list, runs.target_positions)

    forced = teacher_forcing(metric, model, runs.n_pairs)
    if forced is None:
        steps = [_estimate(model, runs, role, layer_list, components, metric)]
        estimate, clean_values, corrupt_values = steps[0].estimate, steps[0].clean, steps[0].corrupt
    else:  # an answer of several tokens: one run per answer token, their estimates summed (see .answers)
        steps = [_estimate(model, forced.runs(runs, s), role, layer_list, components, s.metric) for s in forced.steps]
        estimate, clean_values, corrupt_values = (
            forced.total([getattr(m, part) for m in steps]) for part in ("estimate", "clean", "corrupt")
        )
    unpatched = corrupt_values if direction == "denoise" else clean_values
    if forced is not None and forced.exp:  # a probability exp(S): first order, d exp(S) = exp(S) dS
        estimate = unpatched.exp()[None, :] * estimate
        clean_values, corrupt_values, unpatched = clean_values.exp(), corrupt_values.exp(), unpatched.exp()

    columns = {"metric": unpatched[None, :] + estimate, "estimate": estimate}
    normalizer = (clean_values, corrupt_values) if normalize else None
    frame = sweep_frame(model, components, over, runs.patched, columns, per_prompt, normalizer, runs.labels)
    meta = sweep_meta(model, role, over, metric, runs, clean_values, corrupt_values, align)
    forwards = sum(1 if m.fused else 2 for m in steps)
    meta.update(method="attribution patching", forwards=forwards, backwards=len(steps), components=len(components))
    if forced is not None:
        meta["teacher_forced_runs"] = len(forced.steps)
    if verify is not None:
        meta["verify"] = verify_estimate(model, runs, role, layer_list, components, metric, estimate, unpatched, verify)
    return PatchResult("attribute", frame, meta, value="normalized" if normalize else "estimate")


@dataclass
class _Estimated:
    """One attribution pass: the estimate ``[components, pairs]``, the clean and corrupt runs'
    metric values ``[pairs]``, and whether source and patched runs shared a forward."""

    estimate: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    fused: bool


def _estimate(
    model: AnyModel, runs: PairedRuns, role: str, layer_list: list[int], components: list, metric: Any
) -> _Estimated:
    denoise = runs.direction == "denoise"  # the source run is the clean run
    ordered = sorted(layer_list)
    fused = one_forward(model, runs.source, runs.patched)
    if fused:  # the source run's rows ride along; when denoising they are the clean reference
        run = _gradient_run(model, runs.patched, runs.source, role, metric, ordered, None, riders_are_reference=denoise)
        sources, source_last = run.rider_acts, run.rider_last
    else:
        sources, source_last = record(model, role, runs.source, layer_list, last_only=True)
        run = _gradient_run(model, runs.patched, None, role, metric, ordered, source_last if denoise else None)
    acts, grads = run.acts, run.grads
    clean_last, corrupt_last = (source_last, run.last) if denoise else (run.last, source_last)

    n_pairs = runs.n_pairs
    every_pair = torch.arange(n_pairs)
    clean_values = score_rows(metric, model, clean_last, every_pair, n_pairs, clean_last).detach().float().cpu()
    corrupt_values = score_rows(metric, model, corrupt_last, every_pair, n_pairs, clean_last).detach().float().cpu()
    per_layer = {
        layer: _contributions(
            role, grads[layer], acts[layer], sources[layer], runs.target_positions, runs.source_positions
        )
        for layer in layer_list
    }
    estimate = _component_values(per_layer, components, runs.target_positions).float().cpu()  # [components, pairs]
    return _Estimated(estimate, clean_values, corrupt_values, fused)


def _contributions(
    role: str,
    grad: torch.Tensor,
    act: torch.Tensor,
    source: torch.Tensor,
    target_positions: list[int],
    source_positions: list[int],
) -> torch.Tensor:
    """``grad · (source - act)`` at the patched positions: ``[pairs, positions, heads?]``.

    Summed over features (d_model, d_head, keys of a pattern); the head dimension is kept for
    roles that have heads, and positions are those in ``target_positions``, in that order.
    """
    pos_dim = 2 if role == "pattern" else 1  # pattern is [batch, head, query, key]
    index = torch.tensor(target_positions, device=act.device)
    source_index = torch.tensor(source_positions, device=source.device)
    delta = source.index_select(pos_dim, source_index).to(act.device) - act.index_select(pos_dim, index)
    terms = grad.index_select(pos_dim, index).float() * delta.float()
    if role == "pattern":
        terms = terms.transpose(1, 2)  # -> [batch, query, head, key]
    keep = 3 if role in HEADED_ROLES else 2
    return terms.flatten(keep).sum(-1) if terms.dim() > keep else terms


def _component_values(
    per_layer: dict[int, torch.Tensor], components: list, target_positions: list[int]
) -> torch.Tensor:
    """Every component's estimate per prompt pair, ``[components, pairs]``, in one gather: each
    layer's contributions get a slot after the last position (and head) holding their sum, and a
    component picks its position and head, or that slot where it covers them all."""
    layers = sorted(per_layer)
    widened = []
    for layer in layers:
        value = per_layer[layer]  # [pairs, positions, heads?]
        value = torch.cat([value, value.sum(1, keepdim=True)], 1)
        if value.dim() > 2:
            value = torch.cat([value, value.sum(2, keepdim=True)], 2)
        widened.append(value)
    stacked = torch.stack(widened)  # [layers, pairs, positions + 1, (heads + 1)?]
    n_positions = len(target_positions)
    layer = torch.tensor([layers.index(c.layer) for c in components], device=stacked.device)
    pos = [n_positions if c.pos is None else target_positions.index(c.pos) for c in components]
    pos = torch.tensor(pos, device=stacked.device)
    if stacked.dim() == 3:
        return stacked[layer, :, pos]
    head = torch.tensor([stacked.shape[3] - 1 if c.head is None else c.head for c in components], device=stacked.device)
    return stacked[layer, :, pos, head]


__all__ = ["attribute", "role_gradients"]
