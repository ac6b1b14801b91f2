"""TransformerLens / SAELens hook names as aliases of roles.

``role_for_hook("blocks.10.hook_resid_post") == ("resid_post", 10)`` and back with
:func:`hook_for_role`, for code and sparse autoencoders keyed by those names. Inside a trace,
``model.role("blocks.3.hook_resid_post")`` is a :class:`HookPoint`: one role at one layer,
read with ``.read()`` (or ``.save()``) and written with ``.write(value)`` or item assignment.
The table of names lives in :mod:`anylens.core.tl_names`.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any

import torch

from .errors import HookNameError
from .tl_names import BLOCKS_PREFIX, LAYER_HOOK_ROLES, MODEL_HOOK_ROLES

if TYPE_CHECKING:
    from .access import RoleAccess

_LAYER_NAME = re.compile(rf"^{BLOCKS_PREFIX}\.(-?\d+)\.(.+)$")

#: Every supported name, per-layer ones with the ``{i}`` placeholder.
HOOK_NAMES: tuple[str, ...] = tuple(f"{BLOCKS_PREFIX}.{{i}}.{suffix}" for suffix in LAYER_HOOK_ROLES) + tuple(
    MODEL_HOOK_ROLES
)

#: role -> its hook name (``{i}`` for the layer), for the roles that have one.
ROLE_HOOK_NAMES: dict[str, str] = {role: name for name, role in MODEL_HOOK_ROLES.items()} | {
    role: f"{BLOCKS_PREFIX}.{{i}}.{suffix}" for suffix, role in LAYER_HOOK_ROLES.items()
}


def looks_like_hook_name(name: str) -> bool:
    """Whether ``name`` is written like a TransformerLens hook name (so an unknown one gets the
    hook names as suggestions, not the roles)."""
    return name.startswith(f"{BLOCKS_PREFIX}.") or "hook_" in name


def role_for_hook(name: str) -> tuple[str, int | None]:
    """The role and layer a hook name stands for: ``("resid_post", 10)``, or ``("embed", None)``
    for a model-level name. An unknown name raises :class:`HookNameError` listing the names."""
    if not isinstance(name, str):
        raise HookNameError(f"a hook name is a string such as 'blocks.0.hook_resid_post', got {name!r}")
    if name in MODEL_HOOK_ROLES:
        return MODEL_HOOK_ROLES[name], None
    match = _LAYER_NAME.match(name)
    if match and match.group(2) in LAYER_HOOK_ROLES:
        return LAYER_HOOK_ROLES[match.group(2)], int(match.group(1))
    raise HookNameError(_unknown(name))


def hook_for_role(role: str, layer: int | None = None) -> str:
    """The hook name of ``role`` at ``layer`` (``hook_for_role("resid_post", 10) ==
    "blocks.10.hook_resid_post"``); model-level roles take no layer."""
    if role not in ROLE_HOOK_NAMES:
        raise HookNameError(
            f"role {role!r} has no TransformerLens hook name; roles with one: {', '.join(ROLE_HOOK_NAMES)}"
        )
    template = ROLE_HOOK_NAMES[role]
    per_layer = "{i}" in template
    if per_layer and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise HookNameError(f"role {role!r} is per layer: give the layer, e.g. hook_for_role({role!r}, 0)")
    if not per_layer and layer is not None:
        raise HookNameError(f"role {role!r} is model-level: call hook_for_role({role!r}) without a layer")
    return template.replace("{i}", str(layer)) if per_layer else template


def _unknown(name: str) -> str:
    match = _LAYER_NAME.match(name)
    template = f"{BLOCKS_PREFIX}.{{i}}.{match.group(2)}" if match else name
    near = difflib.get_close_matches(template, HOOK_NAMES, n=1, cutoff=0.6)
    hint = ""
    if near:
        hint = f"did you mean {near[0].replace('{i}', match.group(1)) if match else near[0]!r}? "
    return f"{name!r} is not a supported TransformerLens hook name; {hint}supported names: {', '.join(HOOK_NAMES)}"


class HookPoint:
    """One role at one layer (or a model-level role), addressed by its hook name in a trace.

    ``point.read()`` (or ``point.save()``, ``point[item]``) gives the tensor, exactly what
    ``model.<role>[layer]`` gives; ``point.write(value)`` or ``point[item] = value`` writes it.
    """

    def __init__(self, name: str, access: RoleAccess, layer: int | None):
        self.name = name
        self.access = access
        self.layer = layer

    @property
    def role(self) -> str:
        return self.access.role

    def read(self) -> torch.Tensor:
        return self.access.read(self.layer)

    def write(self, value: Any) -> None:
        self.access.write(self.layer, value)

    def save(self) -> torch.Tensor:
        """The tensor, kept after the trace (nnsight's ``.save()`` of :meth:`read`)."""
        # In a trace read() gives nnsight's proxy, which has .save(); torch.Tensor's type does not.
        return self.read().save()  # type: ignore[attr-defined]

    def __getitem__(self, item: Any) -> torch.Tensor:
        return self.read()[item]

    def __setitem__(self, item: Any, value: Any) -> None:
        self.read()[item] = value

    def __repr__(self) -> str:
        where = "" if self.layer is None else f"[{self.layer}]"
        return f"<hook {self.name} = {self.role}{where}: {self.access.path.text}>"
