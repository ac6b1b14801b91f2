"""Reading and writing one role inside an nnsight trace.

This is the one place where module outputs are normalised (tuple or bare tensor) and where
per-head views are taken, so that a read and a write of the same role always agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import ModulePathError, OutputStructureError, RoleWriteError
from .spec import RolePath

if TYPE_CHECKING:
    from .model import AnyModel


def child_envoy(node: Any, part: str) -> Any:
    """The envoy of a submodule by name or index.

    Looked up in the envoy's own child table first: a submodule named like an envoy property (BERT's
    ``attention.output``) would otherwise resolve to the property (the module's output) instead.
    """
    if part.isdigit():
        return node[int(part)]
    child = getattr(node, "_child_map", {}).get(part)
    return child if child is not None else getattr(node, part)


def descend(node: Any, path: str) -> Any:
    """The envoy at a dotted path below ``node`` (``node`` itself for "")."""
    for part in path.split(".") if path else ():
        node = child_envoy(node, part)
    return node


def envoy_at(model: AnyModel, path: str) -> Any:
    """The nnsight envoy of the wrapped model's module at a dotted path."""
    return descend(model.nn, path)


def selection_problem(value: Any, key: str | int) -> str | None:
    """Why ``key`` cannot be taken from a module's input or output ``value`` (None when it can)."""
    if isinstance(key, int):
        if isinstance(value, torch.Tensor):  # an index would silently take batch row `key`
            return f"the value is a bare tensor of shape {tuple(value.shape)}, not a tuple: drop the index"
        if not isinstance(value, (tuple, list)):
            return f"the value is a {type(value).__name__}, not a tuple"
        if not -len(value) <= key < len(value):
            return f"the value is a tuple of {len(value)} elements (indices 0..{len(value) - 1})"
        return None
    if not hasattr(value, key):
        fields = list(value.keys()) if hasattr(value, "keys") else []
        return f"the value ({type(value).__name__}) has no field {key!r}" + (f"; fields: {fields}" if fields else "")
    return None


class RoleAccess:
    """One role of one wrapped model: resolves its path, normalises, views, writes."""

    def __init__(self, model: AnyModel, role: str, path: RolePath):
        self.model = model
        self.role = role
        self.path = path

    # -- resolution --------------------------------------------------------------------------
    def envoy(self, layer: int | None) -> Any:
        if self.path.steps_into_operations:  # its module may run plain in this block
            self.model._operations.ensure(self.path.torch_module_path(layer))
        return envoy_at(self.model, self.path.module_at(layer))

    def _raw(self, layer: int | None) -> Any:
        value = getattr(self.envoy(layer), self.path.io)
        if self.path.select:
            return self.select(value)
        return self._primary(value, layer)

    def select(self, value: Any) -> Any:
        """The element of a module's input or output that the path selects (``output.0``,
        ``output.logits``), or an error naming the adapter, the role and what the value holds."""
        for key in self.path.select:
            problem = selection_problem(value, key)
            if problem:
                raise ModulePathError(
                    f"adapter {self.model.adapter.name!r}, role {self.role!r}: path {self.path.text!r} selects "
                    f"{key!r}, but {problem}; fix the role path in the adapter"
                )
            value = value[key] if isinstance(key, int) else getattr(value, key)
        return value

    def _primary(self, value: Any, layer: int | None) -> Any:
        """The tensor a module contributes, whether it returns a tuple or a bare tensor.

        Never ``value[0]`` on a tensor: that would silently take batch row 0.
        """
        structure = "tuple" if isinstance(value, (tuple, list)) else "tensor"
        seen = self.model._structures.setdefault(self.role, (structure, layer))
        if seen[0] != structure:
            raise OutputStructureError(
                f"role {self.role!r} of adapter {self.model.adapter.name!r}: the module at layer {seen[1]} returned a "
                f"{seen[0]} but the module at layer {layer} returned a {structure}. Point the role at a module whose "
                "output has the same structure at every layer, or select an element explicitly ('....output.0')."
            )
        if structure == "tuple":
            return value[0]
        return value

    # -- views -------------------------------------------------------------------------------
    def _view(self, tensor: torch.Tensor, layer: int | None) -> torch.Tensor:
        view = self.path.view
        if view is None:
            return tensor
        model = self.model
        if view == "heads":
            return tensor.unflatten(-1, (model.n_heads, model.d_head))
        if view == "kv_heads":
            return tensor.unflatten(-1, (model.n_kv_heads, model.d_head))
        if view.startswith("qkv_fused:"):
            which = view.split(":")[1]
            q_width, kv_width = model.n_heads * model.d_head, model.n_kv_heads * model.d_head
            start = {"q": 0, "k": q_width, "v": q_width + kv_width}[which]
            width = q_width if which == "q" else kv_width
            heads = model.n_heads if which == "q" else model.n_kv_heads
            return tensor[..., start : start + width].unflatten(-1, (heads, model.d_head))
        if view.startswith("qkv_interleaved:"):
            part = "qkv".index(view.split(":")[1])
            d = model.d_head
            return tensor.unflatten(-1, (model.n_heads, 3 * d))[..., part * d : (part + 1) * d]
        if view == "tokens":
            return tensor.unflatten(0, model._token_shape(layer))
        raise AssertionError(view)  # RolePath.parse rejects unknown views

    # -- public ------------------------------------------------------------------------------
    def read(self, layer: int | None) -> torch.Tensor:
        return self._view(self._raw(layer), layer)

    def _in_place(self) -> bool:
        """Whether writes go into the tensor itself: a field of the output, or the residual stream
        taken as a module's input. The residual must be written in place because other code
        holds the same tensor: ``resid_mid`` is ``ln_2``'s input *and* the residual the MLP
        output is added to; swapping it would change only what the norm sees."""
        return bool(self.path.select) or (self.path.io == "input" and self.role.startswith("resid"))

    def _through_view(self) -> bool:
        """Whether writes go through a view of the tensor handed on (heads, a fused ``q``)."""
        return self.path.view is not None and not self._in_place()

    def write(self, layer: int | None, value: Any) -> None:
        if self._in_place():
            target = self.read(layer)
            target.copy_(self._conform(value, target))
        elif not self._through_view():
            self._swap(layer, lambda current: self._conform(value, current))
        else:
            # A view (heads of ``o_proj``'s input, ``q`` of a fused projection): write it into a
            # copy and hand the module the copy. Writing into the tensor itself would change the
            # output of the operation that made it, which autograd may have saved (sdpa does).
            def through_view(current: torch.Tensor) -> torch.Tensor:
                fresh = current.clone()
                target = self._view(fresh, layer)
                target.copy_(self._conform(value, target))
                return fresh

            self._swap(layer, through_view)

    def perturb(self, layer: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a zero tensor that requires grad to the role at ``layer``, for everything the model
        computes from it; return the role's value and that tensor, whose gradient (read through
        :meth:`view_of`) is the gradient with respect to the role.

        A view's zeros are added to the whole tensor it is cut from: one addition, where writing
        ``value + zeros`` through the view would copy that tensor and copy into the copy.
        """
        if not self._through_view():
            value = self.read(layer)
            zeros = torch.zeros_like(value).requires_grad_(True)
            self.write(layer, value + zeros)
            return value, zeros
        added: dict[str, torch.Tensor] = {}

        def add_zeros(current: torch.Tensor) -> torch.Tensor:
            added["zeros"] = torch.zeros_like(current).requires_grad_(True)
            added["value"] = self._view(current, layer)
            return current + added["zeros"]

        self._swap(layer, add_zeros)
        return added["value"], added["zeros"]

    def view_of(self, tensor: torch.Tensor, layer: int | None) -> torch.Tensor:
        """``tensor``, shaped like what :meth:`perturb` added to, seen as the role."""
        return self._view(tensor, layer) if self._through_view() else tensor

    def _swap(self, layer: int | None, replace: Any) -> None:
        envoy = self.envoy(layer)
        current = getattr(envoy, self.path.io)
        if isinstance(current, (tuple, list)):
            self._primary(current, layer)
            replacement = (replace(current[0]),) + tuple(current[1:])
            setattr(envoy, self.path.io, type(current)(replacement) if isinstance(current, list) else replacement)
        else:
            self._primary(current, layer)
            setattr(envoy, self.path.io, replace(current))

    def _conform(self, value: Any, target: torch.Tensor) -> torch.Tensor:
        if isinstance(value, torch.Tensor) and value.is_meta and not target.is_meta:
            raise RoleWriteError(
                f"cannot write a tensor on the meta device to role {self.role!r}: it has a shape "
                f"{tuple(value.shape)} but no data; write a real tensor (e.g. torch.zeros(..., device=model.device))"
            )
        value = torch.as_tensor(value).to(device=target.device, dtype=target.dtype)
        if value.shape == target.shape:  # the usual case; broadcast_shapes costs a Python walk
            return value
        try:
            shape = torch.broadcast_shapes(value.shape, target.shape)
        except RuntimeError:
            shape = None
        if shape != target.shape:
            raise RoleWriteError(
                f"cannot write a tensor of shape {tuple(value.shape)} to role {self.role!r} of shape "
                f"{tuple(target.shape)}; write a tensor of that shape (or one that broadcasts to it)"
            )
        return value.expand(target.shape).contiguous() if value.shape != target.shape else value
