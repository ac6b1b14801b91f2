"""The mechanisms a zoo model's card reports, measured with anylens's own experiments.

* heads: the top induction head and the top previous-token head in an earlier layer (models with
  attention patterns), scored on repeated sequences of the induction task's made-up words;
* logit lens: the answer's mean probability after each layer, on the held-out factual prompts;
* subject patching: for each layer, the share of capital-city pairs whose answer flips to the clean
  one when the country's ``resid_pre`` is patched from the clean into the corrupt prompt.

``tests/zoo/test_zoo_mechanisms.py`` asserts the same claims on the shipped weights.
"""

from __future__ import annotations

from typing import Any

import torch

from . import corpus


def induction_sequences(n: int = 8, seed: int = 2) -> list[str]:
    """Fresh sequences of the induction task's made-up words (12 each), as first halves."""
    return [" ".join(words) for words in corpus.induction_eval_set(n=n, seed=seed)]


def head_mechanisms(model: Any) -> dict[str, Any] | None:
    import anylens as al

    if "pattern" not in model.roles:
        return None
    scores = al.head_scores(model, sequences=induction_sequences()).to_frame()
    induction = scores[scores.kind == "induction"].sort_values("score").iloc[-1]
    earlier = scores[(scores.kind == "previous_token") & (scores.layer < induction["layer"])]
    previous = earlier.sort_values("score").iloc[-1] if len(earlier) else None

    def head(row: Any) -> dict[str, Any] | None:
        if row is None:
            return None
        return {"layer": int(row["layer"]), "head": int(row["head"]), "score": float(row["score"])}

    return {"induction": head(induction), "previous_token": head(previous)}


def logit_lens_rise(model: Any, every: int = 4) -> list[float]:
    import anylens as al

    per_prompt = []
    for fact in corpus.factual_eval_set()[::every]:
        frame = al.logit_lens(model, fact.prompt, metric=[fact.answer], positions=-1).to_frame()
        per_prompt.append(torch.tensor(frame.sort_values("layer")["prob"].to_numpy()))
    return torch.stack(per_prompt).mean(0).tolist()


def subject_patching(model: Any) -> dict[str, Any]:
    import anylens as al

    pairs = corpus.factual_patching_pairs("capital")
    clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
    clean_ids, corrupt_ids = (model.to_tokens(prompts)["input_ids"] for prompts in (clean, corrupt))
    (subject,) = (clean_ids != corrupt_ids).any(0).nonzero()[:, 0].tolist()
    metric = al.metrics.logit_diff([p.clean_answer for p in pairs], [p.corrupt_answer for p in pairs])
    result = al.patch(model, clean, corrupt, role="resid_pre", metric=metric, positions=[subject], per_prompt=True)
    frame = result.to_frame()
    flipped = frame.assign(flipped=frame["metric"] > 0).groupby("layer")["flipped"].mean()
    return {
        "position": subject,
        "pairs": len(pairs),
        "clean_metric": result.clean_metric,
        "corrupt_metric": result.corrupt_metric,
        "flipped_by_layer": [float(v) for v in flipped],
    }


def measure(source: str) -> dict[str, Any]:
    import anylens as al

    model = al.load(source)
    return _rounded(
        {
            "heads": head_mechanisms(model),
            "logit_lens_answer_prob": logit_lens_rise(model),
            "subject_patching": subject_patching(model),
        }
    )


def _rounded(value: Any, digits: int = 4) -> Any:
    """Floats rounded for metrics.json, inside any nesting of dicts and lists."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item, digits) for item in value]
    return value


def card_section(mechanisms: dict[str, Any]) -> str:
    """The model card's mechanisms section."""
    lines = ["## Mechanisms (found with anylens experiments; asserted by `tests/zoo/test_zoo_mechanisms.py`)", ""]
    heads = mechanisms.get("heads")
    if heads:
        ind, prev = heads["induction"], heads["previous_token"]
        lines.append(
            f"- Induction head {ind['layer']}.{ind['head']}: induction score {ind['score']:.2f} (`al.head_scores` "
            "on 8 fresh sequences of 12 made-up words, repeated; uniform attention would score below 0.1)."
        )
        if prev:
            lines.append(
                f"- Previous-token head {prev['layer']}.{prev['head']} in an earlier layer: score {prev['score']:.2f}."
            )
    else:
        lines.append("- No attention heads: induction (if any) runs through the SSM mixers.")
    probs = ", ".join(f"{p:.3f}" for p in mechanisms["logit_lens_answer_prob"])
    lines.append(f"- Logit lens (`al.logit_lens`), mean probability of the answer after each layer: {probs}.")
    patching = mechanisms["subject_patching"]
    flips = ", ".join(f"layer {i}: {v:.0%}" for i, v in enumerate(patching["flipped_by_layer"]))
    lines.append(
        f"- Patching the country's `resid_pre` (position {patching['position']}) from a clean into a corrupt "
        f"capital prompt (`al.patch`, {patching['pairs']} pairs) flips the answer to the clean one: {flips}."
    )
    return "\n".join(lines) + "\n"
