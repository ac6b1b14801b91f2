"""Probing: where is the country, and where is the capital, linearly readable?

For each model: factual prompts ("The capital of France is", "The Eiffel Tower is in") labelled
with their country and capital (``anylens.datasets.labelled_prompts``). The activations at each
prompt's last token are extracted to disk with ``al.extract`` and read back memory-mapped with
``al.load_activations``; a linear probe per layer (``al.probe``) then decodes the capital there.
A second probe decodes the country at the subject's last token, straight from the model. Each
probe's held-out accuracy is printed with its control (the same probe on shuffled labels).

    python docs/examples/07_probing.py [SOURCE ...]     # default: the four zoo models
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_MODELS, Report, cli, load, slug  # noqa: E402

import anylens as al  # noqa: E402
from anylens.datasets import labelled_prompts  # noqa: E402

#: Held-out accuracy that counts as "decodable".
DECODABLE = 0.9


def main(models: list[str] = DEFAULT_MODELS, out: str = "docs/examples/output") -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = Report(out, "07_probing")
    results = {}
    for source in models:
        model = load(source)
        items = labelled_prompts(model.tokenizer)
        texts, capitals = [p.text for p in items], [p.capital for p in items]
        report(f"== {source} ({model.adapter.name}, {model.n_layers} layers)")
        report(f"  {len(items)} prompts, {len(set(capitals))} capitals")

        # The capital at the last token: extract to disk, read back memory-mapped, probe every layer.
        with tempfile.TemporaryDirectory() as folder:
            al.extract(
                model,
                texts,
                roles=["resid_pre", "resid_post"],
                positions="last",
                out=folder,
                labels=capitals,
                quiet=True,
            )
            acts = al.load_activations(folder)
            capital_result = al.probe(acts, acts.labels)
            capital = capital_result.to_frame()
            first_row = acts["resid_pre", -1][0].clone()

        # The country at the subject's last token, where the subject is the country.
        own = [p for p in items if p.relation == "capital"]
        country = al.probe(
            model,
            [p.country for p in own],
            prompts=[p.text for p in own],
            positions=[[p.subject_end] for p in own],
            roles="resid_pre",
        )
        country_frame = country.to_frame()
        at = {(row.role, row.layer): row for row in capital.itertuples()}
        # The first point of the residual stream, in forward order, from which the capital is readable.
        order = [(role, layer) for layer in range(model.n_layers) for role in ("resid_pre", "resid_post")]
        readable = [key for key in order if at[key].accuracy >= DECODABLE]
        first = f"{readable[0][0]}[{readable[0][1]}]" if readable else None
        report("  layer   capital@last: resid_pre  resid_post (controls)   country@subject: resid_pre (control)")
        for layer in range(model.n_layers):
            pre, post = at[("resid_pre", layer)], at[("resid_post", layer)]
            k = country_frame.loc[country_frame["layer"] == layer].iloc[0]
            report(
                f"  {layer:>5}   {pre.accuracy:>20.2f}  {post.accuracy:>10.2f} ({pre.control:.2f}, {post.control:.2f})"
                f"   {k['accuracy']:>26.2f} ({k['control']:.2f})"
            )
        best = max(order, key=lambda key: at[key].accuracy)
        if first is not None:
            report(f"  the capital is decodable (>= {DECODABLE}) at the last token from {first} on")
        else:
            report(f"  the capital never reaches {DECODABLE} at the last token")
        report(f"  best: {at[best].accuracy:.2f} at {best[0]}[{best[1]}] (control {at[best].control:.2f})")
        report(f"  held out: {int(capital['n_test'].iloc[0])} of {len(items)} prompts; majority class "
               f"{capital['majority'].iloc[0]:.3f}")  # fmt: skip
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        capital_result.plot(ax=left, title=f"{source}: capital at the last token")
        country.plot(ax=right, title=f"{source}: country at the subject")
        report.figure(figure, f"07_probing_{slug(source)}")
        report()

        results[source] = {
            "n_prompts": len(items),
            "texts": texts,
            "capital": capital,
            "country": country_frame,
            "country_prompts": [p.text for p in own],
            "country_positions": [p.subject_end for p in own],
            "capital_from": first,
            "first_row": first_row,
        }
    report.save()
    return results


if __name__ == "__main__":
    cli(main, __doc__)
