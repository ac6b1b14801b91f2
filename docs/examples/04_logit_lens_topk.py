"""What does each layer predict? The logit lens's top-k predictions per layer.

For each model: the logit lens on a factual prompt, and a compact table of the three most likely
next tokens (with their probabilities) that every layer's residual stream predicts at the last
position, read through the model's own final norm and unembedding.

    python docs/examples/04_logit_lens_topk.py [SOURCE ...]     # default: the four zoo models
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODELS, Report, cli, factual_task, load

import anylens as al

K = 3


def main(models: list[str] = DEFAULT_MODELS, out: str = "docs/examples/output") -> dict:
    report = Report(out, "04_logit_lens_topk")
    results = {}
    for source in models:
        model = load(source)
        task = factual_task(model, n=1)
        prompt = task.prompt(0)
        lens = al.logit_lens(model, prompt, k=K, positions=[-1])  # only the last position

        top = lens.top_k()  # one row per (layer, pos, rank)
        report(
            f"== {source} ({model.adapter.name}): {task.text(model)!r} (answer {task.label(model, task.answers[0])!r})"
        )
        report(f"  {'layer':>5}  " + "  ".join(f"{f'top-{r + 1}':<18}" for r in range(K)))
        table = []
        for layer, rows in top.groupby("layer"):
            rows = rows.sort_values("rank")
            cells = [(str(t), int(i), float(p)) for t, i, p in zip(rows["top_token"], rows["top_id"], rows["prob"])]
            table.append(cells)
            report(f"  {layer:>5}  " + "  ".join(f"{f'{t!r} {p:.3f}':<18}" for t, _, p in cells))
        report()

        ids = model.to_tokens(prompt)["input_ids"] if isinstance(prompt, str) else prompt
        results[source] = {"prompt_ids": [int(i) for i in ids[0]], "top": table}
    report.save()
    return results


if __name__ == "__main__":
    cli(main, __doc__)
