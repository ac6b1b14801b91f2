"""Edge attribution: every edge of the component graph scored from a few forward/backward passes.

**Sign convention.** A score estimates ``metric(edge corrupted) - metric(clean)``: the change of
the metric when the edge alone carries its sender's corrupt value into the clean run, the quantity
``edge_patch_scores`` computes exactly. An edge ``u -> v`` carries ``a_u`` (what sender ``u`` writes
into the residual stream) into ``v``'s branch input; corrupting it adds ``a_u^corrupt - a_u^clean``
to that input, so to first order

    score(u -> v) = (a_u^corrupt - a_u^clean) · g_v

summed over positions and ``d_model`` and averaged over prompt pairs.

* **EAP**: ``g_v`` is the gradient of the metric with respect to ``v``'s branch input on the clean
  run (one forward and one backward pass per batch of pairs).
* **EAP-IG**: ``g_v`` is that gradient averaged over ``steps`` runs whose embedding output
  (``resid_pre[0]``) is ``e_corrupt + alpha (e_clean - e_corrupt)`` at ``alpha = k / steps``,
  ``k = 1 .. steps`` (a right Riemann sum: ``steps=1`` is EAP exactly). One forward and backward
  per step. Summed over the edges leaving the embedding, the scores tend to
  ``metric(corrupt) - metric(clean)`` as ``steps`` grows (the completeness of integrated gradients).

A receiver's gradient is the gradient through its branch alone, not the residual stream's total
gradient: a zero tensor that requires grad is added to the branch-input role, which the adapter
maps onto the input of the norm that starts the branch, so only that branch sees it. A sender
writing per head contributes ``(z_corrupt - z_clean)[..., h, :] @ W_O[h]``.

Memory: per batch, the senders' clean and corrupt outputs, every receiver's gradient
``[batch, pos, d_model]``, and one sender's delta (one layer's heads) at a time; never an
``edges x pos x d_model`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import CircuitOptionError, MetricGradientError
from ..core.roles import LAYER_ROLE_ORDER
from ..engine import last_logits, last_logits_kwargs, metric_columns, read_last, score_rows
from .edges import graph_roles
from .graph import Graph, Node

if TYPE_CHECKING:
    from ..core.model import AnyModel

METHODS = ("eap", "eap-ig")


@dataclass
class EdgeScores:
    """Scores of every edge of ``graph`` (``[edges]``, mean over pairs; ``per_pair`` ``[edges, pairs]``),
    the metric on the clean and corrupt runs (mean over pairs) and the passes it took."""

    graph: Graph
    scores: torch.Tensor
    per_pair: torch.Tensor
    clean_metric: float
    corrupt_metric: float
    forwards: int
    backwards: int


def edge_attribution(
    model: AnyModel,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    graph: Graph,
    *,
    metric: Any,
    method: str = "eap",
    steps: int = 5,
    batch_size: int | None = None,
) -> EdgeScores:
    """EAP or EAP-IG scores of every edge of ``graph`` on token ids ``[pairs, pos]`` (see the module)."""
    if method not in METHODS:
        raise CircuitOptionError(f"method={method!r}: use one of {', '.join(map(repr, METHODS))}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CircuitOptionError(f"steps={steps!r}: give a whole number of integration steps, at least 1")
    steps = 1 if method == "eap" else steps
    n_pairs = clean_ids.shape[0]
    size = n_pairs if batch_size is None else int(batch_size)
    if size < 1:
        raise CircuitOptionError(f"batch_size={batch_size!r}: give a whole number of prompt pairs, at least 1")
    per_pair, clean_values, corrupt_values = [], [], []
    forwards = backwards = 0
    for start in range(0, n_pairs, size):
        clean, corrupt = clean_ids[start : start + size], corrupt_ids[start : start + size]
        # Only the operations the graph's roles step into are hooked: the traces run faster.
        with model.operation_hooks_only_for(graph_roles(graph)):
            scores, clean_metric, corrupt_metric = _batch_scores(model, clean, corrupt, graph, metric, steps)
        per_pair.append(scores)
        clean_values.append(clean_metric)
        corrupt_values.append(corrupt_metric)
        forwards += 1 + steps
        backwards += steps
    every = torch.cat(per_pair, 1)
    return EdgeScores(
        graph,
        every.mean(1),
        every,
        float(torch.cat(clean_values).mean()),
        float(torch.cat(corrupt_values).mean()),
        forwards,
        backwards,
    )


# -- one batch ---------------------------------------------------------------------------------
def _sender_roles(graph: Graph) -> list[tuple[str, int]]:
    """(role, layer) of every sender's output, once each (all heads of a layer read one ``z``)."""
    seen: dict[tuple[str, int], None] = {}
    for node in graph.senders:
        seen[(node.output_role, max(node.layer, 0))] = None
    return list(seen)


def _receiver_site(graph: Graph, node: Node) -> tuple[str, int]:
    # The logits read the last layer's resid_post; every other receiver its own layer's branch input.
    return node.input_role, min(node.layer, graph.n_layers - 1)


def _forward_order(site: tuple[str, int]) -> tuple[int, int]:
    role, layer = site
    return layer, LAYER_ROLE_ORDER.index(role)


def _record_senders(model: AnyModel, ids: torch.Tensor, sites: list[tuple[str, int]], metric: Any) -> tuple:
    """Every sender output of a run on ``ids`` and its final-position logits, no gradients (the corrupt run)."""
    columns = metric_columns(model, metric)
    acts = {}
    with torch.no_grad(), model.trace(ids.to(model.device), **last_logits_kwargs(model)):
        for role, layer in sorted(sites, key=_forward_order):
            acts[(role, layer)] = model.role(role).read(layer).detach().clone().save()
        saved = read_last(model, columns)
    return acts, last_logits(model, saved, columns).detach()


def _batch_scores(
    model: AnyModel, clean: torch.Tensor, corrupt: torch.Tensor, graph: Graph, metric: Any, steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair scores ``[edges, pairs]`` and the clean and corrupt metric ``[pairs]`` of one batch."""
    senders = _sender_roles(graph)
    receivers = list(dict.fromkeys(_receiver_site(graph, node) for node in graph.receivers))
    corrupt_acts, corrupt_last = _record_senders(model, corrupt, senders, metric)
    embed = ("resid_pre", 0)
    grads: dict[tuple[str, int], torch.Tensor] = {}
    clean_acts: dict = {}
    clean_last = None
    clean_metric = None
    # alpha = 1 (the clean run itself) first: its logits are the reference a comparing metric reads.
    for k in range(steps, 0, -1):
        alpha = k / steps
        run = _gradient_run(
            model, clean, senders, receivers, corrupt_acts[embed] if alpha < 1 else None, alpha, metric, clean_last
        )
        if alpha == 1:
            clean_acts, clean_last, clean_metric = run.acts, run.last, run.values
        for site, grad in run.grads.items():
            grads[site] = grad / steps + grads.get(site, 0)
    # Scored after the clean run, whose logits a comparing metric (KL from clean) measures against.
    corrupt_metric = _metric_values(model, metric, corrupt_last, clean_last).float().cpu()
    gradients = {node.name: grads[_receiver_site(graph, node)] for node in graph.receivers}
    return _edge_products(model, graph, clean_acts, corrupt_acts, gradients), clean_metric, corrupt_metric


def _metric_values(model: AnyModel, metric: Any, last: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    n = last.shape[0]
    return score_rows(metric, model, last, torch.arange(n), n, reference if reference is not None else last.detach())


@dataclass
class _Run:
    acts: dict
    grads: dict
    last: torch.Tensor
    values: torch.Tensor


def _gradient_run(
    model: AnyModel,
    ids: torch.Tensor,
    senders: list[tuple[str, int]],
    receivers: list[tuple[str, int]],
    corrupt_embed: torch.Tensor | None,
    alpha: float,
    metric: Any,
    reference: torch.Tensor | None,
) -> _Run:
    """One forward and backward pass on ``ids``; the embedding output interpolated towards
    ``corrupt_embed`` (``alpha`` = 1 leaves it clean). Returns the senders' outputs, the gradient
    of the metric (summed over pairs) at each receiver's branch input, and the final logits."""
    columns = metric_columns(model, metric)
    acts, zeros = {}, {}
    # Sender outputs are read on the clean run only (alpha = 1); other steps need gradients alone.
    reads = [(site, "send") for site in (senders if corrupt_embed is None else [])]
    reads += [(site, "receive") for site in receivers]
    with torch.enable_grad():
        with model.trace(ids.to(model.device), **last_logits_kwargs(model)):
            if corrupt_embed is not None:
                access = model.role("resid_pre")
                clean_embed = access.read(0)
                access.write(0, corrupt_embed + alpha * (clean_embed - corrupt_embed))
            # Sender reads and receiver perturbations in forward order; at one site, read first.
            for (role, layer), what in sorted(reads, key=lambda r: (_forward_order(r[0]), r[1] == "receive")):
                access = model.role(role)
                if what == "send":
                    acts[(role, layer)] = access.read(layer).detach().clone().save()
                else:
                    _, added = access.perturb(layer)
                    zeros[(role, layer)] = added.save()
            saved = read_last(model, columns)
        last = last_logits(model, saved, columns)
        values = _metric_values(model, metric, last, reference)
        if not values.requires_grad:
            raise MetricGradientError(
                f"metric {getattr(metric, 'name', type(metric).__name__)!r} has no gradient with respect to the "
                "model's activations (it returns a value computed without gradients, such as top-1 accuracy or a "
                "rank), so edge attribution (eap, eap-ig) cannot score edges with it: use a differentiable metric "
                "such as al.metrics.logit_diff(answer, distractor), or score edges exactly with edge_patch_scores"
            )
        sites = list(zeros)
        found = torch.autograd.grad(values.sum(), [zeros[s] for s in sites], allow_unused=True)
    grads = {}
    for site, grad in zip(sites, found):
        access = model.role(site[0])
        grad = torch.zeros_like(zeros[site]) if grad is None else grad
        grads[site] = access.view_of(grad, site[1]).detach().float()
    return _Run(acts, grads, last.detach(), values.detach().float().cpu())


def _edge_products(
    model: AnyModel, graph: Graph, clean: dict, corrupt: dict, grads: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``(a_u^corrupt - a_u^clean) · g_v`` per edge and pair, ``[edges, pairs]``.

    One sender at a time: its delta ``[pairs, pos, d_model]`` against every receiver's gradient
    at once; a layer's per-head deltas are made together and dropped when the next layer starts.
    """
    receivers = [node.name for node in graph.receivers]
    g = torch.stack([grads[name].flatten(1) for name in receivers])  # [R, pairs, pos * d_model]
    r_index = {name: i for i, name in enumerate(receivers)}
    edges_of: dict[str, list[tuple[int, int]]] = {}
    for index, edge in enumerate(graph.edges):
        edges_of.setdefault(edge.sender.name, []).append((index, r_index[edge.receiver.name]))
    scores = torch.zeros(len(graph.edges), g.shape[1])
    heads: tuple[int, torch.Tensor] | None = None
    for node in graph.senders:
        site = (node.output_role, max(node.layer, 0))
        if node.kind == "head":
            if heads is None or heads[0] != node.layer:
                z_delta = (corrupt[site] - clean[site]).float()  # [pairs, pos, heads, d_head]
                w_o = model.W_O(node.layer).detach().float().to(z_delta.device)  # [heads, d_head, d_model]
                heads = (node.layer, torch.einsum("bphe,hed->hbpd", z_delta, w_o))
            delta = heads[1][node.head]
        else:
            delta = (corrupt[site] - clean[site]).float()
        products = torch.einsum("bk,rbk->rb", delta.flatten(1).to(g.device), g).cpu()  # [R, pairs]
        for index, receiver in edges_of.get(node.name, []):
            scores[index] = products[receiver]
    return scores


__all__ = ["METHODS", "EdgeScores", "edge_attribution"]
