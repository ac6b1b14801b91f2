"""How a sweep with reuse groups its patched rows into forwards.

Each row has a first block ``b`` and a first position ``p`` its patch can change. A forward that
runs a batch of rows starts at the batch's smallest ``p``; each row joins the forward at its own
block (a *growing* forward: :func:`.shortcut.shortcut_forward`), or, where a model cannot run one,
at the batch's smallest ``b``. Batches of alike rows skip the most work, but every extra forward
costs its own fixed share (reading every weight matrix it runs once more). :func:`plan_batches`
weighs the two with a rough :class:`CostModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..core.model import AnyModel

# Rough device figures. They steer how rows are grouped (more, smaller forwards that skip more
# work, or fewer, larger ones), never what a row computes. Every call of a weight matrix costs
# about as much as pushing ``tokens_per_call`` tokens through it (reading the weights, launching
# kernels), plus ``call_s`` per block and ``forward_s`` per forward.
_CPU = {"flops": 5e10, "call_s": 2e-4, "forward_s": 3e-3, "tokens_per_call": 24}
_ACCELERATOR = {"flops": 1e14, "call_s": 5e-4, "forward_s": 5e-3, "tokens_per_call": 1024}


@dataclass(frozen=True)
class RowBatch:
    """Plan rows run in one forward that skips blocks before ``block`` and positions before ``pos``.

    ``starts``: each row's first block, in ascending order (the rows are sorted by it), where a
    growing forward may let each row join there; None: every row runs from ``block``.
    """

    rows: torch.Tensor
    block: int
    pos: int
    starts: torch.Tensor | None = None


def _figures(model: AnyModel) -> dict[str, float]:
    return _CPU if model.device.type == "cpu" else _ACCELERATOR


class CostModel:
    """Rough seconds of a forward that runs rows from block ``b0`` and position ``p0`` on."""

    def __init__(self, model: AnyModel, length: int):
        figures = _figures(model)
        blocks = model.module(model.adapter.layers)
        block_params = sum(p.numel() for p in blocks[0].parameters()) or 1
        self.n_blocks = len(blocks)
        self.length = length
        self.block_token_s = 2 * block_params / figures["flops"]
        self.block_call_s = figures["call_s"] + figures["tokens_per_call"] * self.block_token_s
        # Final-position logits of a row; the unembedding runs once for many forwards' rows.
        self.head_s = 2 * model.d_model * model.d_vocab / figures["flops"]
        self.forward_s = figures["forward_s"]

    @staticmethod
    def tokens_per_call(model: AnyModel) -> int:
        """Tokens whose arithmetic costs about what one call of a weight matrix does on its own."""
        return _figures(model)["tokens_per_call"]

    def fixed(self, b0: int) -> float:
        """What a forward costs whatever its number of rows."""
        return self.forward_s + (self.n_blocks - b0) * self.block_call_s

    def per_row(self, b0: int, p0: int) -> float:
        return (self.n_blocks - b0) * (self.length - p0) * self.block_token_s + self.head_s


def one_forward(model: AnyModel, source: torch.Tensor, patched: torch.Tensor) -> bool:
    """Whether the source run and the patched run's unpatched (or gradient) run should share one
    forward, their rows side by side.

    A forward over ``t`` tokens costs about ``c + t``, where ``c`` is the tokens a weight matrix
    costs to call (reading it). Two recordings cost ``2 (c + t)`` and one over both ``c + 2t``;
    attribution's two forwards and backward ``3 (c + t)``, one forward over both and its backward
    (which then covers both) ``2 (c + 2t)``. Sharing wins while ``t < c``: the runs are short
    enough that reading the weights, not the arithmetic, sets the pace. Both runs must have the
    same shape.
    """
    return source.shape == patched.shape and patched.numel() < CostModel.tokens_per_call(model)


def plan_batches(
    blocks: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    cap: int,
    cost: CostModel,
    growing: bool = False,
) -> list[RowBatch]:
    """Group ``rows`` (each with its first block and position) into batches of at most ``cap`` rows.

    Rows are split recursively, by block or by position, wherever a split saves more work than
    its extra forwards cost; each group is then cut into even batches, sorted so that each batch
    starts at its own earliest block and position. Batches come ordered by position. With
    ``growing`` each row of a batch joins at its own block (the batch carries them as ``starts``),
    so only positions cost work that a split could save.
    """
    cells: dict[tuple[int, int], list[int]] = {}
    for row, b, p in zip(rows.tolist(), blocks.tolist(), positions.tolist()):
        cells.setdefault((b, p), []).append(row)

    def group_cost(keys: list[tuple[int, int]]) -> float:
        n = sum(len(cells[k]) for k in keys)
        b0, p0 = min(k[0] for k in keys), min(k[1] for k in keys)
        # A growing forward runs each row from its own block; otherwise all from the first.
        work = sum(len(cells[k]) * cost.per_row(k[0] if growing else b0, p0) for k in keys)
        return math.ceil(n / cap) * cost.fixed(b0) + work

    def split(keys: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        best_cost, best = group_cost(keys), None
        for axis in (0, 1):
            for value in sorted({k[axis] for k in keys})[1:]:
                low = [k for k in keys if k[axis] < value]
                high = [k for k in keys if k[axis] >= value]
                total = group_cost(low) + group_cost(high)
                if total < best_cost:
                    best_cost, best = total, (low, high)
        return [keys] if best is None else split(best[0]) + split(best[1])

    batches = []
    for group in split(sorted(cells)) if cells else []:
        members = sorted((b, p, row) for (b, p) in group for row in cells[(b, p)])
        size = math.ceil(len(members) / math.ceil(len(members) / cap))  # even batches
        for start in range(0, len(members), size):
            part = members[start : start + size]
            starts = torch.tensor([m[0] for m in part]) if growing else None
            batches.append(RowBatch(torch.tensor([m[2] for m in part]), part[0][0], min(m[1] for m in part), starts))
    batches.sort(key=lambda c: (c.pos, c.block))
    return batches


__all__ = ["RowBatch", "CostModel", "one_forward", "plan_batches"]
