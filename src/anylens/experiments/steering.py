"""Steering: add a direction to a role while the model generates.

* :func:`steering_vector` — the difference of the mean activations over two prompt sets at one
  position (contrastive activation addition): ``mean(role | positive) - mean(role | negative)``.
* :func:`steer` — generate with ``scale * vector`` added to the role at a layer.
* :func:`steering_sweep` — steer over layers x scales and score each run with a metric on the
  logits of the first generated token; a tidy :class:`~anylens.experiments.results.Result`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.errors import InterventionError, NotWrappedError, PromptError, SteeringVectorError
from ..core.generation_trace import Generated
from ..core.positions import one_position
from . import metrics as metrics_module
from .generation import RoleEdit, check_vector, generate, steps_of
from .prompts import as_batch
from .renamed import renamed
from .results import Result

if TYPE_CHECKING:
    from ..core.model import AnyModel


def _wrapped(model: Any, what: str) -> AnyModel:
    from ..core.model import AnyModel

    if not isinstance(model, AnyModel):
        raise NotWrappedError(f"{what} needs a model from al.load or al.wrap, got {type(model).__name__}")
    return model


def _role_at(model: AnyModel, prompts: Any, role: str, layer: int | None, position: int) -> torch.Tensor:
    """``role`` at ``position`` of each prompt, ``[batch, ...]`` in float32.

    Prompts are left-padded, so a negative position counts from each prompt's end; a
    non-negative one is shifted past each prompt's padding.
    """
    batch = as_batch(prompts)
    encoded = (
        {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
        if isinstance(batch, torch.Tensor)
        else model.to_tokens(batch)
    )
    lengths = encoded["attention_mask"].sum(-1)
    width = encoded["input_ids"].shape[1]
    shortest = int(lengths.min())
    if not -shortest <= position < shortest:
        raise PromptError(
            f"position {position} is outside the shortest prompt ({shortest} tokens): choose a position in "
            f"{-shortest}..{shortest - 1} (-1 is every prompt's last token)"
        )
    rows = torch.arange(len(lengths))
    columns = torch.full_like(lengths, width + position) if position < 0 else (width - lengths) + position
    access = model.role(role)
    read: list[torch.Tensor] = []  # filled inside the trace: only saved objects survive it
    with torch.no_grad(), model.trace(dict(encoded)):
        value = access.read(layer)
        read.append(value[rows.to(value.device), columns.to(value.device)].float().save())
    return read[0].detach().cpu()


@renamed(position="positions")
def steering_vector(
    model: AnyModel,
    positive: Any,
    negative: Any,
    *,
    layer: int | None = None,
    role: str = "resid_post",
    positions: int = -1,
) -> torch.Tensor:
    """``mean(role[layer] at positions | positive) - mean(... | negative)``, float32 on the CPU.

    ``positive`` and ``negative`` are prompts (a string, a list, or token ids); ``positions``
    (one position, or a list of one) indexes each prompt's own tokens (-1: its last token,
    whatever its length).
    """
    position = one_position(positions, InterventionError, "a steering vector is read at one position (give an int)")
    model = _wrapped(model, "al.steering_vector")
    model.role(role)
    if role in _layer_roles() and layer is None:
        raise InterventionError(f"role {role!r} is per layer: give layer= (0..{model.n_layers - 1})")
    layer = model.layer_index(layer) if role in _layer_roles() else None
    difference = _role_at(model, positive, role, layer, position).mean(0)
    return difference - _role_at(model, negative, role, layer, position).mean(0)


def _layer_roles() -> tuple[str, ...]:
    from ..core.roles import LAYER_ROLES

    return LAYER_ROLES


def steer(
    model: AnyModel,
    prompts: Any,
    vector: Any,
    *,
    layer: int | None = None,
    scale: float = 1.0,
    positions: str = "all",
    max_new_tokens: int = 10,
    role: str = "resid_post",
    **kwargs: Any,
) -> Generated:
    """Generate from ``prompts`` with ``scale * vector`` added to ``role`` at ``layer``.

    ``positions``: ``"all"`` (every step), ``"prompt"`` (the prompt's positions only) or
    ``"generated"`` (only the generated tokens the model reads back, from the second new token
    on). Returns the output (``.text``, ``.tokens``, ``.new_tokens``), with ``.first_logits``,
    the logits the first new token was chosen from.
    """
    model = _wrapped(model, "al.steer")
    edit = _edit(model, vector, role, layer, scale, positions)
    return generate(model, prompts, max_new_tokens=max_new_tokens, interventions=[edit], first_logits=True, **kwargs)


def _edit(model: AnyModel, vector: Any, role: str, layer: int | None, scale: float, positions: str) -> RoleEdit:
    model.role(role)  # a clear error for a role this model lacks, before the vector's shape
    steps_of(positions)
    if role in _layer_roles() and layer is None:
        raise InterventionError(f"role {role!r} is per layer: give layer= (0..{model.n_layers - 1})")
    layer = model.layer_index(layer) if role in _layer_roles() else None
    return RoleEdit(role, layer, add=check_vector(model, vector, role) * float(scale), positions=positions)


def steering_sweep(
    model: AnyModel,
    prompts: Any,
    vector: Any,
    *,
    layers: Iterable[int] | None = None,
    scales: Sequence[float] = (1.0,),
    metric: Any = None,
    positions: str = "all",
    role: str = "resid_post",
    vector_position: int = -1,
    max_new_tokens: int = 1,
) -> Result:
    """Steer ``prompts`` at every layer x scale and score each run.

    ``vector``: one vector used at every layer, or ``(positive, negative)`` prompts from which
    :func:`steering_vector` builds each layer's own vector (at ``vector_position``). ``metric``: a
    metric object (``al.metrics.top1(" Paris")`` for the rate at which the first generated token
    is " Paris", ``al.metrics.logit_diff(...)``, ...), a metric name whose words come from prompt
    pairs, or None for the KL divergence from the unsteered next-token distribution; it is
    computed on the logits of the first generated token. One row per (layer, scale, prompt) with
    ``value`` and the generated ``text``; ``meta["baseline"]`` holds the unsteered mean value.
    """
    model = _wrapped(model, "al.steering_sweep")
    chosen_layers = model.layers(layers)
    metric = metrics_module.resolve(metric, prompts)
    model.role(role)
    steps_of(positions)
    pairs = _as_pairs(vector)
    shared = check_vector(model, vector, role) if pairs is None else None
    batch = as_batch(prompts)
    texts = None if isinstance(batch, torch.Tensor) else list(batch)
    baseline = generate(model, prompts, max_new_tokens=max_new_tokens, first_logits=True)
    clean = baseline.first_logits
    baseline_value = metric(clean, model, clean_logits=clean).float()
    rows = []
    for layer in chosen_layers:
        at_layer = (
            shared
            if pairs is None
            else steering_vector(model, *pairs, layer=layer, role=role, positions=vector_position)
        )
        for scale in scales:
            out = steer(
                model, prompts, at_layer, layer=layer, scale=scale, positions=positions, max_new_tokens=max_new_tokens
            )
            values = metric(out.first_logits, model, clean_logits=clean).float()
            for index, (value, text) in enumerate(zip(values.tolist(), out.text)):
                rows.append(
                    {
                        "model": model.name,
                        "layer": layer,
                        "scale": float(scale),
                        "prompt": index,
                        "value": value,
                        "text": text,
                    }
                )
    meta = {
        "model": model.name,
        "role": role,
        "metric": getattr(metric, "name", type(metric).__name__),
        "over": ["layer", "scale"],
        "positions": positions,
        "max_new_tokens": max_new_tokens,
        "baseline": float(baseline_value.mean()),
        "baseline_text": baseline.text,
        "prompts": texts,
        "value_label": getattr(metric, "name", "value"),
    }
    return Result("steering_sweep", pd.DataFrame(rows), meta)


def _as_pairs(value: Any) -> tuple[Any, Any] | None:
    """``(positive, negative)`` prompt sets, or None for a vector."""
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_prompts(side) for side in value):
        return value[0], value[1]
    if isinstance(value, (tuple, list)) and value and all(isinstance(x, (int, float)) for x in value):
        return None
    raise SteeringVectorError(
        f"cannot steer with {type(value).__name__} {value!r:.80}: give a vector (a tensor) or a pair "
        "(positive_prompts, negative_prompts)"
    )


def _is_prompts(side: Any) -> bool:
    return isinstance(side, str) or (isinstance(side, (list, tuple)) and all(isinstance(p, str) for p in side))


__all__ = ["steer", "steering_sweep", "steering_vector"]
