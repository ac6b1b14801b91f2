"""The attention pattern: which operation inside the attention forward computes it.

The pattern is not a module output: it lives inside the attention forward, or inside an attention
function the forward calls (chosen at run time in transformers). nnsight's source view names every
operation there; candidates are softmax and dropout operations, each read on a real trace and kept
if it is ``[batch, heads, query, key]``, sums to 1 over keys, and is causal.
"""

from __future__ import annotations

import builtins
import inspect
import re
from typing import Any

import torch

from ..core.access import descend
from .structure import TOL, close

#: A call of a name or dotted name, not of a method on an expression (``x.view(...)``).
_CALL = re.compile(r"(?<![\w.)\]])([A-Za-z_][\w.]*)\s*\(")


def _softmax_like(name: str) -> bool:
    return "softmax" in name or "dropout" in name


def pattern_options(
    nn_model: Any, modules: list[str], block: str, ids: torch.Tensor, n_heads: int
) -> list[tuple[str, torch.Tensor]]:
    """Operations whose output is the attention pattern, with their values on layer 0.

    ``modules`` are searched in turn (paths relative to ``block``, e.g. the attention module and the
    module owning its query projection). Candidates are softmax and dropout operations in each
    forward, or inside a function it calls that computes a softmax (an attention implementation
    chosen at run time is drilled into too). Each is read on a real trace and kept if it is
    ``[batch, heads, query, key]``, sums to 1 over keys and is causal. Options are returned as
    ``<module>.source.<op>[.source.<op>]`` relative to the block, later operations (a dropout
    after the softmax) first.
    """
    found: list[tuple[str, torch.Tensor]] = []
    for module_path in modules:
        envoy = descend(nn_model, f"{block}.{module_path}")
        try:
            source = envoy.source
            names = list(source.names)
        except Exception:
            continue
        options = [f"source.{n}" for n in names if _softmax_like(n)]
        module = nn_model._module.get_submodule(f"{block}.{module_path}")
        for name in _drill_candidates(module, source, names)[:4]:
            inner = _drill(nn_model, envoy, name, ids)
            options += [f"source.{name}.source.{n}" for n in inner if _softmax_like(n)]
        good = []
        for option in options:
            value = _read_op(nn_model, envoy, option, ids)
            if _is_pattern(value, ids.shape, n_heads):
                good.append((f"{module_path}.{option}", value))
        found += reversed(good)
        if found:
            break
    return found


def _drill_candidates(module: torch.nn.Module, source: Any, names: list[str]) -> list[str]:
    """Calls in the forward to Python functions that compute a softmax, or chosen at run time."""
    text = source.compiled.source.split("\n")
    forward_globals = getattr(inspect.unwrap(type(module).forward), "__globals__", {})
    out = []
    for name in names:
        base = re.sub(r"_\d+$", "", name)
        line = source.compiled.lines.get(name)
        if line is None:
            continue
        snippet = "\n".join(text[max(line - 1, 0) : line + 1])
        callees = [m for m in _CALL.findall(snippet) if m.replace(".", "_") == base]
        if not callees:
            continue  # an assignment, not a call
        target = _resolve(module, forward_globals, callees[0])
        if isinstance(target, torch.nn.Module):
            continue
        if target is None:
            out.append(name)  # a local variable: an implementation chosen at run time
            continue
        try:
            body = inspect.getsource(target)
        except (TypeError, OSError):
            continue
        if "softmax" in body:
            out.append(name)
    return out


def _resolve(module: torch.nn.Module, globals_: dict, dotted: str) -> Any:
    parts = dotted.split(".")
    if parts[0] == "self":
        node: Any = module
    elif parts[0] in globals_:
        node = globals_[parts[0]]
    elif hasattr(builtins, parts[0]):
        return False  # isinstance, hasattr, ...: never an attention implementation
    else:
        # a bare local name is a function chosen at run time; a method of a local object is not
        return None if len(parts) == 1 else False
    for part in parts[1:]:
        node = getattr(node, part, None)
        if node is None:
            return False  # unresolvable attribute: not worth drilling
    return node


def _drill(nn_model: Any, envoy: Any, name: str, ids: torch.Tensor) -> list[str]:
    found: list[str] = []
    try:
        with nn_model.trace(ids):
            found.extend(getattr(envoy.source, name).source.names)
    except Exception:
        return []
    return found


def _read_op(nn_model: Any, envoy: Any, option: str, ids: torch.Tensor) -> torch.Tensor | None:
    saved: list[Any] = []
    try:
        with nn_model.trace(ids):
            node = envoy
            for part in option.split("."):
                node = getattr(node, part)
            saved.append(node.output.save())
    except Exception:
        return None
    value = saved[0] if saved else None
    return value if isinstance(value, torch.Tensor) else None


def _is_pattern(value: torch.Tensor | None, shape: torch.Size, n_heads: int) -> bool:
    batch, pos = shape
    if value is None or tuple(value.shape) != (batch, n_heads, pos, pos):
        return False
    value = value.detach().float()
    if not close(value.sum(-1), torch.ones_like(value.sum(-1))):
        return False
    future = torch.triu(torch.ones(pos, pos, dtype=torch.bool, device=value.device), diagonal=1)
    return float(value[..., future].abs().max()) <= TOL
