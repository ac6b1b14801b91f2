"""Where a role sits among the model's blocks, what a block returns, and whether the model's
key/value cache may be continued from: the facts about a model that reuse builds on.

Only the adapter's path of the block list is used: nothing here knows an architecture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..core.access import envoy_at
from .block_prefix import prefix_modules
from .final_position import forward_kwargs, last_logits_kwargs
from .state import engine_state

if TYPE_CHECKING:
    from ..core.model import AnyModel


def block_envoys(model: AnyModel) -> Any:
    """The nnsight envoy of the model's list of blocks (the adapter's ``layers`` path)."""
    return envoy_at(model, model.adapter.layers)


def skippable_blocks(model: AnyModel, role: str, layers: list[int]) -> int:
    """How many leading blocks a plan over ``layers`` may skip: those before its last patched
    block (0 when a role lives outside the blocks)."""
    owners = [block_of(model, role, layer) for layer in layers]
    return max(owners) if owners and all(b is not None for b in owners) else 0


def block_prefixes(model: AnyModel, role: str, layers: list[int], n_blocks: int) -> dict[int, tuple[str, ...]]:
    """Per block a batch may start at (up to ``n_blocks``), the modules there that return before
    ``role`` is reached (:mod:`.block_prefix`); blocks with none are left out."""
    found: dict[int, tuple[str, ...]] = {}
    for layer in layers:
        block = block_of(model, role, layer)
        if block is not None and block <= n_blocks and block not in found:
            found[block] = prefix_modules(model, role, layer, block)
    return {block: modules for block, modules in found.items() if modules}


def block_of(model: AnyModel, role: str, layer: int) -> int | None:
    """Index of the block whose module holds ``role`` at ``layer``; None if outside the blocks."""
    module = model.role(role).path.module_at(layer)
    prefix = model.adapter.layers + "."
    if not module.startswith(prefix):
        return None
    head = module[len(prefix) :].split(".")[0]
    return int(head) if head.isdigit() else None


def cache_name(model: AnyModel) -> str:
    return "cache" if "cache" in forward_kwargs(model) else "past_key_values"


def returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def kv_cache_reusable(model: AnyModel, probe_ids: torch.Tensor) -> bool:
    """Whether the model's cache is plain attention keys and values, safe to continue from.

    Continuing from a cache is reused only for transformers' ``DynamicCache`` made of full or
    sliding-window key/value layers: they hold each position's keys and values, which a later
    position never changes. SSM caches (Mamba's convolution and recurrent state) are left out:
    transformers' Mamba continues a multi-token suffix from its state inexactly (it treats it as a
    fresh prefill), and other state layouts are not promised to be position-exact either.
    """
    state = engine_state(model)
    if state.kv_reusable is not None:
        return state.kv_reusable
    reusable = False
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # pragma: no cover - transformers without the cache classes
        DynamicCache = None
    if DynamicCache is not None and {"attention_mask", "use_cache"} <= forward_kwargs(model):
        with torch.no_grad():
            output = model.hf(input_ids=probe_ids[:1, :2].to(model.device), use_cache=True, **last_logits_kwargs(model))
        cache = returned_cache(output)
        layers = getattr(cache, "layers", None)
        reusable = (
            type(cache) is DynamicCache
            and bool(layers)
            and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)
        )
    state.kv_reusable = reusable
    return reusable


def residual_of(block_output: Any) -> torch.Tensor:
    """The residual a block (or a module before the role) returns: alone or leading a tuple."""
    return block_output[0] if isinstance(block_output, (tuple, list)) else block_output


def with_residual(structure: Any, residual: torch.Tensor) -> Any:
    """``structure`` (a block's output) with ``residual`` in place of its residual."""
    if isinstance(structure, (tuple, list)):
        return type(structure)((residual, *structure[1:]))
    return residual


__all__ = [
    "block_envoys",
    "block_of",
    "block_prefixes",
    "cache_name",
    "kv_cache_reusable",
    "residual_of",
    "returned_cache",
    "skippable_blocks",
    "with_residual",
]
