"""Which components carry the answer? A head-level activation-patching sweep on IOI prompts.

For each model: run clean IOI prompts ("When Mary and John went to the store, John gave a drink
to" -> " Mary") and their corruptions (the subject swapped, so the answer flips), then patch one
component at a time from the clean run into the corrupt run (denoising) and measure the logit
difference logit(IO) - logit(S). Components are per-head ``z`` over (layer, head) where the model
has heads, else ``mixer_out`` per layer; the choice is made from ``model.roles``. Prints the top
components by normalised score (0 = corrupt behaviour, 1 = clean) and saves the heatmap.

    python docs/examples/03_head_patching_sweep.py [SOURCE ...]     # default: the four zoo models
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODELS, Report, cli, component_role, ioi_task, load, slug

import anylens as al

N_PAIRS = 8
TOP = 5


def main(models: list[str] = DEFAULT_MODELS, out: str = "docs/examples/output") -> dict:
    report = Report(out, "03_head_patching_sweep")
    results = {}
    for source in models:
        model = load(source)
        task = ioi_task(model, N_PAIRS)
        role, over = component_role(model)
        metric = al.metrics.logit_diff(task.answers, task.distractors)
        result = al.patch(model, task.clean, task.corrupt, role=role, over=over, metric=metric)

        frame = result.to_frame().sort_values("normalized", ascending=False)
        report(f"== {source} ({model.adapter.name}): {role} over {' x '.join(over)}, {len(task)} pairs ({task.source})")
        report(f"  e.g. clean {task.text(model)!r} -> {task.label(model, task.answers[0])!r}")
        report(f"       corrupt {task.text(model, corrupt=True)!r}")
        report(f"  logit diff: clean {result.clean_metric:.3f}, corrupt {result.corrupt_metric:.3f}")
        forwards = result.meta["forwards"]
        report(
            f"  {len(frame)} components in {forwards} forward pass{'es' if forwards != 1 else ''}; top {TOP} by normalised score:"
        )
        top = []
        for row in frame.head(TOP).itertuples():
            label = f"head {row.layer}.{row.head}" if "head" in over else f"{role} {row.layer}"
            top.append((label, float(row.normalized)))
            report(f"    {label:<12} normalised {row.normalized:+.3f}   logit diff {row.metric:+.3f}")
        heatmap = report.figure(result.plot(), f"03_patching_{slug(source)}")
        report()

        results[source] = {
            "role": role,
            "over": list(over),
            "n_components": len(frame),
            "n_layers": model.n_layers,
            "n_heads": model.n_heads if "head" in over else None,
            "clean_metric": result.clean_metric,
            "corrupt_metric": result.corrupt_metric,
            "top": top,
            "frame": result.to_frame(),
            "heatmap": str(heatmap),
        }
    report.save()
    return results


if __name__ == "__main__":
    cli(main, __doc__)
