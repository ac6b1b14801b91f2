"""Where does the answer emerge? The logit lens on a factual prompt, on every model.

For each model: read the residual stream after every layer through the model's own final norm and
unembedding, print the answer's probability and rank per layer at the last position and the first
layer where the answer is the top-1 prediction, and save the layer x position heatmap.

    python docs/examples/01_logit_lens_quickstart.py [SOURCE ...]     # default: the four zoo models
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODELS, Report, cli, factual_task, load, slug

import anylens as al


def main(models: list[str] = DEFAULT_MODELS, out: str = "docs/examples/output") -> dict:
    report = Report(out, "01_logit_lens_quickstart")
    results = {}
    for source in models:
        model = load(source)
        task = factual_task(model, n=1)
        prompt, answer = task.prompt(0), task.answers[0]
        lens = al.logit_lens(model, prompt, metric=[answer])

        frame = lens.to_frame()
        last = frame[frame["pos"] == frame["pos"].max()].sort_values("layer")
        top1 = last.loc[last["rank"] == 0, "layer"]
        first = int(top1.min()) if len(top1) else None

        report(f"== {source} ({model.adapter.name}, {model.n_layers} layers; prompts: {task.source})")
        report(f"  prompt {task.text(model)!r} -> answer {task.label(model, answer)!r}")
        report(f"  {'layer':>5}  {'p(answer)':>9}  {'rank':>5}  top-1")
        for row in last.itertuples():
            report(f"  {row.layer:>5}  {row.prob:>9.3g}  {row.rank:>5}  {row.top_token!r}")
        report(f"  answer is top-1 first at layer {first}" if first is not None else "  answer is never top-1")
        heatmap = report.figure(lens.plot(), f"01_logit_lens_{slug(source)}")
        report()

        results[source] = {
            "prompt": task.text(model),
            "prompt_ids": _ids(model, prompt),
            "answer": task.label(model, answer),
            "answer_id": int(last["target_id"].iloc[0]),
            "probs": [float(p) for p in last["prob"]],
            "ranks": [int(r) for r in last["rank"]],
            "first_top1_layer": first,
            "heatmap": str(heatmap),
        }
    report.save()
    return results


def _ids(model, prompt) -> list[int]:
    """The token ids the lens ran on (a string prompt is tokenized the way a trace does)."""
    ids = model.to_tokens(prompt)["input_ids"] if isinstance(prompt, str) else prompt
    return [int(i) for i in ids[0]]


if __name__ == "__main__":
    cli(main, __doc__)
