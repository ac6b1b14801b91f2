"""Can one direction change the answer? Steering with the France - Italy direction.

For each model: the steering vector at every layer is the difference of the mean residual stream
(``resid_post``, last token) over capital prompts about France and the same prompts about Italy
(contrastive activation addition). Added to the Italy prompts while the model generates, does the
model answer " Paris" instead of " Rome"? Reports the success rate per layer and scale, one
steered generation, and a heatmap.

    python docs/examples/06_steering.py [SOURCE ...]     # default: the four zoo models
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODELS, Report, cli, load, random_task, slug  # noqa: E402

import anylens as al  # noqa: E402

TEMPLATES = (
    "The capital of {c} is",
    "{c}'s capital city is",
    "In {c}, the capital is",
    "{c} has its capital in",
    "The government of {c} meets in",
    "In {c}, the capital city is",
)
SCALES = (0.5, 1.0, 2.0)
NEW_TOKENS = 4


def contrast(model) -> dict:
    """France and Italy prompts and the target " Paris" where the tokenizer can express them;
    else one random-id prompt and its copy with another last token, the target being the first
    one's own top prediction (so steering toward it has a known answer)."""
    try:
        target = model.token_id(" Paris")
        positive = [t.format(c="France") for t in TEMPLATES]
        negative = [t.format(c="Italy") for t in TEMPLATES]
        unknown = getattr(model.tokenizer, "unk_token_id", None)
        if unknown is None or all(unknown not in model.tokenizer(p)["input_ids"] for p in positive + negative):
            return {"positive": positive, "negative": negative, "target": target, "source": "dataset"}
    except al.TokenizationError:
        pass
    task = random_task(model, 1)
    return {"positive": task.clean, "negative": task.corrupt, "target": task.answers[0], "source": "random ids"}


def main(models: list[str] = DEFAULT_MODELS, out: str = "docs/examples/output") -> dict:
    report = Report(out, "06_steering")
    results = {}
    for source in models:
        model = load(source)
        task = contrast(model)
        metric = al.metrics.top1(task["target"])
        sweep = al.steering_sweep(
            model, task["negative"], (task["positive"], task["negative"]), scales=SCALES, metric=metric
        )
        rates = sweep.pivot("layer", "scale")  # the mean of 0/1 over prompts: a success rate
        best_layer, best_scale = min(
            ((layer, scale) for layer in rates.index for scale in rates.columns),
            key=lambda cell: (-rates.loc[cell], cell[1], cell[0]),
        )
        vector = al.steering_vector(model, task["positive"], task["negative"], layer=int(best_layer))
        steered = al.steer(
            model, task["negative"][:1], vector, layer=int(best_layer), scale=best_scale, max_new_tokens=NEW_TOKENS
        )
        plain = al.generate(model, task["negative"][:1], max_new_tokens=NEW_TOKENS)
        target = model.tokenizer.decode([model.token_id(task["target"])])

        report(
            f"== {source} ({model.adapter.name}): {len(task['negative'])} prompts ({task['source']}), target {target!r}"
        )
        report(f"  unsteered rate: {sweep.meta['baseline']:.2f}")
        report("  success rate (first generated token is the target), layer x scale:")
        report(f"  {'layer':>5}  " + "  ".join(f"{scale:>6}" for scale in rates.columns))
        for layer in rates.index:
            report(f"  {layer:>5}  " + "  ".join(f"{rates.loc[layer, scale]:>6.2f}" for scale in rates.columns))
        shown = task["negative"][0] if isinstance(task["negative"], list) else "(random ids)"
        report(f"  {shown!r}: unsteered {plain.text[0]!r}; layer {best_layer} x {best_scale}: {steered.text[0]!r}")
        plot = report.figure(sweep.plot(title=f"{source}: steering toward {target!r}"), f"06_steering_{slug(source)}")
        report()

        results[source] = {
            "rates": {
                int(layer): {float(s): float(rates.loc[layer, s]) for s in rates.columns} for layer in rates.index
            },
            "baseline": sweep.meta["baseline"],
            "best": (int(best_layer), float(best_scale)),
            "steered_tokens": steered.new_tokens[0].tolist(),
            "task": task,
            "plot": str(plot),
        }
    report.save()
    return results


if __name__ == "__main__":
    cli(main, __doc__)
