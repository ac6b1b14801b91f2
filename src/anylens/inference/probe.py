"""One plain forward pass with a hook on every module: what each module read and returned.

Inference compares these recordings by value (which module's output is what a layer adds to its
residual stream, which module's input is the residual after attention, ...). Plain PyTorch hooks
keep this cheap: one forward for the whole model, no tracing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Call:
    """One module's part in a forward pass (its first call; ``calls`` counts them all)."""

    path: str
    start: int  # position in call order (pre-hook)
    end: int  # position in completion order (hook)
    input: torch.Tensor | None  # first positional argument, else first keyword (as nnsight's ``.input``)
    output: torch.Tensor | None  # the output, or the first element of a tuple output
    tuple_output: bool
    calls: int = 1


@dataclass
class Recording:
    """Every module call of one forward pass, and the model's output logits."""

    calls: dict[str, Call]
    logits: torch.Tensor

    def get(self, path: str) -> Call | None:
        return self.calls.get(path)

    def inside(self, prefix: str) -> list[Call]:
        """Calls of modules strictly below ``prefix``, in call order."""
        start = prefix + "."
        return sorted((c for p, c in self.calls.items() if p.startswith(start)), key=lambda c: c.start)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a role would read: the value itself, or the first element of a tuple/list."""
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    if hasattr(value, "last_hidden_state"):  # model outputs of nested base models
        value = value.last_hidden_state
    return value.detach().clone() if isinstance(value, torch.Tensor) else None


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def record(
    model: torch.nn.Module,
    ids: torch.Tensor,
    edit_inputs: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    only: set[str] | None = None,
) -> Recording:
    """Run ``model(ids)`` once, recording every module call (or only the modules in ``only``).

    ``edit_inputs`` maps module paths to functions that replace that module's first input
    (used to test whether a module mixes information across positions).
    """
    calls: dict[str, Call] = {}
    counter = {"start": 0, "end": 0}
    handles = []
    edit_inputs = edit_inputs or {}

    def pre_hook(path: str):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            counter["start"] += 1
            if path in calls:
                calls[path].calls += 1
                return None
            edit = edit_inputs.get(path)
            if edit is not None:
                args, kwargs = _replace_first(args, kwargs, edit)
            calls[path] = Call(path, counter["start"], -1, first_tensor(_first_input(args, kwargs)), None, False)
            return (args, kwargs) if edit is not None else None

        return hook

    def post_hook(path: str):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            counter["end"] += 1
            call = calls[path]
            if call.end < 0:
                call.end = counter["end"]
                call.output = first_tensor(output)
                call.tuple_output = isinstance(output, (tuple, list))

        return hook

    for path, module in model.named_modules():
        if not path or (only is not None and path not in only):
            continue
        handles.append(module.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(path), with_kwargs=True))
    try:
        with torch.no_grad():
            output = model(ids)
    finally:
        for handle in handles:
            handle.remove()
    logits = output.logits if hasattr(output, "logits") else output[0]
    return Recording(calls, logits.detach().float().clone())


def _replace_first(args: tuple, kwargs: dict, edit: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
    if args:
        return (edit(args[0]),) + tuple(args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: edit(kwargs[key])}
