"""Generation with interventions in one call: ``al.generate(model, prompts, max_new_tokens=N,
interventions=[...])``.

An intervention is either

* a callable ``fn(model)``, called inside every generated step, that reads and writes roles as
  in a trace (``model.z[1][:, -1, 2] = 0``); or
* a role edit, a dict ``{"role": "resid_post", "layer": 2, "add": vector}`` (or ``"set": value``),
  with optional ``"scale"`` (multiplies ``add``, default 1) and ``"positions"``: ``"all"``
  (default: every step), ``"prompt"`` (step 0, all prompt positions) or ``"generated"`` (the
  steps that read a generated token: 1 and later).

Each step of a generation is a forward of the model: step 0 reads the whole prompt, step ``k``
the token generated at step ``k - 1``. The last generated token is never read by the model, so
``"generated"`` edits change the tokens from the second one on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import InterventionError, SteeringVectorError
from ..core.generation_trace import Generated
from ..core.roles import LAYER_ROLES

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Which steps of a generation each ``positions`` choice edits.
POSITIONS = ("all", "prompt", "generated")

#: Roles whose last dimension is the residual-stream width.
_RESIDUAL_WIDTH = ("embed", "pos_embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mixer_out")


def role_shape(model: AnyModel, role: str) -> tuple[int, ...] | None:
    """The trailing shape of one position of ``role`` (``(d_model,)``, ``(n_heads, d_head)``),
    where the model's config states it; None otherwise."""
    if role in _RESIDUAL_WIDTH or role == "final_norm":
        return (model.d_model,)
    if role in ("z", "q"):
        return (model.n_heads, model.d_head)
    if role in ("k", "v"):
        return (model.n_kv_heads, model.d_head)
    return None


def steps_of(positions: str) -> Callable[[int], bool]:
    if positions not in POSITIONS:
        raise InterventionError(f"positions={positions!r}: choose one of {', '.join(map(repr, POSITIONS))}")
    return {"all": lambda step: True, "prompt": lambda step: step == 0, "generated": lambda step: step > 0}[positions]


@dataclass
class RoleEdit:
    """Add a vector to (or set) one role at one layer, at the steps ``positions`` chooses."""

    role: str
    layer: int | None
    add: torch.Tensor | None = None
    set: torch.Tensor | None = None
    positions: str = "all"

    def __post_init__(self) -> None:
        self._at = steps_of(self.positions)

    def __call__(self, model: AnyModel, step: int) -> None:
        if not self._at(step):
            return
        access = model.role(self.role)
        layer = self.layer
        if self.add is not None:
            current = access.read(layer)
            access.write(layer, current + self.add.to(device=current.device, dtype=current.dtype))
        else:
            access.write(layer, self.set)


def role_edit(model: AnyModel, spec: Mapping[str, Any]) -> RoleEdit:
    """A :class:`RoleEdit` from its dict form, checked against the model before anything runs."""
    known = {"role", "layer", "add", "set", "scale", "positions"}
    unknown = sorted(set(spec) - known)
    if unknown or "role" not in spec or (("add" in spec) == ("set" in spec)):
        raise InterventionError(
            f"role edit {dict(spec)!r}: give 'role', 'layer' (for per-layer roles) and exactly one of 'add' or "
            f"'set', optionally 'scale' and 'positions' ({', '.join(POSITIONS)})"
            + (f"; unknown keys {unknown}" if unknown else "")
        )
    role = spec["role"]
    model.role(role)  # a clear error for a role this model lacks
    layer = spec.get("layer")
    if role in LAYER_ROLES:
        if layer is None:
            raise InterventionError(f"role edit of {role!r} needs a 'layer' (0..{model.n_layers - 1})")
        layer = model.layer_index(layer)
    elif layer is not None:
        raise InterventionError(f"role {role!r} is one per model: leave 'layer' out of its edit")
    scale = spec.get("scale", 1.0)
    if "add" in spec:
        vector = check_vector(model, spec["add"], role) * float(scale)
        return RoleEdit(role, layer, add=vector, positions=spec.get("positions", "all"))
    if "scale" in spec:
        raise InterventionError("'scale' multiplies an 'add' vector; a 'set' edit takes the value itself")
    return RoleEdit(role, layer, set=torch.as_tensor(spec["set"]), positions=spec.get("positions", "all"))


def check_vector(model: AnyModel, vector: Any, role: str) -> torch.Tensor:
    """``vector`` as a float tensor of one position of ``role``, or :class:`SteeringVectorError`."""
    try:
        tensor = torch.as_tensor(vector)
    except (TypeError, ValueError, RuntimeError):
        raise SteeringVectorError(f"cannot use {type(vector).__name__} as a vector: give a tensor") from None
    if not tensor.is_floating_point():
        tensor = tensor.float()
    expected = role_shape(model, role)
    if expected is not None and tuple(tensor.shape) != expected:
        raise SteeringVectorError(
            f"a vector of shape {tuple(tensor.shape)} cannot be added to role {role!r} of {model.name!r}, whose "
            f"positions have shape {expected}: give a vector of that shape (e.g. from al.steering_vector on "
            "this model)"
        )
    return tensor


def as_interventions(model: AnyModel, interventions: Any) -> list[Callable[[AnyModel, int], None]]:
    """Each intervention as ``fn(model, step)``."""
    if interventions is None:
        return []
    if callable(interventions) or isinstance(interventions, Mapping):
        interventions = [interventions]
    chosen: list[Callable[[AnyModel, int], None]] = []
    for item in interventions if isinstance(interventions, Iterable) else [interventions]:
        if isinstance(item, RoleEdit):
            chosen.append(item)
        elif isinstance(item, Mapping):
            chosen.append(role_edit(model, item))
        elif callable(item):
            chosen.append(lambda model, step, fn=item: fn(model))
        else:
            raise InterventionError(
                f"{item!r} is not an intervention: give a callable fn(model) or a role edit such as "
                "{'role': 'resid_post', 'layer': 2, 'add': vector}"
            )
    return chosen


def generate(
    model: AnyModel,
    prompts: Any,
    *,
    max_new_tokens: int,
    interventions: Any = None,
    first_logits: bool = False,
    **kwargs: Any,
) -> Generated:
    """Generate from ``prompts`` (greedy unless ``do_sample=True``) with ``interventions`` applied
    at every step they choose; returns the tokens and text. ``first_logits=True`` also keeps the
    logits of the first generated token (``result.first_logits``, ``[batch, vocab]``)."""
    from ..core.model import AnyModel as _AnyModel

    if not isinstance(model, _AnyModel):
        from ..core.errors import NotWrappedError

        raise NotWrappedError(f"al.generate needs a model from al.load or al.wrap, got {type(model).__name__}")
    edits = as_interventions(model, interventions)
    kept: list[torch.Tensor] = []  # filled inside the block: only saved objects survive it
    with torch.no_grad(), model.generate(prompts, max_new_tokens=max_new_tokens, **kwargs) as gen:
        for edit in edits:
            edit(model, gen.step)
        if first_logits and gen.step == 0:
            kept.append(model.logits[:, -1].float().save())
    result = gen.output
    if first_logits:
        result.first_logits = kept[0].detach().cpu()
    return result


__all__ = ["POSITIONS", "RoleEdit", "as_interventions", "check_vector", "generate", "role_edit", "role_shape"]
