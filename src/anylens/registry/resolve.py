"""Which adapter serves a model: the one the caller names or gives, else the registry's choice."""

from __future__ import annotations

from typing import Any

import torch

from ..core.spec import AdapterSpec
from .manager import as_spec, registry


def adapter_for(module: torch.nn.Module, adapter: Any = None) -> AdapterSpec:
    """The adapter spec for ``module``: resolved by the registry, or the one ``adapter`` names or is
    (an adapter name, a spec, a dict, or a TOML path)."""
    if adapter is None:
        return registry().resolve(module)
    if isinstance(adapter, str) and not adapter.endswith(".toml"):
        return registry().adapter(adapter)
    return as_spec(adapter)
