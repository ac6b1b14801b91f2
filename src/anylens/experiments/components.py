"""Components of a role, and many patched runs in one forward pass.

A *component* is one place in a role that an experiment patches: a layer, optionally one
position and optionally one head. :func:`enumerate_components` lists them over the dimensions
an experiment sweeps (``over``); :func:`run_plan` applies one component per batch row, with the
prompt repeated along the batch, so a sweep of hundreds of patches costs a few forwards.

Nothing here knows an architecture: roles say where activations live and how they are laid out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import AnylensError, PromptError
from ..core.roles import HEAD_ROLES, LAYER_ROLES
from .final_position import cut_to_final_position, last_logits, last_logits_kwargs, last_mlp, read_last

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Dimensions a sweep may run over.
DIMS = ("layer", "head", "pos")
#: Roles whose heads are a dimension: the head roles plus ``pattern`` ([batch, head, query, key]).
HEADED_ROLES = frozenset(HEAD_ROLES | {"pattern"})
#: Fallback memory budget when the free memory cannot be measured (psutil missing), and a
#: sweep's budget on a CPU (:func:`steady_budget`).
FIXED_BUDGET_BYTES = 2 * 2**30
#: Share of the free memory a sweep may use by default.
BUDGET_FRACTION = 0.25
#: Most rows per forward on a CPU: past this, bigger batches stop paying (cache effects).
MAX_CPU_ROWS = 64
#: Most rows per forward on an accelerator.
MAX_DEVICE_ROWS = 1024


class OverError(AnylensError, ValueError):
    """An ``over`` that the role cannot be swept over (e.g. heads of the residual stream)."""


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


def normalize_positions(positions: Sequence[int], length: int, what: str) -> list[int]:
    """Positions in ``0..length-1`` (negative ones count from the end), or a clear error."""
    out = []
    for p in positions:
        if not -length <= int(p) < length:
            raise PromptError(f"{what} position {p} is out of range for a prompt of {length} tokens")
        out.append(int(p) % length)
    return out


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


def run_plan(
    model: AnyModel,
    plan: PatchPlan,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int | None = None,
    memory_budget: int | None = None,
    reuse: bool = True,
    baseline: Any = None,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PlanStats]:
    """Run every patched row of ``plan``, many rows per forward; ``score`` each chunk.

    ``score(last_logits [k, vocab], rows [k]) -> [k]`` turns a chunk's final-position logits into
    metric values, so full logits of every row never have to be kept. Returns ``[n_rows]`` scores.
    With ``reuse`` (the default) work a patch cannot change is done once, not once per row (see
    :mod:`anylens.experiments.reuse`; ``baseline`` is the unpatched run if already recorded);
    ``reuse=False`` runs every row through the whole model. ``columns``: the only logits
    ``score`` reads, computed alone where reuse runs the unembedding itself.
    """
    n = len(plan)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of rows, got {batch_size!r}")
    if reuse and n:
        from .reuse import run_reusing  # reuse builds on this module

        return run_reusing(
            model,
            plan,
            score,
            lambda rows: _patched_forward(model, plan, rows),
            batch_size,
            memory_budget,
            baseline,
            columns,
        )
    rows_per_forward = batch_size or rows_for_budget(model, plan.inputs.shape[1], memory_budget)
    if batch_size is None and n:
        forwards = -(-n // rows_per_forward)
        rows_per_forward = -(-n // forwards)  # even chunks: 96 rows under a cap of 64 run as 48 + 48
    scores = torch.empty(n)
    stats = PlanStats(patches=n, rows_per_forward=min(rows_per_forward, n))
    for start in range(0, n, rows_per_forward):
        rows = torch.arange(start, min(start + rows_per_forward, n))
        last = _patched_forward(model, plan, rows)
        scores[rows] = score(last, rows).detach().float().cpu()
        stats.forwards += 1
    return scores, stats


def _patched_forward(model: AnyModel, plan: PatchPlan, rows: torch.Tensor) -> torch.Tensor:
    """One forward over ``rows`` of the plan, each row carrying its own patch."""
    access = model.role(plan.role)
    device = model.device
    ids = plan.inputs[plan.input_rows[rows]].to(device)
    writes = writes_by_layer(plan, rows, device)
    with torch.no_grad(), model.trace(ids):
        for layer in sorted(writes):  # ascending layers: reads must follow the forward order
            target = access.read(layer)
            for target_index, source_index in writes[layer]:
                target[target_index] = plan.sources[layer][source_index].to(target.dtype)
        last = model.logits[:, -1].save()
    return last


def writes_by_layer(
    plan: PatchPlan, rows: torch.Tensor, device: torch.device, start: int = 0, row_offset: int = 0
) -> dict[int, list[tuple[tuple, tuple]]]:
    """Per layer, (target index, source index) pairs, one per group of alike components.

    Rows whose components have the same shape (position given or not, head given or not) are
    written with one vectorised index, so a layer costs one write per group, not one per row.
    ``start`` is the first position the forward runs: target positions are counted from it, and
    writes before it are left out (the caller ensures they would not change anything).
    ``row_offset``: the batch row of ``rows[0]`` (rows the caller puts before them).
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
        batch_rows = torch.tensor(locals_) + row_offset
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


# -- sizing -----------------------------------------------------------------------------------
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


# -- recording ------------------------------------------------------------------------------
def record(
    model: AnyModel,
    role: str,
    ids: torch.Tensor,
    layers: Sequence[int],
    rows_per_forward: int | None = None,
    last_only: bool = False,
    columns: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Activations of ``role`` at ``layers`` and the final-position logits, no-grad.

    ``rows_per_forward`` inputs per trace (all at once by default), so that recording many
    prompts stays within the memory a sweep's forwards are sized to; ``last_only`` asks the
    model for final-position logits only (and runs the last MLP on that position alone), of
    which ``columns`` computes only those (:mod:`.final_position`).
    """
    access = model.role(role)
    step = rows_per_forward or max(ids.shape[0], 1)
    kwargs = last_logits_kwargs(model) if last_only else {}
    mlp_cut = last_mlp(model, role, layers) if last_only else None
    columns = columns if last_only else None
    rows = RowFill(ids.shape[0])
    for start in range(0, ids.shape[0], step):
        saved: dict[int, torch.Tensor] = {}
        with torch.no_grad(), model.trace(ids[start : start + step].to(model.device), **kwargs):
            for layer in sorted(layers):
                saved[layer] = access.read(layer).clone().save()
            cut_to_final_position(model, mlp_cut)
            last = read_last(model, columns)
        for layer, value in saved.items():
            rows.put(layer, start, value)
        with torch.no_grad():
            rows.put("last", start, last_logits(model, last, columns))
    return {layer: rows[layer] for layer in layers}, rows["last"]


class RowFill:
    """Tensors of ``n`` rows filled a chunk of rows at a time, never holding the chunks twice."""

    def __init__(self, n: int):
        self.n = n
        self.tensors: dict[Any, torch.Tensor] = {}

    def put(self, key: Any, start: int, value: torch.Tensor) -> None:
        if start == 0 and value.shape[0] == self.n:
            self.tensors[key] = value  # one chunk: nothing to copy
            return
        if key not in self.tensors:
            self.tensors[key] = value.new_empty((self.n, *value.shape[1:]))
        self.tensors[key][start : start + value.shape[0]] = value

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self.tensors[key]


# -- metrics over rows ------------------------------------------------------------------------
def metric_for_rows(metric: Any, prompt_of_row: torch.Tensor, n_prompts: int) -> Any:
    """``metric`` with per-prompt targets re-indexed so there is one target per batch row.

    A metric's targets may be one word, or one word per prompt; a sweep runs each prompt many
    times, so a per-prompt list must follow the rows. Metrics without such fields pass unchanged.
    """
    if not dataclasses.is_dataclass(metric):
        return metric
    changes = {}
    for field in dataclasses.fields(metric):
        value = getattr(metric, field.name)
        if isinstance(value, (str, bytes, int)) or not isinstance(value, Sequence):
            continue
        if len(value) != n_prompts:
            raise PromptError(
                f"metric {getattr(metric, 'name', type(metric).__name__)!r} has {len(value)} {field.name} targets "
                f"for {n_prompts} prompts: give one target, or one per prompt"
            )
        changes[field.name] = [value[int(i)] for i in prompt_of_row]
    return dataclasses.replace(metric, **changes) if changes else metric


def score_rows(
    metric: Any,
    model: AnyModel,
    last: torch.Tensor,
    prompt_of_row: torch.Tensor,
    n_prompts: int,
    reference_last: torch.Tensor | None = None,
) -> torch.Tensor:
    """The metric on final-position logits ``[k, vocab]`` whose rows run the given prompts.

    ``reference_last[prompt]`` is the logits a comparing metric (KL) measures against, handed
    over only to metrics that read them.
    """
    reference = None
    if reference_last is not None and getattr(metric, "reads_clean_logits", True):
        reference = reference_last[prompt_of_row.to(reference_last.device)]
    return metric_for_rows(metric, prompt_of_row, n_prompts)(last, model, reference)


__all__ = [
    "Component",
    "OverError",
    "PatchPlan",
    "PlanStats",
    "RowFill",
    "bytes_per_row",
    "check_over",
    "default_budget",
    "enumerate_components",
    "metric_for_rows",
    "n_heads_of",
    "normalize_positions",
    "record",
    "rows_for_budget",
    "run_plan",
    "moved_together",
    "writes_by_layer",
    "score_rows",
    "steady_budget",
]
