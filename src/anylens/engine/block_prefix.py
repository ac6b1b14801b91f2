"""Modules of a block that return before a role is reached, which a patch there cannot change.

A sweep with reuse skips the blocks before a batch's first block ``b0`` (:mod:`.reuse`). Within
block ``b0`` too, every module that returns before the role's module starts sees the unpatched
run: a ``z`` patch leaves the block's norm and query/key/value projections as they were, an MLP
patch its whole attention sublayer. The unpatched run records those modules' outputs once, and
each batch hands them back instead of running them.

Which modules qualify is learned from the model, not from its architecture: one forward with
plain torch hooks records when each module under the block list starts and returns. A module
qualifies if it runs once per forward, returns before the role's module starts, and returns a
tensor laid out ``[batch, position, ...]`` (alone, or leading a tuple with no other tensors), so
that its output can be cut to a batch's rows and positions. Of nested qualifying modules only the
outermost is kept; a module whose output cannot be cut is passed over for its children. A model
the probe forward fails on gets no prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .final_position import last_logits_kwargs
from .state import engine_state

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Inputs of the probe forward: two rows (a batch-1 value such as a rotary table must not pass
#: for per-row output) of a few tokens.
PROBE_SHAPE = (2, 5)


@dataclass
class CallOrder:
    """When each module under the block list started and returned in one forward (event indices),
    how often it ran, and how many elements per position its output has (0: not cuttable)."""

    start: dict[str, int]
    end: dict[str, int]
    calls: dict[str, int]
    width: dict[str, int]


def call_order(model: AnyModel) -> CallOrder:
    """The probe forward's call order of the modules under the model's block list (cached)."""
    state = engine_state(model)
    if state.call_order is None:
        state.call_order = _probe(model)
    return state.call_order


def _probe(model: AnyModel) -> CallOrder:
    prefix = model.adapter.layers + "."
    order = CallOrder({}, {}, {}, {})
    events = [0]
    batch, length = PROBE_SHAPE

    def started(name: str):
        def hook(module, args):
            order.start.setdefault(name, events[0])
            order.calls[name] = order.calls.get(name, 0) + 1
            events[0] += 1

        return hook

    def returned(name: str):
        def hook(module, args, output):
            order.end[name] = events[0]
            order.width[name] = per_position_width(output, batch, length)
            events[0] += 1

        return hook

    handles = []
    try:
        for name, module in model.hf.named_modules():
            if name.startswith(prefix):
                handles.append(module.register_forward_pre_hook(started(name)))
                handles.append(module.register_forward_hook(returned(name)))
        ids = torch.arange(3, 3 + batch * length, device=model.device).view(batch, length) % max(model.d_vocab, 1)
        with torch.no_grad():
            model.hf(ids, **last_logits_kwargs(model))
    except Exception:
        return CallOrder({}, {}, {}, {})
    finally:
        for handle in handles:
            handle.remove()
    return order


def per_position_width(output: Any, batch: int, length: int) -> int:
    """Elements per position of a ``[batch, length, ...]`` output (alone or leading a tuple with
    no other tensors), which a skip can hand back cut to rows and positions; 0 for any other
    layout (e.g. a block that flattens tokens: positions cannot be cut)."""
    lead = output[0] if isinstance(output, (tuple, list)) and output else output
    if not isinstance(lead, torch.Tensor) or lead.dim() < 2 or tuple(lead.shape[:2]) != (batch, length):
        return 0
    if isinstance(output, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in output[1:]):
        return 0
    return lead[0, 0].numel()


def prefix_modules(model: AnyModel, role: str, layer: int, block: int) -> tuple[str, ...]:
    """The outermost modules of block ``block`` that return before ``role`` at ``layer`` is
    reached, in the order they run; empty where none qualify or prefixes are off for the model."""
    state = engine_state(model)
    if state.prefix_off_reason is not None or getattr(model, "remote", None):
        return ()
    known = state.prefixes  # asked for each layer, several times per sweep
    if (role, layer, block) not in known:
        known[role, layer, block] = _outermost_before(model, role, layer, block)
    return known[role, layer, block]


def _outermost_before(model: AnyModel, role: str, layer: int, block: int) -> tuple[str, ...]:
    order = call_order(model)
    target = model.role(role).path.torch_module_path(layer)
    if target not in order.start:
        return ()
    inside = f"{model.adapter.layers}.{block}."
    before = sorted(
        (order.start[name], name)
        for name in order.end
        if name.startswith(inside) and order.calls.get(name) == 1 and order.end[name] < order.start[target]
    )
    chosen: list[str] = []
    for _, name in before:
        if order.width[name] and not any(name.startswith(outer + ".") for outer in chosen):
            chosen.append(name)
    return tuple(chosen)


def prefix_width(model: AnyModel, modules: dict[int, tuple[str, ...]]) -> int:
    """Elements per position of every module output in ``modules`` (block -> module paths)."""
    order = call_order(model) if any(modules.values()) else None
    return sum(order.width[name] for names in modules.values() for name in names) if order else 0


__all__ = [
    "CallOrder",
    "call_order",
    "per_position_width",
    "prefix_modules",
    "prefix_width",
]
