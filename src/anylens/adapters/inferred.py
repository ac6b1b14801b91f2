"""The inferring adapter: serves a decoder-only model that no registered adapter claims by name.

Registered like every built-in adapter (the list in :mod:`anylens.registry.builtin`), it
implements only ``anylens_resolve``, which the registry calls after name lookup fails, so hand-written and
third-party adapters always win. It runs last among resolvers (``trylast``): a plugin that claims
models by its own rules is asked first.

The adapter it returns has been checked on a real trace of the very model being wrapped (see
:mod:`anylens.inference.infer`); a model whose inferred map fails the invariants raises
:class:`anylens.inference.infer.InferenceError` (an ``UnknownArchitectureError``) that says what was
inferred, which invariant failed, and how to write the adapter as data.
"""

from __future__ import annotations

from typing import Any

import torch

from anylens import hookimpl


def _inferable(model: Any) -> bool:
    """A built PyTorch causal LM with real weights (a meta-device model cannot be traced)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        return False
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.device.type != "meta"


@hookimpl
def anylens_adapters() -> list:
    return []  # it claims no architecture by name: it resolves only what no adapter claims


@hookimpl(trylast=True)
def anylens_resolve(model: Any, config: Any) -> Any:
    if not _inferable(model):
        return None
    from anylens.inference.infer import infer_adapter

    return infer_adapter(model)
