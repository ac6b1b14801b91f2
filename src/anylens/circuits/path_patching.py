"""Path patching: a set of senders' effect through a set of receivers only.

``al.path_patch(model, clean, corrupt, senders=..., receivers=..., metric=...)`` runs the patched
prompt (clean when noising, corrupt when denoising) with each receiver's branch input changed by
what the senders wrote in the other run instead: receiver input + sum over senders of (other-run
write - this-run write). The residual stream and every other component read the unchanged
writes, so the senders reach the metric only through the receivers (and what runs after them).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import product
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.errors import CircuitGraphError, EdgeOrderError, OptionError
from ..engine.metric_rows import score_rows
from ..experiments.patching import DIRECTIONS
from ..experiments.results import Result
from .edges import pair_ids, patch_edge_rows, usable_metric
from .graph import HEAD_NAME, Graph, Node, component_graph

if TYPE_CHECKING:
    from ..core.model import AnyModel


def path_patch(
    model: AnyModel,
    clean: Any,
    corrupt: Any,
    *,
    senders: Any,
    receivers: Any = None,
    metric: Any,
    direction: str = "noise",
    level: str | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    per_prompt: bool = False,
) -> Result:
    """Patch the senders' writes into the receivers' inputs only, and measure ``metric``.

    ``senders`` and ``receivers`` are node names of :func:`component_graph` (``"embed"``,
    ``"a1.h3"``, ``"attn2"``, ``"mlp0"``, ``"mixer1"``, ``"block2"``, ``"logits"``) or
    :class:`Node` objects: one node, a list (one set), or a list of lists (several sets). Each
    (sender set, receiver set) is one row of the result, all run batched. ``receivers=None``
    means every receiver after the senders; a sender-receiver pair without an edge between them
    (a receiver before the sender) is left out of its row, but every sender must reach some
    receiver of its row and every receiver must be reached by some sender. ``direction="noise"``
    (default) patches corrupt writes into the clean run, ``"denoise"`` clean writes into the
    corrupt run. ``level`` is "head" or "layer" (default: "head" when a sender is a head).

    Returns a :class:`Result` with one row per (sender set, receiver set) (and per prompt pair
    with ``per_prompt``): ``senders``, ``receivers``, ``edges`` (how many edges were patched),
    ``metric`` (the patched run's, averaged over pairs) and ``normalized`` = (metric - corrupt) /
    (clean - corrupt); ``meta`` holds ``clean_metric`` and ``corrupt_metric``.
    """
    if direction not in DIRECTIONS:
        raise OptionError(
            f"direction={direction!r}: use 'noise' (corrupt into clean) or 'denoise' (clean into corrupt)"
        )
    sender_sets = _node_sets(senders, "senders")
    graph = component_graph(model, level or _level_of(sender_sets))
    sender_sets = [[graph.sender(node) for node in nodes] for nodes in sender_sets]
    receiver_sets = (
        [[graph.receiver(node) for node in nodes] for nodes in _node_sets(receivers, "receivers")]
        if receivers is not None
        else [None]
    )
    metric = usable_metric(metric, clean)
    clean_ids, corrupt_ids = pair_ids(model, clean, corrupt)
    n_pairs = clean_ids.shape[0]

    rows, labels = [], []
    for send, receive in product(sender_sets, receiver_sets):
        edges = _row_edges(graph, send, receive)
        row = torch.zeros(len(graph))
        row[[graph.index(edge) for edge in edges]] = 1.0
        rows.append(row)
        receive = receive or sorted({e.receiver for e in edges}, key=lambda n: (n.layer, n.stage))
        labels.append((",".join(n.name for n in send), ",".join(n.name for n in receive), len(edges)))
    mask = torch.stack(rows)

    run_ids, other_ids = (clean_ids, corrupt_ids) if direction == "noise" else (corrupt_ids, clean_ids)
    patched = patch_edge_rows(model, graph, run_ids, other_ids, mask, batch_size, memory_budget)
    last, run_last, other_last, edge_rows = patched.last, patched.run_last, patched.other_last, patched.rows
    clean_last, corrupt_last = (run_last, other_last) if direction == "noise" else (other_last, run_last)
    every_pair = torch.arange(n_pairs)
    clean_values = score_rows(metric, model, clean_last, every_pair, n_pairs, clean_last).float().cpu()
    corrupt_values = score_rows(metric, model, corrupt_last, every_pair, n_pairs, clean_last).float().cpu()
    values = score_rows(metric, model, last, edge_rows.pair_of_row, n_pairs, clean_last).float().cpu()
    values = values.reshape(len(rows), n_pairs)
    frame = _frame(labels, values, clean_values, corrupt_values, per_prompt)
    meta = {
        "model": model.name,
        "adapter": model.adapter.name,
        "level": graph.level,
        "direction": direction,
        "metric": getattr(metric, "name", type(metric).__name__),
        "metric_spec": repr(metric),
        "n_prompts": n_pairs,
        "clean_metric": float(clean_values.mean()),
        "corrupt_metric": float(corrupt_values.mean()),
        "clean_metric_per_prompt": clean_values.tolist(),
        "corrupt_metric_per_prompt": corrupt_values.tolist(),
    }
    return Result("path_patch", frame, meta, value="normalized")


def _node_sets(nodes: Any, what: str) -> list[list[str | Node]]:
    """One node, a list of nodes (one set) or a list of lists (several sets) -> a list of sets."""
    if isinstance(nodes, (str, Node)):
        return [[nodes]]
    if not isinstance(nodes, Sequence) or not nodes:
        raise CircuitGraphError(
            f"{what}={nodes!r}: give a node name (such as 'a1.h3' or 'mlp0'), a list of them, or a list of lists"
        )
    if all(isinstance(node, (str, Node)) for node in nodes):
        return [list(nodes)]
    sets = []
    for group in nodes:
        if isinstance(group, (str, Node)):
            group = [group]
        if not isinstance(group, Sequence) or not group or not all(isinstance(n, (str, Node)) for n in group):
            raise CircuitGraphError(
                f"{what}: cannot read {group!r} as a set of nodes; give node names or Nodes, as one list or a list "
                "of lists"
            )
        sets.append(list(group))
    return sets


def _level_of(sender_sets: list[list[str | Node]]) -> str:
    def is_head(node: str | Node) -> bool:
        return node.kind == "head" if isinstance(node, Node) else bool(HEAD_NAME.match(node))

    return "head" if any(is_head(node) for nodes in sender_sets for node in nodes) else "layer"


def _row_edges(graph: Graph, senders: list[Node], receivers: list[Node] | None) -> list:
    wanted = None if receivers is None else {node.name for node in receivers}
    edges = [
        edge
        for sender in senders
        for edge in graph.edges_from(sender)
        if wanted is None or edge.receiver.name in wanted
    ]
    reached = {edge.receiver.name for edge in edges}
    sending = {edge.sender.name for edge in edges}
    late = [node.name for node in senders if node.name not in sending]
    if late:
        raise EdgeOrderError(
            f"senders {late} come after every receiver given ({', '.join(sorted(wanted or []))}): a sender "
            "reaches only receivers later in the forward pass; give later receivers or earlier senders"
        )
    early = [node.name for node in receivers or [] if node.name not in reached]
    if early:
        raise EdgeOrderError(
            f"receivers {early} come before every sender given ({', '.join(n.name for n in senders)}): "
            "a receiver reads only senders earlier in the forward pass"
        )
    return edges


def _frame(
    labels: list[tuple[str, str, int]],
    values: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    per_prompt: bool,
) -> pd.DataFrame:
    if per_prompt:
        gap = (clean - corrupt)[None, :]
        metric, low = values, corrupt[None, :]
    else:
        gap = (clean.mean() - corrupt.mean()).reshape(1, 1)
        metric, low = values.mean(1, keepdim=True), corrupt.mean().reshape(1, 1)
    flat = gap.abs() < 1e-8
    if bool(flat.any()):
        warnings.warn(
            "clean and corrupt runs give the same metric value, so the normalised score is undefined (NaN); "
            "choose prompts or a metric that tell the runs apart",
            stacklevel=3,
        )
    normalized = torch.where(flat, torch.nan, (metric - low) / torch.where(flat, 1.0, gap).expand_as(metric))
    n = metric.shape[1]
    data: dict[str, Any] = {
        "senders": [label[0] for label in labels for _ in range(n)],
        "receivers": [label[1] for label in labels for _ in range(n)],
        "edges": [label[2] for label in labels for _ in range(n)],
    }
    if per_prompt:
        data["prompt"] = list(range(n)) * len(labels)
    data["metric"] = metric.double().reshape(-1).numpy()
    data["normalized"] = normalized.double().reshape(-1).numpy()
    return pd.DataFrame(data)


__all__ = ["path_patch"]
