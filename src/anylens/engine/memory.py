"""Memory a batched sweep may use, and how many patched rows one forward may carry.

The budget is a share of the device's free memory unless the caller gives one; :class:`Sizes`
splits it between what a sweep with reuse holds (the plan's sources, each input's unpatched
run) and the rows of one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Fallback memory budget when the free memory cannot be measured (psutil missing), and a
#: sweep's budget on a CPU (:func:`steady_budget`).
FIXED_BUDGET_BYTES = 2 * 2**30
#: Share of the free memory a sweep may use by default.
BUDGET_FRACTION = 0.25
#: Most rows per forward on a CPU: past this, bigger batches stop paying (cache effects).
MAX_CPU_ROWS = 64
#: Most rows per forward on an accelerator.
MAX_DEVICE_ROWS = 1024
#: Share of ``memory_budget`` the tensors a sweep plans for may take. The rest is headroom for
#: what the plan does not track: results, Python objects, and freed memory that the allocator
#: keeps for reuse instead of returning (glibc on a CPU; the caching allocator on a GPU).
PLANNED_SHARE = 2 / 3


def bytes_per_row(model: AnyModel, seq_len: int, last_only: bool = False) -> int:
    """A rough upper estimate of the memory one patched row needs during a no-grad forward.

    Per token: a few residual-width tensors, the MLP (or SSM) hidden width, attention scores for
    every head, and the logits (once per row with ``last_only``); doubled for temporaries.
    """
    config = model.config
    d = model.d_model
    d_hidden = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d)
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1)
    state = int(getattr(config, "state_size", 0) or 0)
    per_token = 8 * d + 3 * d_hidden + heads * seq_len + d_hidden * state + (0 if last_only else model.d_vocab)
    element = torch.finfo(next(model.hf.parameters()).dtype).bits // 8
    return 2 * element * (per_token * seq_len + (model.d_vocab if last_only else 0))


def default_budget(model: AnyModel) -> int:
    """A share of the free memory of the model's device; a fixed cap when it cannot be measured."""
    device = model.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_FRACTION * 2)
    try:
        import psutil
    except ImportError:
        return FIXED_BUDGET_BYTES
    return int(psutil.virtual_memory().available * BUDGET_FRACTION)


def steady_budget(model: AnyModel) -> int:
    """A budget that depends on the machine, not on the moment: for runs that must batch alike
    every time (a sweep, whose resumed chunks must equal an uninterrupted run's bit for bit).
    :data:`FIXED_BUDGET_BYTES` on a CPU; on an accelerator the share :func:`default_budget`
    takes, of its total memory less the model's weights rather than of what is free now."""
    device = model.device
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        weights = sum(p.numel() * p.element_size() for p in model.hf.parameters())
        return max(int(max(total - weights, 0) * BUDGET_FRACTION * 2), 1)
    return FIXED_BUDGET_BYTES


def rows_for_budget(model: AnyModel, seq_len: int, memory_budget: int | None = None) -> int:
    """Rows per forward that fit ``memory_budget`` bytes (default: :func:`default_budget`)."""
    budget = default_budget(model) if memory_budget is None else int(memory_budget)
    cap = MAX_CPU_ROWS if model.device.type == "cpu" else MAX_DEVICE_ROWS
    return max(1, min(cap, budget // bytes_per_row(model, seq_len)))


@dataclass(frozen=True)
class Sizes:
    """Bytes a sweep with reuse holds: the plan's sources, each input's unpatched run, each row.

    Sized to :data:`PLANNED_SHARE` of the budget; the sources and both runs' final logits are
    held throughout, the unpatched runs of a group of inputs and one forward's rows on top.
    """

    n_blocks: int  # block outputs kept per input, to skip blocks
    per_input: int  # one input's unpatched run: role, block outputs, key/value cache
    per_row: int  # one row of a forward, with its skipped blocks' outputs and its cache copy
    free: int  # the budget left after the sources
    cap: int  # most rows per forward on this device

    @classmethod
    def of(
        cls,
        model: AnyModel,
        role: str,
        n_blocks: int,
        length: int,
        sources: dict[int, torch.Tensor],
        memory_budget: int | None,
        n_inputs: int,
        prefix_width: int = 0,
    ) -> Sizes:
        """``prefix_width``: elements per position of the block-prefix outputs kept per input
        (:mod:`.block_prefix`)."""
        n_all = len(model.module(model.adapter.layers))
        element = torch.finfo(next(model.hf.parameters()).dtype).bits // 8
        pos_dim = 2 if role == "pattern" else 1  # pattern is [batch, head, query, key]
        role_size = sum(t[0].numel() // max(t.shape[pos_dim], 1) * length for t in sources.values())
        residual = length * model.d_model
        per_input = element * (role_size + (n_blocks + 2 * n_all) * residual + prefix_width * length)
        per_row = bytes_per_row(model, length, last_only=True) + element * 3 * n_all * residual
        budget = PLANNED_SHARE * (default_budget(model) if memory_budget is None else int(memory_budget))
        held = sum(t.numel() * t.element_size() for t in sources.values())
        held += 2 * n_inputs * model.d_vocab * element  # final logits of the clean and corrupt runs
        cap = MAX_CPU_ROWS if model.device.type == "cpu" else MAX_DEVICE_ROWS
        return cls(n_blocks, per_input, per_row, max(int(budget - held), 0), cap)

    def inputs_per_group(self, n_inputs: int) -> int:
        """Inputs whose unpatched run is held at once: as many as fit half the free budget."""
        return max(1, min(n_inputs, self.free // 2 // max(self.per_input, 1)))

    def rows_for(self, free: int) -> int:
        """Rows per forward that fit ``free`` bytes."""
        return max(1, min(self.cap, free // self.per_row))


__all__ = [
    "BUDGET_FRACTION",
    "FIXED_BUDGET_BYTES",
    "steady_budget",
    "MAX_CPU_ROWS",
    "MAX_DEVICE_ROWS",
    "PLANNED_SHARE",
    "Sizes",
    "bytes_per_row",
    "default_budget",
    "rows_for_budget",
]
