"""Operation-level hooks (for ``pattern``) are on only where a block of code needs them: traces in
``operation_hooks_only_for`` run the other modules plain, a role that steps into operations still
reads the right values there, and everything is as before once the block ends."""

from __future__ import annotations

import nnsight.intervention.source as nnsight_source
import pytest
import torch
from families import ANY_FAMILY
from tiny_models import model_cache, random_prompt_pairs

import anylens as al
from anylens.testing import tiny, tiny_tokenizer

model_of = model_cache()
ATOL = 1e-6
pytestmark = pytest.mark.needs_roles("pattern")  # the role that steps into operations


@pytest.fixture
def model(family: str) -> al.AnyModel:
    return model_of(family)


@pytest.fixture
def operation_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every operation a trace hands to nnsight (the cost that plain modules avoid)."""
    calls: list[str] = []
    original = nnsight_source.run_op

    def counting(interleaver, location, *args, **kwargs):
        calls.append(location)
        return original(interleaver, location, *args, **kwargs)

    monkeypatch.setattr(nnsight_source, "run_op", counting)
    return calls


def hooked_modules(calls: list[str]) -> set[str]:
    """The module paths (as the model names them) whose operations were handed over."""
    return {location.split(".source.")[0].removeprefix("model.") for location in calls}


def hf_pattern(model: al.AnyModel, ids: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(input_ids=ids, output_attentions=True).attentions[layer].float()


def test_traces_in_the_block_hook_no_operations_unless_asked(model: al.AnyModel, operation_calls: list[str]) -> None:
    ids, _ = random_prompt_pairs()
    with model.trace(ids):
        model.role("resid_post").read(0).save()
    assert operation_calls, "outside the block, every trace hooks the attention modules' operations"

    operation_calls.clear()
    with model.operation_hooks_only_for(["resid_post"]), model.trace(ids):
        model.role("resid_post").read(0).save()
    assert operation_calls == []

    # A role that steps into operations turns its own module back on when it is read.
    last = model.n_layers - 1
    with model.operation_hooks_only_for([]), model.trace(ids):
        pattern = model.role("pattern").read(last).save()
    torch.testing.assert_close(pattern.float(), hf_pattern(model, ids, last), atol=ATOL, rtol=0)
    assert hooked_modules(operation_calls) == {model.role("pattern").path.torch_module_path(last)}, (
        "only the module read is hooked"
    )


def test_the_block_restores_every_hook_even_after_an_error(model: al.AnyModel, operation_calls: list[str]) -> None:
    ids, _ = random_prompt_pairs()
    with pytest.raises(RuntimeError, match="inside the block"), model.operation_hooks_only_for([]):
        raise RuntimeError("inside the block")
    # After the block, a trace that enters a module (the first query of a fused or separate
    # projection) and only then reads that module's pattern needs the hooks already on.
    with model.trace(ids):
        for layer in range(model.n_layers):
            if "q" in model.roles:
                model.role("q").read(layer).save()
            model.role("pattern").read(layer).save()
    every = {model.role("pattern").path.torch_module_path(layer) for layer in range(model.n_layers)}
    assert hooked_modules(operation_calls) == every


def test_experiments_over_a_pattern_keep_its_hooks(model: al.AnyModel) -> None:
    clean, corrupt = random_prompt_pairs()
    metric = al.metrics.logit_diff(5, 6)
    scoped = al.patch(model, clean, corrupt, role="pattern", over=("layer", "head"), metric=metric, reuse=False)
    by_hand = []
    with torch.no_grad():
        source = [hf_pattern(model, clean, layer) for layer in range(model.n_layers)]
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            with torch.no_grad(), model.trace(corrupt):
                pattern = model.role("pattern").read(layer)
                pattern[:, head] = source[layer][:, head].to(pattern.dtype)
                logits = model.nn.output.logits[:, -1].save()
            by_hand.append((logits[:, 5] - logits[:, 6]).mean().item())
    got = scoped.to_frame().sort_values(["layer", "head"])["metric"].to_numpy()
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), torch.tensor(by_hand), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "experiment",
    [
        lambda m, ids: al.patch(m, ids, ids),
        lambda m, ids: al.attribute(m, ids, ids),
        lambda m, ids: al.ablate(m, ids),
        lambda m, ids: al.logit_lens(m, ids),
        lambda m, ids: al.cache(m, ids),
        lambda m, ids: al.direct_logit_attribution(m, ids, metric=5),
    ],
    ids=["patch", "attribute", "ablate", "logit_lens", "cache", "direct_logit_attribution"],
)
def test_experiments_given_an_unwrapped_model_say_to_wrap_it(experiment) -> None:
    hf_model = model_of(ANY_FAMILY).hf
    ids, _ = random_prompt_pairs()
    with pytest.raises(al.NotWrappedError, match=r"anylens\.wrap\(hf_model, tokenizer\)"):
        experiment(hf_model, ids)


def test_modules_opened_before_wrapping_run_plain_in_the_block_too(operation_calls: list[str]) -> None:
    from nnsight.modeling.transformers import TransformersModel

    family = ANY_FAMILY
    hf_model = tiny(family).hf
    ids, _ = random_prompt_pairs()
    mlp = "transformer.h.0.mlp" if family == "gpt2" else "model.layers.0.mlp"
    nn_model = TransformersModel(hf_model, tokenizer=tiny_tokenizer())
    nn_model.get(mlp).source  # noqa: B018  (opening it hooks its operations, as adapter inference does)
    model = al.wrap(hf_model, tiny_tokenizer())
    with model.trace(ids):
        model.role("resid_post").read(0).save()
    assert mlp in hooked_modules(operation_calls)
    operation_calls.clear()
    with model.operation_hooks_only_for([]), model.trace(ids):
        model.role("resid_post").read(0).save()
    assert operation_calls == []
