"""Drawing a circuit: components placed by layer (bottom to top) and head, edges by score; and its
faithfulness curve."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ..experiments.results import figure_and_axes

#: Vertical offset of each stage within a layer's row: the token mixer at the row, the MLP above it.
_STAGE_OFFSET = {0: 0.0, 1: 0.5}


def node_position(name: str, meta: dict[str, Any]) -> tuple[float, float]:
    """(x, y) of a node: y is its layer (the embedding at -1, the logits at n_layers), half a row
    up for an MLP; heads of a layer spread along x, whole components at x = 0."""
    node = meta["nodes"][name]
    n_heads = 1 + max((n["head"] for n in meta["nodes"].values() if n["head"] is not None), default=0)
    x = 0.0 if node["head"] is None else node["head"] - (n_heads - 1) / 2
    if node["kind"] == "mlp":
        x = (n_heads + 1) / 2  # MLPs to the right of the heads, so head edges into them stay visible
    return x, node["layer"] + _STAGE_OFFSET.get(node["stage"], 0.0)


def draw_circuit(frame: pd.DataFrame, meta: dict[str, Any], ax: Any = None, title: str = "") -> Any:
    """The edges of ``frame`` on a new (or the given) matplotlib axes; returns the figure."""
    fig, ax = figure_and_axes(ax, (8, min(2.0 + 0.9 * (meta["n_layers"] + 2), 14)))
    bound = float(frame["score"].abs().max()) if len(frame) else 1.0
    bound = bound or 1.0
    used: set[str] = set()
    for sender, receiver, score in zip(frame["sender"], frame["receiver"], frame["score"]):
        (x0, y0), (x1, y1) = node_position(sender, meta), node_position(receiver, meta)
        # A receiver is drawn just below the row of what it feeds, so edges point up into it.
        y1 -= 0.18
        strength = abs(score) / bound
        colour = "#c0392b" if score > 0 else "#2c6fbb"
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={
                "arrowstyle": "-|>",
                "color": colour,
                "alpha": 0.25 + 0.75 * strength,
                "lw": 0.4 + 4.0 * strength,
                "shrinkA": 6,
                "shrinkB": 2,
                "connectionstyle": "arc3,rad=0.08",
            },
        )
        used.update((sender, receiver))
    for name in sorted(used):
        x, y = node_position(name, meta)
        kind = meta["nodes"][name]["kind"]
        receiver_only = kind in ("attn", "mixer", "block", "logits") and name not in set(frame["sender"])
        if kind == "logits" or (receiver_only and kind != "mlp"):
            y -= 0.18
        ax.scatter([x], [y], s=160, color="#f4f6fa", edgecolors="#1d2433", zorder=3)
        ax.annotate(name, (x, y), fontsize=7, ha="center", va="center", zorder=4)
    n = meta["n_layers"]
    ax.set_ylim(-1.6, n + 0.6)
    ax.set_yticks(range(-1, n + 1))
    ax.set_yticklabels(["embed"] + [f"layer {i}" for i in range(n)] + ["logits"], fontsize=8)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(f"{title}\nred: corrupting the edge raises the metric; blue: lowers it", fontsize=9)
    fig.tight_layout()
    return fig


def smallest_reaching(curve: pd.DataFrame, target: float) -> int | None:
    """The smallest ``k`` of a faithfulness curve whose ``normalized`` is at least ``target``
    (None when no size tried reaches it)."""
    reached = curve.loc[curve["normalized"] >= target, "k"]
    return int(reached.min()) if len(reached) else None


def draw_faithfulness(curve: pd.DataFrame, ax: Any = None, title: str = "", target: float | None = 0.8) -> Any:
    """Normalized faithfulness against the number of edges kept (log scale: the sizes tried
    usually double), with ``target`` as a dashed line and the smallest ``k`` reaching it marked."""
    fig, ax = figure_and_axes(ax, (6, 3.6))
    curve = curve.sort_values("k")
    ax.plot(curve["k"], curve["normalized"], marker="o", markersize=4, color="#1d2433", lw=1.4)
    ax.axhline(1.0, color="#8a94a6", lw=0.8)
    ax.axhline(0.0, color="#8a94a6", lw=0.8)
    if target is not None:
        ax.axhline(target, color="#c0392b", lw=0.9, ls="--")
        k = smallest_reaching(curve, target)
        if k is not None:
            value = float(curve.loc[curve["k"] == k, "normalized"].iloc[0])
            ax.scatter([k], [value], s=70, facecolors="none", edgecolors="#c0392b", zorder=3)
            ax.annotate(f"{k} edges: {value:.2f}", (k, value), xytext=(12, -24), textcoords="offset points", fontsize=8)
    if (curve["k"] > 0).all():
        from matplotlib.ticker import StrMethodFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 1, 2, 4, ... rather than powers of two
    ax.set_xlabel("edges kept (top k by |score|)", fontsize=9)
    ax.set_ylabel("normalized metric", fontsize=9)
    ax.set_title(f"{title}\n0: no edge kept, 1: every edge kept", fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["draw_circuit", "draw_faithfulness", "node_position", "smallest_reaching"]
