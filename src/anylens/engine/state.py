"""What the engine has learned about one model, kept for as long as the model lives.

Each shortcut of reuse is checked once per model (:mod:`.reuse`), and a few facts about the
model are measured once (its forward's arguments, whether its cache may be continued from, the
order its modules run in, whether the last MLP may be cut to the final position). All of it
lives in one :class:`EngineState` per model, held weakly, so that dropping a model drops it too;
turning a shortcut off is a method with the reason, and stays off for that model only.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.model import AnyModel


@dataclass
class EngineState:
    """One model's engine facts and the shortcuts turned off for it (None: not known yet, or on)."""

    #: Shortcut layouts a guard row has verified: (length, first block, first position, block
    #: prefix, the blocks rows join at).
    verified: set[tuple] = field(default_factory=set)
    #: Why reuse as a whole is off (a guard failed with only blocks and positions skipped).
    reuse_off_reason: str | None = None
    #: Why forwards do not grow (each batch runs all its rows from its first block).
    growing_off_reason: str | None = None
    #: Why the modules before the role in a batch's first block are not skipped.
    prefix_off_reason: str | None = None
    #: Whether the model's key/value cache may be continued from (:func:`.baseline.kv_cache_reusable`).
    kv_reusable: bool | None = None
    #: The probe forward's call order of the modules under the block list (:mod:`.block_prefix`).
    call_order: Any = None
    #: The block-prefix modules found so far, by (role, layer, block).
    prefixes: dict[tuple[str, int, int], tuple[str, ...]] = field(default_factory=dict)
    #: Whether the last MLP cut to the final position reproduces a full run (:mod:`.final_position`).
    mlp_cut_works: bool | None = None
    #: Whether the unembedding of its input reproduces the model's logits (metric columns alone).
    columns_work: bool | None = None
    #: Names of the keyword arguments the model's forward takes.
    forward_kwargs: frozenset[str] | None = None

    def disable_reuse(self, why: str) -> None:
        """Run every patched row in full from now on."""
        self.reuse_off_reason = why

    def stop_growing(self, why: str) -> None:
        """Run each batch's rows from its first block from now on."""
        self.growing_off_reason = why

    def stop_prefixes(self, why: str) -> None:
        """Run the modules before the role in a batch's first block from now on."""
        self.prefix_off_reason = why


_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> EngineState


def engine_state(model: AnyModel) -> EngineState:
    """The engine state of ``model``, made empty on first use."""
    state = _states.get(model)
    if state is None:
        state = _states[model] = EngineState()
    return state


__all__ = ["EngineState", "engine_state"]
