"""The plan of a batched patching sweep: which row patches which component, from which source.

A *component* is one place in a role that an experiment patches: a layer, optionally one
position and optionally one head. :func:`enumerate_components` lists them over the dimensions
an experiment sweeps (``over``); a :class:`PatchPlan` gives each patched run (a batch row) its
input, its component and the source row written in, and :func:`writes_by_layer` turns a batch
of rows into the indexed writes a forward makes.

Nothing here knows an architecture: roles say where activations live and how they are laid out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import OverError, PromptError
from ..core.positions import normalize_positions
from ..core.roles import HEAD_ROLES, LAYER_ROLES

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Dimensions a sweep may run over.
DIMS = ("layer", "head", "pos")
#: Roles whose heads are a dimension: the head roles plus ``pattern`` ([batch, head, query, key]).
HEADED_ROLES = frozenset(HEAD_ROLES | {"pattern"})


@dataclass(frozen=True)
class Component:
    """A layer, and optionally one position and one head; ``None`` means all of them."""

    layer: int
    pos: int | None = None
    head: int | None = None


# -- enumeration ------------------------------------------------------------------------------
def check_over(model: AnyModel, role: str, over: str | Sequence[str]) -> tuple[str, ...]:
    """``over`` as a tuple of known dimensions valid for ``role``, or a clear error."""
    model.role(role)  # a role this model lacks fails here, naming the roles it has
    if role not in LAYER_ROLES:
        raise OverError(
            f"role {role!r} is not per-layer; sweep one of: {', '.join(r for r in LAYER_ROLES if r in model.roles)}"
        )
    over = (over,) if isinstance(over, str) else tuple(over)
    unknown = [d for d in over if d not in DIMS]
    if unknown or len(set(over)) != len(over) or "layer" not in over:
        raise OverError(
            f"over={over!r}: give distinct dimensions from {DIMS}, including 'layer', "
            "e.g. ('layer', 'pos'), ('layer', 'head'), ('layer', 'head', 'pos') or ('layer',)"
        )
    if "head" in over and role not in HEADED_ROLES:
        raise OverError(
            f"role {role!r} has no heads; sweep heads over one of {sorted(HEADED_ROLES & set(model.roles))}, "
            "or drop 'head' from over"
        )
    return over


def n_heads_of(model: AnyModel, role: str) -> int:
    """Heads along the head dimension of ``role`` (key/value heads for ``k``/``v`` under GQA)."""
    return model.n_kv_heads if role in ("k", "v") else model.n_heads


def enumerate_components(
    model: AnyModel,
    role: str,
    over: tuple[str, ...],
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> list[Component]:
    """Every component of ``role`` over ``over``, layer-major; unswept dimensions stay ``None``."""
    over = check_over(model, role, over)
    head_list: list[int | None] = [None]
    if "head" in over:
        head_list = list(range(n_heads_of(model, role))) if heads is None else list(heads)
    pos_list: list[int | None] = [None]
    if "pos" in over:
        if positions is None:
            raise ValueError("sweeping 'pos' needs the positions to sweep")
        pos_list = list(positions)
    return [Component(layer, pos, head) for layer in model.layers(layers) for head in head_list for pos in pos_list]


# -- the plan of a batched sweep --------------------------------------------------------------
@dataclass
class PatchPlan:
    """Patched runs, one per row: which input it runs, which component it patches, from where.

    ``sources[layer]`` holds the activations written in, laid out like the role, with one row per
    source (a prompt, or a single mean). A component with ``pos=None`` is patched at every
    ``target_positions`` entry, reading the matching ``source_positions`` entry.
    """

    role: str
    inputs: torch.Tensor  # [n_inputs, T] token ids of the runs being patched
    components: list[Component]
    input_rows: torch.Tensor  # [n_rows] which input each row runs
    source_rows: torch.Tensor  # [n_rows] which source row each row reads
    sources: dict[int, torch.Tensor]
    target_positions: list[int]
    source_positions: list[int]

    def __post_init__(self) -> None:
        self.input_rows = torch.as_tensor(self.input_rows, dtype=torch.long)
        self.source_rows = torch.as_tensor(self.source_rows, dtype=torch.long)
        if not len(self.components) == len(self.input_rows) == len(self.source_rows):
            raise ValueError("a patch plan needs one input row and one source row per component")
        if len(self.target_positions) != len(self.source_positions):
            raise ValueError("target and source positions must pair up one to one")
        self._source_of = dict(zip(self.target_positions, self.source_positions))

    def __len__(self) -> int:
        return len(self.components)

    def source_pos(self, pos: int) -> int:
        if pos not in self._source_of:
            raise PromptError(f"position {pos} has no source position to patch from (see align=)")
        return self._source_of[pos]


@dataclass
class PlanStats:
    """How a plan ran: patches, forwards, rows per forward, and what reuse saved.

    ``unchanged`` counts rows whose patch wrote the values already there, answered from the
    unpatched run; ``work_fraction`` is the share of block-position work the forwards did,
    relative to running every row through every block at every position.
    """

    patches: int = 0
    forwards: int = 0
    rows_per_forward: int = 0
    unchanged: int = 0
    work_fraction: float = 1.0

    @property
    def patches_per_forward(self) -> float:
        return self.patches / self.forwards if self.forwards else 0.0


def writes_by_layer(
    plan: PatchPlan, rows: torch.Tensor, device: torch.device, start: int = 0
) -> dict[int, list[tuple[tuple, tuple]]]:
    """Per layer, (target index, source index) pairs, one per group of alike components.

    Rows whose components have the same shape (position given or not, head given or not) are
    written with one vectorised index, so a layer costs one write per group, not one per row.
    ``start`` is the first position the forward runs: target positions are counted from it, and
    writes before it are left out (the caller ensures they would not change anything).
    """
    row_list = rows.tolist()
    groups: dict[tuple[int, bool, bool], list[int]] = {}
    for local, row in enumerate(row_list):
        c = plan.components[row]
        groups.setdefault((c.layer, c.pos is None, c.head is None), []).append(local)
    # Indices are built on the host and moved in one copy: on an accelerator each copy from
    # pageable host memory is a synchronous transfer of its own.
    by_layer: list[tuple[int, tuple, tuple]] = []
    headed = plan.role in HEADED_ROLES
    head_first = plan.role == "pattern"  # [batch, head, query, key]; the others are [batch, pos, ...]
    for (layer, all_pos, all_heads), locals_ in groups.items():
        chosen = [row_list[i] for i in locals_]
        batch_rows = torch.tensor(locals_)
        source_rows = plan.source_rows[chosen]
        if all_pos:
            kept = [i for i, p in enumerate(plan.target_positions) if p >= start]
            target_pos = torch.tensor([plan.target_positions[i] - start for i in kept], dtype=torch.long)
            source_pos = torch.tensor([plan.source_positions[i] for i in kept], dtype=torch.long)
            target_pos, source_pos = target_pos[None, :], source_pos[None, :]
            batch_rows, source_rows = batch_rows[:, None], source_rows[:, None]
        else:
            positions = [plan.components[r].pos for r in chosen]
            if min(positions) < start:
                raise AssertionError(f"a write at position {min(positions)} before the forward's start {start}")
            target_pos = torch.tensor([p - start for p in positions], dtype=torch.long)
            source_pos = torch.tensor([plan.source_pos(p) for p in positions], dtype=torch.long)
        if plan.sources[layer].shape[1 if not head_first else 2] == 1:
            source_pos = torch.zeros_like(source_pos)  # one value for every position (a mean)
        head: Any = slice(None)
        if headed and not all_heads:
            head = torch.tensor([plan.components[r].head for r in chosen], dtype=torch.long)
            if all_pos:
                head = head[:, None]
        target = _index(batch_rows, target_pos, head, headed, head_first)
        source = _index(source_rows, source_pos, head, headed, head_first)
        by_layer.append((layer, target, source))
    moved = iter(moved_together([i for _, t, s in by_layer for i in (*t, *s) if isinstance(i, torch.Tensor)], device))
    writes: dict[int, list[tuple[tuple, tuple]]] = {}
    for layer, target, source in by_layer:
        target, source = (
            tuple(next(moved) if isinstance(i, torch.Tensor) else i for i in ix) for ix in (target, source)
        )
        writes.setdefault(layer, []).append((target, source))
    return writes


def moved_together(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The tensors (of one dtype) on ``device``, moved in one copy: each copy between the host and
    an accelerator waits for it, which costs more than the data."""
    device = torch.device(device)
    if all(t.device == device for t in tensors):
        return tensors
    gather = next(t.device for t in tensors if t.device != device)  # joined there, then moved once
    flat = torch.cat([t.reshape(-1).to(gather) for t in tensors]).to(device)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _index(rows: Any, pos: Any, head: Any, headed: bool, head_first: bool) -> tuple:
    if head_first:
        return (rows, head, pos)
    if headed and not isinstance(head, slice):
        return (rows, pos, head)
    return (rows, pos)


__all__ = [
    "DIMS",
    "HEADED_ROLES",
    "Component",
    "OverError",
    "PatchPlan",
    "PlanStats",
    "check_over",
    "enumerate_components",
    "moved_together",
    "n_heads_of",
    "normalize_positions",
    "writes_by_layer",
]
