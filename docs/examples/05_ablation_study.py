"""What does each layer contribute? Zero- and mean-ablation of every layer's components.

For each model: on a batch of factual prompts of one token length, knock out one layer's attention
output, MLP output or SSM-mixer output at a time (whichever the model has), replacing it with zeros
or with its mean over the batch (per position), and report the change in the logit difference
between the answer and the counterfactual answer. Saves one bar chart per model.

    python docs/examples/05_ablation_study.py [SOURCE ...]     # default: the four zoo models
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODELS, Report, cli, factual_task, load, slug, writer_roles

import anylens as al

METHODS = ("zero", "mean")
N_PROMPTS = 8


def main(models: list[str] = DEFAULT_MODELS, out: str = "docs/examples/output") -> dict:
    report = Report(out, "05_ablation_study")
    results = {}
    for source in models:
        model = load(source)
        task = factual_task(model, N_PROMPTS)
        metric = al.metrics.logit_diff(task.answers, task.distractors)
        roles = writer_roles(model)
        effects: dict[str, list[float]] = {}
        baseline = None
        for role in roles:
            for method in METHODS:
                result = al.ablate(model, task.clean, role=role, over=("layer",), method=method, metric=metric)
                frame = result.to_frame().sort_values("layer")
                effects[f"{role}/{method}"] = [float(v) for v in frame["value"]]
                baseline = result.baseline

        report(
            f"== {source} ({model.adapter.name}): {len(task)} prompts ({task.source}), "
            f"e.g. {task.text(model)!r} -> {task.label(model, task.answers[0])!r}"
        )
        report(f"  logit diff (answer - counterfactual answer), unablated: {baseline:.3f}")
        report("  change when ablated:")
        report(f"  {'layer':>5}  " + "  ".join(f"{name:>15}" for name in effects))
        for layer in range(model.n_layers):
            report(f"  {layer:>5}  " + "  ".join(f"{values[layer]:>+15.3f}" for values in effects.values()))
        plot = report.figure(_plot(source, effects, model.n_layers), f"05_ablation_{slug(source)}")
        report()

        results[source] = {"baseline": baseline, "roles": roles, "effects": effects, "plot": str(plot)}
    report.save()
    return results


def _plot(source: str, effects: dict[str, list[float]], n_layers: int):
    """One panel per method; a bar per (layer, role) for the change in the metric."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(METHODS), figsize=(3.2 * len(METHODS), 2.8), sharey=True, squeeze=False)
    roles = list(dict.fromkeys(name.split("/")[0] for name in effects))
    width = 0.8 / len(roles)
    layers = np.arange(n_layers)
    for ax, method in zip(axes[0], METHODS):
        for index, role in enumerate(roles):
            ax.bar(layers + (index - (len(roles) - 1) / 2) * width, effects[f"{role}/{method}"], width, label=role)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_title(f"{method} ablation", fontsize=9)
    axes[0][0].set_ylabel("change in logit diff")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(source, fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    cli(main, __doc__)
