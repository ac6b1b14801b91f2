"""``al.circuit``: score every edge of a model's component graph on clean/corrupt prompt pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from ..core.errors import CircuitOptionError
from ..experiments import metrics as metrics_
from ..experiments.prompts import Prompts
from .eap import METHODS, edge_attribution
from .edges import same_length_pairs
from .graph import LEVELS, Graph, component_graph
from .result import CircuitResult, _ranks

if TYPE_CHECKING:
    from ..core.model import AnyModel


def circuit(
    model: AnyModel,
    clean: Prompts,
    corrupt: Prompts,
    *,
    metric: Any,
    method: str = "eap-ig",
    level: str = "head",
    steps: int = 5,
    batch_size: int | None = None,
) -> CircuitResult:
    """Score every edge of ``model``'s component graph at ``level`` ("head" or "layer") with
    ``method`` ("eap": one forward and backward pass per batch; "eap-ig": one per integration
    step, ``steps`` of them), on clean/corrupt prompt pairs of equal token length.

    A score estimates metric(edge corrupted) - metric(clean), averaged over pairs (docs/circuits.md,
    "Edge attribution"). ``metric`` must have a gradient (``logit_diff``, ``log_prob``, ``prob``,
    ``kl``, or a name such as ``"logit_diff"`` built from the pairs' words). ``batch_size`` bounds
    the pairs run at once (memory grows with it). Returns a :class:`CircuitResult`.
    """
    if method not in METHODS:
        raise CircuitOptionError(f"method={method!r}: use one of {', '.join(map(repr, METHODS))}")
    if level not in LEVELS:
        raise CircuitOptionError(f"level={level!r}: use one of {', '.join(map(repr, LEVELS))}")
    metric = metrics_.resolve(metric, clean)
    clean_ids, corrupt_ids = same_length_pairs(model, clean, corrupt)
    n_pairs = max(clean_ids.shape[0], corrupt_ids.shape[0])
    clean_ids, corrupt_ids = clean_ids.expand(n_pairs, -1), corrupt_ids.expand(n_pairs, -1)
    graph = component_graph(model, level)
    scored = edge_attribution(
        model, clean_ids, corrupt_ids, graph, metric=metric, method=method, steps=steps, batch_size=batch_size
    )
    frame = pd.DataFrame(
        {
            "sender": [e.sender.name for e in graph.edges],
            "receiver": [e.receiver.name for e in graph.edges],
            "sender_layer": [e.sender.layer for e in graph.edges],
            "receiver_layer": [e.receiver.layer for e in graph.edges],
            "score": scored.scores.double().numpy(),
        }
    )
    frame["rank"] = _ranks(frame["score"])
    meta = {
        "model": getattr(model, "name", ""),
        "metric": getattr(metric, "name", type(metric).__name__),
        "method": method,
        "level": level,
        "steps": steps if method == "eap-ig" else 1,
        "pairs": n_pairs,
        "clean_metric": scored.clean_metric,
        "corrupt_metric": scored.corrupt_metric,
        "forwards": scored.forwards,
        "backwards": scored.backwards,
        "graph_edges": len(graph),
        "kept_edges": len(graph),
        **node_meta(graph),
    }
    return CircuitResult(
        "circuit",
        frame,
        meta,
        "score",
        model=model,
        graph=graph,
        clean_ids=clean_ids,
        corrupt_ids=corrupt_ids,
        metric=metric,
    )


def node_meta(graph: Graph) -> dict[str, Any]:
    """What pruning and plotting need of the graph, JSON-ready: every node's kind, layer, head and
    stage, the number of layers, and the receiver each sender reads its input through."""
    nodes = {
        node.name: {"kind": node.kind, "layer": node.layer, "head": node.head, "stage": node.stage}
        for node in (*graph.senders, *graph.receivers)
    }
    reads: dict[str, str | None] = {}
    for sender in graph.senders:
        if sender.kind == "embed":
            reads[sender.name] = None
            continue
        same_layer = [r for r in graph.receivers if r.layer == sender.layer and r.kind != "logits"]
        exact = [r for r in same_layer if r.stage == sender.stage and r.kind != "block"]
        reads[sender.name] = (exact or same_layer)[0].name
    return {"nodes": nodes, "reads": reads, "n_layers": graph.n_layers}


__all__ = ["circuit", "node_meta"]
