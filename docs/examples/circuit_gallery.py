"""The figures of docs/circuits.md's gallery: each zoo model's IOI circuit and faithfulness curve.

The circuit is the demo's (``anylens.demo``): EAP-IG with five steps on the demo's eight IOI pairs,
at head level where the model's component graph has heads, else at layer level; the faithfulness
curve (corrupt ablation) at 1, 2, 4, ... edges and every edge, refined below the first size that
keeps 80%. Writes ``<model>_circuit.png`` and ``<model>_faithfulness.png`` and ``gallery.txt``
(the numbers the docs quote) to ``docs/circuits/``::

    python docs/examples/circuit_gallery.py [--out DIR] [SOURCE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import anylens as al  # noqa: E402
from anylens.demo import (  # noqa: E402
    CIRCUIT_PLOT_EDGES,
    CIRCUIT_TARGET,
    DEFAULT_MODELS,
    demo_ioi_pairs,
    faithful_size,
    ioi_circuit,
)

DPI = 80  # the figures are committed: keep each well under 150 KB


def gallery(source: str, out: Path) -> list[str]:
    """Draw one model's circuit and faithfulness curve into ``out``; return the lines to print."""
    model = al.load(source)
    pairs = demo_ioi_pairs(model.tokenizer)
    metric = al.metrics.logit_diff([p.answer for p in pairs], [p.distractor for p in pairs])
    result = ioi_circuit(model, [p.clean for p in pairs], [p.corrupt for p in pairs], metric)
    k = faithful_size(result)
    stem = source.replace(":", "_")
    figures = {
        "circuit": result.plot(k=CIRCUIT_PLOT_EDGES),
        "faithfulness": result.plot_faithfulness(target=CIRCUIT_TARGET),
    }
    for name, figure in figures.items():
        figure.savefig(out / f"{stem}_{name}.png", dpi=DPI, bbox_inches="tight")
        plt.close(figure)
    meta, faith = result.meta, result.meta["faithfulness"]
    curve = ", ".join(
        f"{k_}: {round(v, 2) + 0.0:.2f}" for k_, v in zip(faith["curve"]["k"], faith["curve"]["normalized"])
    )
    top = result.top(5)
    return [
        f"== {source}: {meta['level']} level, {meta['graph_edges']} edges, EAP-IG {meta['steps']} steps, "
        f"{meta['pairs']} IOI pairs",
        f"logit diff clean {meta['clean_metric']:.2f}, corrupt {meta['corrupt_metric']:.2f}",
        f"faithfulness (corrupt ablation), normalized by k: {curve}",
        f"smallest k reaching {CIRCUIT_TARGET}: {k} ({k / meta['graph_edges']:.1%} of the edges)",
        "top edges: " + ", ".join(f"{s}->{r} ({v:+.2f})" for s, r, v in zip(top.sender, top.receiver, top.score)),
        f"figures: {stem}_circuit.png (the {CIRCUIT_PLOT_EDGES} strongest edges), {stem}_faithfulness.png",
    ]


def main(models: list[str], out: str = "docs/circuits") -> Path:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [line for source in models for line in gallery(source, folder)]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    (folder / "gallery.txt").write_text(text, encoding="utf-8")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", default=list(DEFAULT_MODELS), help="model sources (default: the zoo)")
    parser.add_argument("--out", default="docs/circuits", help="where the figures and gallery.txt go")
    args = parser.parse_args()
    main(args.sources or list(DEFAULT_MODELS), out=args.out)
