"""Edge-patched forwards: one trace over a batch of rows, each row patching its own set of edges.

An edge ``u -> R`` carries sender ``u``'s write into receiver ``R``'s branch input. A row changes
what ``R`` reads, and nothing else: its branch input becomes its input in that run plus, for each
edge of the row into it, ``source value of u - base value of u``. The residual stream and every
other branch keep their own values, so an edge's effect reaches the rest of the model only
through ``R``'s output. Two modes:

* **fixed** (path patching): base and source are recorded beforehand (the patched run's sender
  outputs and the other run's), so ``R`` reads exactly what it would if ``u`` had written its
  source value; the senders themselves run unchanged.
* **ablate** (faithfulness): every edge *not* in the row's set is replaced by its ablation value,
  ``R``'s input minus ``sum_u (out_u in this run - out_u in the ablation source)``, with
  ``out_u in this run`` read in the same trace in forward order, so that what an upstream ablation
  changes propagates to the kept edges downstream. The ablation source is the corrupt run or the
  mean of the clean runs over prompts.

Rows are batched like :func:`anylens.patch`: each row runs one prompt pair's patched prompt, and
the metric is scored per row at the last position.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import CircuitGraphError, MetricError, OptionError, PromptError
from ..engine.memory import MAX_CPU_ROWS, MAX_DEVICE_ROWS, PLANNED_SHARE, bytes_per_row, default_budget
from ..engine.metric_rows import score_rows
from ..experiments import metrics as metrics_
from ..experiments.prompts import paired, tokenize_aligned
from .graph import Edge, Graph, Node

if TYPE_CHECKING:
    from ..core.model import AnyModel

ABLATIONS = ("corrupt", "mean")


# -- what one forward reads and writes, in forward order -----------------------------------------
@dataclass(frozen=True)
class Step:
    """Read the senders of one role at one layer, or write one receiver's input."""

    kind: str  # "send" | "receive"
    role: str
    layer: int
    nodes: tuple[Node, ...]


def schedule(model: AnyModel, graph: Graph) -> list[Step]:
    """Sender reads and receiver writes in the order the forward pass reaches them."""
    steps = [Step("send", "resid_pre", 0, (graph.senders[0],))]
    by_layer: dict[tuple[int, int], list[Node]] = {}
    for node in graph.senders[1:]:
        by_layer.setdefault((node.layer, node.stage), []).append(node)
    receivers = {(r.layer, r.stage): r for r in graph.receivers if r.kind != "logits"}
    for layer in range(graph.n_layers):
        for stage in (0, 1):
            receiver = receivers.get((layer, stage))
            if receiver is not None:
                steps.append(Step("receive", receiver.input_role, layer, (receiver,)))
            senders = by_layer.get((layer, stage), [])
            if senders:
                steps.append(Step("send", senders[0].output_role, layer, tuple(senders)))
    steps.append(Step("receive", "resid_post", graph.n_layers - 1, (graph.receivers[-1],)))
    return steps


def write_key(node: Node) -> str:
    """Where a sender's write is kept. A layer's heads share their ``z``: a head's write is its
    slice of ``z`` through its rows of ``W_O``, taken only where an edge needs it, which keeps
    ``n_heads`` times less than the writes themselves."""
    return f"z{node.layer}" if node.kind == "head" else node.name


def read_senders(model: AnyModel, step: Step) -> tuple[str, torch.Tensor]:
    """What a step's senders write (``z`` for heads), under its :func:`write_key` (in a trace)."""
    return write_key(step.nodes[0]), model.role(step.role).read(step.layer)


def graph_roles(graph: Graph) -> list[str]:
    roles = {"resid_pre", "resid_post", "logits"}
    roles |= {n.output_role for n in graph.senders} | {n.input_role for n in graph.receivers}
    return sorted(r for r in roles if r)


# -- recording the runs ------------------------------------------------------------------------
def record_senders(
    model: AnyModel, graph: Graph, ids: torch.Tensor, rows: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every sender's write on ``ids`` by :func:`write_key` (``[n, pos, d_model]``, or a layer's
    ``z`` for its heads) and the final-position logits."""
    steps = [step for step in schedule(model, graph) if step.kind == "send"]
    outputs: dict[str, list[torch.Tensor]] = {}
    lasts = []
    for start in range(0, ids.shape[0], rows):
        with torch.no_grad(), model.trace(ids[start : start + rows]):
            for step in steps:
                key, value = read_senders(model, step)
                outputs.setdefault(key, []).append(value.clone().save())
            lasts.append(model.role("logits").read(None)[:, -1].clone().save())
    return {key: torch.cat(parts) for key, parts in outputs.items()}, torch.cat(lasts)


# -- the patched forward -----------------------------------------------------------------------
@dataclass
class EdgeRows:
    """The rows of an edge-patched sweep.

    ``coefficients[row, edge]`` weighs each edge of the graph in a row. ``fixed``: the edge adds
    ``source - base`` of its sender; ``ablate``: an edge is ablated with weight 1 (kept: 0).
    ``pair_of_row[row]`` is the prompt pair the row runs.
    """

    coefficients: torch.Tensor  # [rows, n_edges]
    pair_of_row: torch.Tensor  # [rows]
    #: ``[rows, n_edges]``: which prompt of the source each edge's source write comes from (None:
    #: the row's own pair). Resampling ablations draw a prompt per row and edge.
    source_index: torch.Tensor | None = None


def run_rows(
    model: AnyModel,
    graph: Graph,
    run_ids: torch.Tensor,
    rows: EdgeRows,
    *,
    mode: str,
    source: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor] | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """Final-position logits ``[rows, vocab]`` of every row.

    ``mode="fixed"``: a receiver reads its input plus ``sum_e c[e] (source_u - base_u)``;
    ``mode="ablate"``: its input plus ``sum_e c[e] (source_u - u's write in this row)``. ``source``
    and ``base`` are writes as :func:`record_senders` returns them, ``[n_pairs or 1, ...]`` (one
    row broadcasts).
    """
    if mode not in ("fixed", "ablate") or (mode == "fixed") != (base is not None):
        raise ValueError(f"mode={mode!r}: 'fixed' takes base writes, 'ablate' reads them in the run")
    steps = schedule(model, graph)
    into = {r.name: [(graph.index(e), e.sender) for e in graph.edges_into(r)] for r in graph.receivers}
    W_O = {layer: model.W_O(layer) for layer in sorted({n.layer for n in graph.senders if n.kind == "head"})}
    n_rows = rows.coefficients.shape[0]
    per_forward = rows_per_forward(model, graph, run_ids.shape[1], mode, batch_size, memory_budget)
    lasts = []
    for start in range(0, n_rows, per_forward):
        chunk = slice(start, min(start + per_forward, n_rows))
        pairs = rows.pair_of_row[chunk]
        coefficients = rows.coefficients[chunk].to(model.device)
        index = None if rows.source_index is None else rows.source_index[chunk]
        live: dict[str, torch.Tensor] = {}
        with torch.no_grad(), model.trace(run_ids[pairs.to(run_ids.device)]):
            for step in steps:
                if step.kind == "send":
                    if mode == "ablate":
                        key, value = read_senders(model, step)
                        live[key] = value
                    continue
                receiver = step.nodes[0]
                access = model.role(step.role)
                current = access.read(step.layer)
                edges = into[receiver.name]
                delta = _delta(edges, coefficients, pairs, index, source, base, live, W_O, current)
                if delta is not None:
                    access.write(step.layer, current + delta)
            lasts.append(model.role("logits").read(None)[:, -1].clone().save())
    return torch.cat(lasts)


def _delta(
    edges: list[tuple[int, Node]],
    coefficients: torch.Tensor,
    pairs: torch.Tensor,
    source_index: torch.Tensor | None,
    source: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor] | None,
    live: dict[str, torch.Tensor],
    W_O: dict[int, torch.Tensor],
    current: torch.Tensor,
) -> torch.Tensor | None:
    """What one receiver's input gains in each row of a chunk (None: nothing in any row). Without
    ``base``, the other write is the sender's in this forward (``live``)."""
    delta = None
    for index, sender in edges:
        weight = coefficients[:, index]
        if not bool(weight.any()):
            continue
        key = write_key(sender)
        src = _rows_of(source[key], pairs if source_index is None else source_index[:, index], current)
        other = live[key] if base is None else _rows_of(base[key], pairs, current)
        change = src - other if sender.kind != "head" else src[..., sender.head, :] - other[..., sender.head, :]
        if sender.kind == "head":  # the head's slice of z through its rows of W_O
            change = change @ W_O[sender.layer][sender.head].to(device=current.device, dtype=current.dtype)
        term = weight.to(current.dtype)[:, None, None] * change
        delta = term if delta is None else delta + term
    return delta


def _rows_of(values: torch.Tensor, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` of the given prompts (all rows of a single-prompt ``values``), as ``like``."""
    picked = values.expand(len(rows), *values.shape[1:]) if values.shape[0] == 1 else values[rows.to(values.device)]
    return picked.to(device=like.device, dtype=like.dtype)


def rows_per_forward(
    model: AnyModel, graph: Graph, seq_len: int, mode: str, batch_size: int | None, memory_budget: int | None
) -> int:
    """Rows one forward carries: ``batch_size``, or as many as fit the memory budget, counting the
    sender writes an ablating forward holds for every row."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise OptionError(f"batch_size={batch_size!r}: give a positive whole number of rows per forward")
        return batch_size
    element = torch.finfo(model.dtype).bits // 8
    held = len({write_key(node) for node in graph.senders}) if mode == "ablate" else 2
    per_row = bytes_per_row(model, seq_len, last_only=True) + element * held * seq_len * model.d_model
    budget = PLANNED_SHARE * (default_budget(model) if memory_budget is None else int(memory_budget))
    cap = MAX_CPU_ROWS if model.device.type == "cpu" else MAX_DEVICE_ROWS
    return max(1, min(cap, int(budget // per_row)))


# -- inputs ------------------------------------------------------------------------------------
def usable_metric(metric: Any, prompts: Any = None) -> Any:
    """The metric, resolved by name; a typed error for one that cannot score logits."""
    if metric is None:
        raise MetricError(
            "edge experiments need a metric: pass metric=al.metrics.logit_diff(' Paris', ' Rome') or a name such "
            "as 'logit_diff' with prompt pairs that carry their answers"
        )
    metric = metrics_.resolve(metric, prompts)
    if not callable(metric):
        raise MetricError(
            f"metric={metric!r} is not a metric: pass one of al.metrics (logit_diff, log_prob, prob, kl, ...), its "
            "name, or a callable (logits, model, clean_logits) -> one value per row"
        )
    return metric


def edge_mask(graph: Graph, edge_sets: Any) -> torch.Tensor:
    """``[n_sets, n_edges]`` floats from a mask tensor, or from sets of edges the graph has."""
    if isinstance(edge_sets, torch.Tensor):
        mask = edge_sets if edge_sets.dim() == 2 else edge_sets[None]
        if mask.shape[-1] != len(graph):
            raise CircuitGraphError(
                f"an edge mask of shape {tuple(edge_sets.shape)} for a graph of {len(graph)} edges: give one "
                f"column per edge, [n_sets, {len(graph)}]"
            )
        return mask.float().cpu()
    sets = list(edge_sets)
    if sets and (isinstance(sets[0], (str, Edge)) or _is_pair(sets[0])):
        sets = [sets]  # one set
    mask = torch.zeros(len(sets), len(graph))
    for row, edges in enumerate(sets):
        for edge in graph.parse_edges(edges):
            mask[row, graph.index(edge)] = 1.0
    return mask


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (str, Node)) for v in value)


def same_length_pairs(model: AnyModel, clean: Any, corrupt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupt token ids of one length: an edge carries a write position by position,
    so circuits take no ``align`` (the error says what to do instead)."""
    clean_ids, corrupt_ids = tokenize_aligned(model, clean), tokenize_aligned(model, corrupt, "corrupt")
    if clean_ids.shape[1] != corrupt_ids.shape[1]:
        raise PromptError(
            f"clean prompts have {clean_ids.shape[1]} tokens and corrupt prompts {corrupt_ids.shape[1]}: circuit "
            "experiments carry each sender's write position by position, so they need pairs of one token length "
            "and take no align. Rephrase one prompt (al.show_alignment shows where they differ), or find the "
            "positions first with al.patch(..., align='auto')"
        )
    return paired(model, clean_ids, corrupt_ids)


def pair_ids(model: AnyModel, clean: Any, corrupt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    clean_ids, corrupt_ids = same_length_pairs(model, clean, corrupt)
    n = max(clean_ids.shape[0], corrupt_ids.shape[0])
    return clean_ids.expand(n, -1).to(model.device), corrupt_ids.expand(n, -1).to(model.device)


def _check_graph(model: AnyModel, graph: Any) -> Graph:
    if not isinstance(graph, Graph):
        raise CircuitGraphError(
            f"graph={type(graph).__name__}: pass the component graph of this model, "
            "anylens.circuits.component_graph(model, level='head' or 'layer')"
        )
    if graph.n_layers != model.n_layers:
        raise CircuitGraphError(
            f"the graph has {graph.n_layers} layers but {model.name} has {model.n_layers}: build it from this model"
        )
    return graph


# -- the experiments ---------------------------------------------------------------------------
def edge_metrics(
    model: AnyModel,
    clean_ids: Any,
    corrupt_ids: Any,
    graph: Graph,
    edge_sets: Any,
    *,
    metric: Any,
    ablation: str = "corrupt",
    batch_size: int | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """The metric on the clean prompts with only the edges of each set carrying clean values.

    Every other edge is ablated in the same forward (the ``ablate`` mode above): from the corrupt
    run of the same pair, or from the mean over prompts of the clean runs (``ablation="mean"``).
    ``edge_sets`` is a list of edge sets (each edges as ``"sender->receiver"``, pairs or
    :class:`Edge`) or a ``[n_sets, n_edges]`` 0/1 mask over ``graph.edges``. Returns one value
    per set, averaged over prompt pairs: every edge kept gives the clean metric, none the
    metric of the ablation source.
    """
    graph = _check_graph(model, graph)
    if ablation not in ABLATIONS:
        raise OptionError(f"ablation={ablation!r}: use 'corrupt' (the corrupt run) or 'mean' (mean of the clean runs)")
    metric = usable_metric(metric)
    clean, corrupt = pair_ids(model, clean_ids, corrupt_ids)
    keep = edge_mask(graph, edge_sets)
    n_pairs, n_sets = clean.shape[0], keep.shape[0]
    with model.operation_hooks_only_for(graph_roles(graph)):
        rows = rows_per_forward(model, graph, clean.shape[1], "fixed", batch_size, memory_budget)
        clean_out, clean_last = record_senders(model, graph, clean, rows)
        if ablation == "mean":
            source = {name: value.mean(0, keepdim=True) for name, value in clean_out.items()}
        else:
            source, _ = record_senders(model, graph, corrupt, rows)
        del clean_out
        # Rows are set-major: row = set * n_pairs + pair.
        edge_rows = EdgeRows((1 - keep).repeat_interleave(n_pairs, 0), torch.arange(n_pairs).repeat(n_sets))
        last = run_rows(
            model,
            graph,
            clean,
            edge_rows,
            mode="ablate",
            source=source,
            batch_size=batch_size,
            memory_budget=memory_budget,
        )
    values = score_rows(metric, model, last, edge_rows.pair_of_row, n_pairs, clean_last).float().cpu()
    return values.reshape(n_sets, n_pairs).mean(1)


def edge_patch_scores(
    model: AnyModel,
    clean_ids: Any,
    corrupt_ids: Any,
    graph: Graph,
    edges: Iterable[Any] | None = None,
    *,
    metric: Any,
    batch_size: int | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    """The exact effect of each single edge: metric(clean run with that edge alone carrying the
    corrupt value) - metric(clean run), averaged over prompt pairs; one value per edge (default:
    every edge of ``graph``, in its order)."""
    graph = _check_graph(model, graph)
    metric = usable_metric(metric)
    chosen = list(graph.edges) if edges is None else graph.parse_edges(edges)
    clean, corrupt = pair_ids(model, clean_ids, corrupt_ids)
    n_pairs = clean.shape[0]
    mask = torch.zeros(len(chosen), len(graph))
    for row, edge in enumerate(chosen):
        mask[row, graph.index(edge)] = 1.0
    patched = patch_edge_rows(model, graph, clean, corrupt, mask, batch_size, memory_budget)
    last, clean_last, edge_rows = patched.last, patched.run_last, patched.rows
    every_pair = torch.arange(n_pairs)
    clean_value = score_rows(metric, model, clean_last, every_pair, n_pairs, clean_last).float().cpu()
    values = score_rows(metric, model, last, edge_rows.pair_of_row, n_pairs, clean_last).float().cpu()
    return (values.reshape(len(chosen), n_pairs) - clean_value[None]).mean(1)


@dataclass
class PatchedRows:
    """The last-position outputs of fixed-delta rows and of the two unpatched runs."""

    last: torch.Tensor  # [rows * pairs, ...], row-major
    run_last: torch.Tensor  # the run being patched, unpatched
    other_last: torch.Tensor  # the run the senders' values come from
    rows: EdgeRows


def patch_edge_rows(
    model: AnyModel,
    graph: Graph,
    run_ids: torch.Tensor,
    other_ids: torch.Tensor,
    mask: torch.Tensor,
    batch_size: int | None = None,
    memory_budget: int | None = None,
) -> PatchedRows:
    """Each row of ``mask`` ``[rows, edges]`` run on every pair of ``run_ids``: the row's edges
    carry their senders' writes from ``other_ids`` (fixed deltas: path patching, single edges)."""
    n_pairs = run_ids.shape[0]
    with model.operation_hooks_only_for(graph_roles(graph)):
        per_forward = rows_per_forward(model, graph, run_ids.shape[1], "fixed", batch_size, memory_budget)
        base, run_last = record_senders(model, graph, run_ids, per_forward)
        source, other_last = record_senders(model, graph, other_ids, per_forward)
        # Rows are row-major: row = mask row * n_pairs + pair.
        edge_rows = EdgeRows(mask.repeat_interleave(n_pairs, 0), torch.arange(n_pairs).repeat(mask.shape[0]))
        last = run_rows(
            model,
            graph,
            run_ids,
            edge_rows,
            mode="fixed",
            source=source,
            base=base,
            batch_size=batch_size,
            memory_budget=memory_budget,
        )
    return PatchedRows(last, run_last, other_last, edge_rows)


__all__ = [
    "ABLATIONS",
    "EdgeRows",
    "Step",
    "edge_mask",
    "edge_metrics",
    "edge_patch_scores",
    "patch_edge_rows",
    "graph_roles",
    "read_senders",
    "record_senders",
    "rows_per_forward",
    "run_rows",
    "schedule",
    "usable_metric",
    "write_key",
]
