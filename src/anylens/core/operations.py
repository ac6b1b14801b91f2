"""Operation-level hooks, switched on only where a trace can use them.

A role path that steps into a module's operations (``...attn.source.<op>``, as ``pattern``
does) needs nnsight to hook every operation of that module's forward. anylens opens those
modules when it wraps a model, because opening one inside a trace is too late once its forward
has begun. The hooks then cost every trace of the model a few hundred handoffs per forward,
whether it reads an operation or not.

:class:`OperationHooks` keeps each opened module's hooked forward and its plain one, and lets a
block of code that knows the roles it touches run the other modules plain
(:meth:`only_for`). A role that steps into operations switches its module back on when it is
accessed (:meth:`ensure`), which is in time whenever the access comes before the module runs:
reads and writes follow the forward's order.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import NotWrappedError

try:  # the attribute nnsight keeps a module's forward state under
    from nnsight.intervention.source import STATE as _STATE
except ImportError:  # pragma: no cover - an nnsight without it: modules stay hooked
    _STATE = None


# module -> its hooked forward. Kept outside the model object: nnsight serialises a model that a
# remote trace's code refers to, and a dynamically compiled forward cannot be serialised.
_hooked_forwards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(module: Any) -> Any:
    return module.__dict__.get(_STATE) if _STATE is not None else None


class OperationHooks:
    """The operation-hooked modules of one model, by the module path that opened them."""

    def __init__(self) -> None:
        self._modules: dict[str, Any] = {}

    def adopt(self, path: str, module: Any) -> None:
        """Remember ``module``'s hooked forward, if nnsight has opened its operations."""
        state = _state(module)
        if state is not None and getattr(state, "sourced", False) and hasattr(state, "original"):
            _hooked_forwards.setdefault(module, state.body)
            self._modules[path] = module

    def ensure(self, path: str) -> None:
        """Hook the operations of the module at ``path`` again, if a block turned them off."""
        module = self._modules.get(path)
        if module is not None:
            _state(module).body = _hooked_forwards[module]

    @contextmanager
    def only_for(self, keep: Iterable[str]) -> Iterator[None]:
        """Within the block, modules not in ``keep`` run their plain forward; restored after."""
        keep = set(keep)
        states = {path: _state(module) for path, module in self._modules.items()}
        before = {path: state.body for path, state in states.items()}
        for path, state in states.items():
            if path not in keep:
                state.body = state.original
        try:
            yield
        finally:
            for path, state in states.items():
                state.body = before[path]


def only_role_operations(*parameters: str) -> Callable[[Callable], Callable]:
    """Run an experiment ``fn(model, ...)`` with operation hooks on only for the roles given in
    its arguments ``parameters`` (each a role name or a list of them; None, meaning every role,
    leaves every hook on). A model anylens has not wrapped raises :class:`NotWrappedError`."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            model = bound.arguments["model"]
            if not hasattr(model, "operation_hooks_only_for"):
                raise NotWrappedError(
                    f"{fn.__name__} needs a model from anylens.load or anylens.wrap, not a "
                    f"{type(model).__name__}; wrap it first: model = anylens.wrap(hf_model, tokenizer)"
                )
            roles: list[str] = []
            for name in parameters:
                value = bound.arguments[name]
                if value is None:  # every role
                    return fn(*args, **kwargs)
                roles += [value] if isinstance(value, str) else list(value)
            with model.operation_hooks_only_for(roles):
                return fn(*args, **kwargs)

        return run

    return decorate


__all__ = ["OperationHooks", "only_role_operations"]
