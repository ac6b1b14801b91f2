"""Zero, mean and resample ablation against a one-ablation-per-forward plain-hook reference."""

from __future__ import annotations

import hook_reference as ref
import pytest
import torch
from families import ANY_FAMILY, family_cases
from tiny_models import model_cache

import anylens as al

TOL = 1e-5
ANSWER, DISTRACTOR = 300, 301
METRIC = al.metrics.logit_diff(ANSWER, DISTRACTOR)


model_of = model_cache()


def prompts(n: int = 3, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 400, (n, length), generator=torch.Generator().manual_seed(seed))


def reference_ablate(hf, role, over, ids, replacement, reference_ids=None):
    """{(layer, head?, pos?): (ablated, baseline)} averaged over prompts, one forward per component.

    ``replacement(acts_of_layer) -> [batch or 1, pos or 1, ...]`` gives what each prompt's
    activation is replaced with; the reference batch defaults to ``ids``.
    """
    heads = range(ref.n_heads(hf)) if "head" in over else [None]
    positions = range(ids.shape[1]) if "pos" in over else [None]
    out = {}
    with torch.no_grad():
        reference_acts, _ = ref.capture(hf, role, ids if reference_ids is None else reference_ids)
        baseline = ref.logit_diff(ref.run(hf, ids), ANSWER, DISTRACTOR).mean().item()
        for layer in range(ref.n_layers(hf)):
            source = replacement(reference_acts[layer])
            for head in heads:
                for pos in positions:

                    def edit(value, source=source, head=head, pos=pos):
                        full = source.expand(value.shape[0], value.shape[1], *value.shape[2:])
                        return ref.replace(value, full, role, hf, pos, head)

                    ablated = ref.logit_diff(ref.run(hf, ids, {(role, layer): edit}), ANSWER, DISTRACTOR).mean().item()
                    key = (layer,) + ((head,) if head is not None else ()) + ((pos,) if pos is not None else ())
                    out[key] = (ablated, baseline)
    return out


CASES = [("z", ("layer", "head")), ("resid_pre", ("layer", "pos"))]
METHODS = ["zero", "mean", "mean_over_positions", "resample"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family,role,over", family_cases(CASES))
def test_ablate_matches_hook_reference(family, role, over, method):
    model = model_of(family)
    ids = prompts()
    kwargs = {"method": "mean", "mean_over": "positions"} if method == "mean_over_positions" else {"method": method}
    result = al.ablate(model, ids, role=role, over=over, metric=METRIC, seed=3, **kwargs)

    if method == "zero":

        def replacement(acts):
            return torch.zeros_like(acts[:1])
    elif method == "mean":

        def replacement(acts):
            return acts.mean(0, keepdim=True)
    elif method == "mean_over_positions":

        def replacement(acts):
            return acts.mean((0, 1), keepdim=True)
    else:
        sources = result.meta["resample_sources"]
        assert sorted(sources) == [0, 1, 2] and all(s != i for i, s in enumerate(sources))

        def replacement(acts):
            return acts[sources]

    expected = reference_ablate(model.hf, role, over, ids, replacement)
    frame = result.to_frame()
    columns = [d for d in ("layer", "head", "pos") if d in over]
    got = {tuple(int(v) for v in row[columns]): row for _, row in frame.iterrows()}
    assert set(got) == set(expected)
    for key, (ablated, baseline) in expected.items():
        assert abs(got[key]["metric"] - ablated) <= TOL
        assert abs(got[key]["baseline"] - baseline) <= TOL
        assert abs(got[key]["value"] - (ablated - baseline)) <= TOL
    assert frame["value"].abs().max() > 1e-4  # the ablations reached the model


def test_resample_is_seeded_and_never_picks_the_same_prompt():
    model = model_of(ANY_FAMILY)
    ids = prompts(n=5)

    def run(seed):
        return al.ablate(model, ids, role="resid_pre", over=("layer",), method="resample", metric=METRIC, seed=seed)

    first, again, other = run(0), run(0), run(1)
    assert first.meta["resample_sources"] == again.meta["resample_sources"]
    assert first.to_frame()["metric"].tolist() == again.to_frame()["metric"].tolist()
    for result in (first, other):
        assert all(source != prompt for prompt, source in enumerate(result.meta["resample_sources"]))
    assert first.meta["resample_sources"] != other.meta["resample_sources"]


def test_reference_batch_supplies_means_and_resamples():
    model = model_of(ANY_FAMILY)
    ids, reference = prompts(n=2), prompts(n=4, seed=9)
    mean = al.ablate(
        model, ids, role="resid_pre", over=("layer", "pos"), method="mean", metric=METRIC, reference=reference
    )
    expected = reference_ablate(
        model.hf, "resid_pre", ("layer", "pos"), ids, lambda a: a.mean(0, keepdim=True), reference
    )
    got = {(int(r.layer), int(r.pos)): r.metric for r in mean.to_frame().itertuples()}
    assert max(abs(got[k] - v[0]) for k, v in expected.items()) <= TOL

    resample = al.ablate(
        model, ids, role="resid_pre", over=("layer",), method="resample", metric=METRIC, reference=reference
    )
    sources = resample.meta["resample_sources"]
    assert all(0 <= s < 4 for s in sources)
    expected = reference_ablate(model.hf, "resid_pre", ("layer",), ids, lambda a: a[sources], reference)
    got = {(int(r.layer),): r.metric for r in resample.to_frame().itertuples()}
    assert max(abs(got[k] - v[0]) for k, v in expected.items()) <= TOL


def test_ablation_errors_say_what_to_do():
    model = model_of(ANY_FAMILY)
    with pytest.raises(al.PromptError, match="at least two prompts"):
        al.ablate(model, prompts(n=1), role="resid_pre", over=("layer",), method="resample", metric=METRIC)
    with pytest.raises(al.PromptError, match="same token length"):
        al.ablate(
            model,
            prompts(),
            role="resid_pre",
            over=("layer",),
            method="mean",
            metric=METRIC,
            reference=prompts(length=4),
        )
    with pytest.raises(ValueError, match="zero"):
        al.ablate(model, prompts(), role="resid_pre", over=("layer",), method="shuffle", metric=METRIC)
