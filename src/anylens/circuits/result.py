"""A circuit: scored edges of the component graph, with pruning, faithfulness and a graph plot.

``CircuitResult`` is a :class:`~anylens.experiments.results.Result` (``to_frame``, ``save`` /
``load``) whose frame has one row per edge: ``sender``, ``receiver``, their layers, ``score``
(an estimate of metric(edge corrupted) - metric(clean), see :mod:`anylens.circuits.eap`) and
``rank`` (1 for the largest ``|score|``). The nodes' kinds, layers and heads travel in ``meta`` so
a loaded result prunes and plots without the model; ``faithfulness`` needs the model and prompts,
which a result computed in this process holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..core.errors import CircuitOptionError
from ..experiments.results import ComparesRuns, Result
from .graph import Graph

ABLATIONS = ("corrupt", "mean")


@dataclass(repr=False)
class CircuitResult(ComparesRuns, Result):
    """Edge scores of a circuit experiment; see the module."""

    model: Any = field(default=None, compare=False)
    graph: Graph | None = field(default=None, compare=False)
    clean_ids: torch.Tensor | None = field(default=None, compare=False)
    corrupt_ids: torch.Tensor | None = field(default=None, compare=False)
    metric: Any = field(default=None, compare=False)

    # -- views ----------------------------------------------------------------------------------
    @property
    def edges(self) -> list[str]:
        """The edges, ``"sender->receiver"``, in the frame's order."""
        return [f"{s}->{r}" for s, r in zip(self.frame["sender"], self.frame["receiver"])]

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` edges of largest ``|score|``, largest first."""
        frame = self.frame.assign(rank=_ranks(self.frame["score"]))
        return frame.sort_values("rank").head(_count(k, "k")).reset_index(drop=True)

    def prune(
        self, threshold: float | None = None, k: int | None = None, *, drop_orphans: bool = True
    ) -> CircuitResult:
        """A smaller circuit: the edges with ``|score| >= threshold``, or the ``k`` of largest
        ``|score|`` (both given: both hold).

        With ``drop_orphans`` (the default) an edge is kept only if its receiver reaches the
        logits through kept edges (the logits themselves, or a component with a kept edge out
        of it that does): an edge into a component whose output goes nowhere cannot change the
        metric. Edges need not be reached from the embedding: a sender with no kept edge into it
        still writes what it computes from the input it gets.
        """
        if threshold is None and k is None:
            raise CircuitOptionError("prune needs threshold=... (an |score| to keep) or k=... (a number of edges)")
        keep = pd.Series(True, index=self.frame.index)
        if threshold is not None:
            keep &= self.frame["score"].abs() >= float(threshold)
        if k is not None:
            keep &= _ranks(self.frame["score"]) <= _count(k, "k")
        frame = self.frame[keep]
        if drop_orphans:
            frame = frame[_reaches_logits(frame, self.meta)]
        frame = frame.reset_index(drop=True)
        frame["rank"] = _ranks(frame["score"])
        meta = dict(self.meta, kept_edges=len(frame))
        meta.pop("faithfulness", None)
        return CircuitResult(
            self.experiment,
            frame,
            meta,
            self.value,
            self.model,
            self.graph,
            self.clean_ids,
            self.corrupt_ids,
            self.metric,
        )

    # -- faithfulness ---------------------------------------------------------------------------
    def faithfulness(
        self, ks: list[int] | None = None, ablation: str = "corrupt", *, batch_size: int | None = None
    ) -> pd.DataFrame:
        """The metric with only the top-``k`` edges carrying clean values (every other edge ablated),
        for each ``k``: columns ``k``, ``fraction`` (of the graph's edges), ``metric`` (mean over
        pairs) and ``normalized`` = (metric - none) / (all - none), where ``none`` and ``all`` are
        the metric with no edge and with every edge kept under the same ablation (with
        ``ablation="corrupt"``: the corrupt and the clean run).

        ``ks`` defaults to a doubling series up to every edge. The curve is also kept in
        ``meta["faithfulness"]`` and shown by the HTML report.
        """
        if ablation not in ABLATIONS:
            raise CircuitOptionError(f"ablation={ablation!r}: use one of {', '.join(map(repr, ABLATIONS))}")
        if self.model is None or self.graph is None:
            raise CircuitOptionError(
                "this circuit result holds no model (it was loaded from a file): run al.circuit(...) again "
                "to measure its faithfulness"
            )
        from .edges import edge_metrics

        n_edges = len(self.graph)
        ks = _default_ks(len(self.frame)) if ks is None else [_count(k, "every k in ks") for k in ks]
        ordered = self.top(len(self.frame))
        positions = [self.graph.index(self.graph.edge(s, r)) for s, r in zip(ordered["sender"], ordered["receiver"])]
        # One row per set: none kept, the top k for each k, every edge of the graph kept.
        mask = torch.zeros(len(ks) + 2, n_edges)
        for row, k in enumerate(ks, start=1):
            mask[row, positions[:k]] = 1.0
        mask[-1] = 1.0
        values = edge_metrics(
            self.model,
            self.clean_ids,
            self.corrupt_ids,
            self.graph,
            mask,
            metric=self.metric,
            ablation=ablation,
            batch_size=batch_size,
        )
        values = [float(v) for v in values]
        none, every = values[0], values[-1]
        curve = pd.DataFrame(
            {
                "k": [min(k, len(positions)) for k in ks],
                "fraction": [min(k, len(positions)) / n_edges for k in ks],
                "metric": values[1:-1],
                "normalized": [(v - none) / (every - none) for v in values[1:-1]],
            }
        )
        self.meta["faithfulness"] = {
            "ablation": ablation,
            "none": none,
            "all": every,
            "curve": curve.to_dict(orient="list"),
        }
        return curve

    def smallest_faithful(self, target: float = 0.8) -> int | None:
        """The smallest ``k`` of the curve :meth:`faithfulness` measured last whose normalized value
        reaches ``target`` (None when no size tried reaches it)."""
        from .plot import smallest_reaching

        faithfulness = self.meta.get("faithfulness")
        if not faithfulness:
            raise CircuitOptionError("no faithfulness curve measured yet: call result.faithfulness(ks=[...]) first")
        return smallest_reaching(pd.DataFrame(faithfulness["curve"]), target)

    # -- plotting -------------------------------------------------------------------------------
    def plot(self, k: int | None = 40, ax: Any = None, title: str | None = None) -> Any:  # type: ignore[override]
        """The circuit as a graph, layers bottom to top: the embedding at the bottom, the logits at
        the top, heads side by side within their layer's row, each MLP half a row above its layer's
        attention. Edges are drawn for the ``k`` largest ``|score|`` (None: all), their width
        following ``|score|``, red where corrupting the edge raises the metric and blue where it
        lowers it."""
        from .plot import draw_circuit

        frame = self.frame if k is None else self.top(k)
        return draw_circuit(frame, self.meta, ax=ax, title=title or self.title)

    def plot_faithfulness(self, target: float | None = 0.8, ax: Any = None, title: str | None = None) -> Any:
        """The curve :meth:`faithfulness` measured last (kept in ``meta``, so a loaded result
        plots it too): normalized metric against ``k``, with the smallest ``k`` reaching
        ``target`` marked (None: no mark)."""
        from .plot import draw_faithfulness

        faithfulness = self.meta.get("faithfulness")
        if not faithfulness:
            raise CircuitOptionError("no faithfulness curve measured yet: call result.faithfulness(ks=[...]) first")
        curve = pd.DataFrame(faithfulness["curve"])
        heading = title or f"{self.title} · faithfulness ({faithfulness['ablation']} ablation)"
        return draw_faithfulness(curve, ax=ax, title=heading, target=target)

    @property
    def title(self) -> str:
        parts = [f"circuit ({self.meta.get('method', '')})", self.meta.get("model", ""), self.meta.get("metric", "")]
        return " · ".join(str(p) for p in parts if p)

    def __repr__(self) -> str:
        return (
            f"<CircuitResult {self.title}: {len(self.frame)} of {self.meta.get('graph_edges', len(self.frame))} "
            f"edges, {self.meta.get('level', '')} level>"
        )


def _count(k: Any, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise CircuitOptionError(f"{what}={k!r}: give a whole number of edges, 0 or more")
    return k


def _ranks(scores: pd.Series) -> pd.Series:
    return scores.abs().rank(ascending=False, method="first").astype(int)


def _default_ks(n: int) -> list[int]:
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def _reaches_logits(frame: pd.DataFrame, meta: dict[str, Any]) -> pd.Series:
    """Which edges' receivers reach the logits through edges of ``frame``.

    ``meta["reads"][sender]`` is the receiver a sender reads its input through (None for the
    embedding): a receiver is live when it is the logits or one of its senders has an edge to a
    live receiver. Senders are settled from the top of the model down (within a layer the MLP
    before attention), so one pass suffices.
    """
    reads, nodes = meta["reads"], meta["nodes"]
    live = {"logits"}
    by_sender = frame.groupby("sender")["receiver"].apply(list).to_dict()
    order = sorted(by_sender, key=lambda name: (nodes[name]["layer"], nodes[name]["stage"]), reverse=True)
    for sender in order:
        if reads.get(sender) and any(receiver in live for receiver in by_sender[sender]):
            live.add(reads[sender])
    return frame["receiver"].isin(live)


__all__ = ["ABLATIONS", "CircuitResult"]
