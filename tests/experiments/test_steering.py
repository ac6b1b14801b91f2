"""Steering vectors, steered generation and the steering sweep, on the four zoo families.

Vectors are checked against ``output_hidden_states`` of each prompt run alone (no padding);
steered generations against Hugging Face ``generate`` with a plain forward hook adding the same
vector (tests/hook_reference.py finds the block without adapters).
"""

from __future__ import annotations

import functools

import pandas as pd
import pytest
import torch
from hook_reference import block

import anylens as al

ZOO = ["zoo:gpt2", "zoo:llama", "zoo:mistral", "zoo:mamba"]
TEMPLATES = ["The capital of {c} is", "{c}'s capital city is", "In {c}, the capital is", "{c} has its capital in"]
FRANCE = [t.format(c="France") for t in TEMPLATES]
ITALY = [t.format(c="Italy") for t in TEMPLATES]
NEW = 3


@functools.cache
def zoo(source: str) -> al.AnyModel:
    return al.load(source)


def resid_post_alone(model: al.AnyModel, prompt: str, layer: int) -> torch.Tensor:
    """The output of block ``layer`` for one unpadded prompt, ``[pos, d_model]``, by a plain hook."""
    kept = []
    handle = block(model.hf, layer).register_forward_hook(lambda module, args, output: kept.append(output.detach()))
    try:
        with torch.no_grad():
            model.hf(**model.tokenizer(prompt, return_tensors="pt"))
    finally:
        handle.remove()
    return kept[0][0].float()


def hf_steered(model: al.AnyModel, prompts, vector: torch.Tensor, layer: int, at) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy Hugging Face generation with ``vector`` added to block ``layer``'s output at the
    forward calls ``at(call)`` chooses (call 0 reads the prompt); the tokens and first logits."""
    calls = []

    def hook(module, args, output):
        call = len(calls)
        calls.append(call)
        return output + vector if at(call) else output

    handle = block(model.hf, layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model.hf.generate(
                **model.to_tokens(prompts),
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=model.tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        handle.remove()
    return out.sequences, out.logits[0].float()


@pytest.mark.parametrize("source", ZOO)
def test_steering_vector_steer_and_sweep_against_hooks(source):
    model = zoo(source)
    layer = model.n_layers - 1

    # The vector: difference of means of resid_post at each prompt's last token, and at its
    # second token (position 1, shifted past the left padding of the shorter prompts).
    for position in (-1, 1):
        vector = al.steering_vector(model, FRANCE, ITALY, layer=layer, positions=position)
        france = torch.stack([resid_post_alone(model, p, layer)[position] for p in FRANCE]).mean(0)
        italy = torch.stack([resid_post_alone(model, p, layer)[position] for p in ITALY]).mean(0)
        # float32; the padded batch sums in another order than the prompts alone (entries ~10-100)
        torch.testing.assert_close(vector, france - italy, atol=1e-4, rtol=1e-5)
    vector = al.steering_vector(model, FRANCE, ITALY, layer=layer)

    # Steered generation at each choice of positions, against the hook.
    scale = 1.5
    for positions, at in (("all", lambda c: True), ("prompt", lambda c: c == 0), ("generated", lambda c: c > 0)):
        steered = al.steer(model, ITALY, vector, layer=layer, scale=scale, positions=positions, max_new_tokens=NEW)
        tokens, first = hf_steered(model, ITALY, scale * vector, layer, at)
        assert torch.equal(steered.tokens, tokens), positions
        torch.testing.assert_close(steered.first_logits, first, atol=1e-4, rtol=0)
        assert steered.text == model.tokenizer.batch_decode(tokens[:, -NEW:], skip_special_tokens=True)

    # The sweep: one row per (layer, scale, prompt); with per-layer vectors built from the pairs,
    # its values are whether the hook-steered first token is " Paris".
    scales = (0.0, 1.0)
    result = al.steering_sweep(
        model, ITALY, (FRANCE, ITALY), layers=[0, layer], scales=scales, metric=al.metrics.top1(" Paris")
    )
    frame = result.to_frame()
    assert len(frame) == 2 * len(scales) * len(ITALY)
    assert result.dims == ["layer", "scale"] and result.meta["metric"] == "top1"
    paris = model.token_id(" Paris")
    for (row_layer, row_scale), rows in frame.groupby(["layer", "scale"]):
        per_layer = al.steering_vector(model, FRANCE, ITALY, layer=int(row_layer))
        tokens, _ = hf_steered(model, ITALY, row_scale * per_layer, int(row_layer), lambda c: True)
        expected = (tokens[:, -NEW] == paris).float().tolist()
        assert rows.sort_values("prompt")["value"].tolist() == expected
    # Unsteered (scale 0) the model answers Rome; the full difference at the last layer gives Paris.
    assert frame[frame.scale == 0.0]["value"].sum() == 0 == result.meta["baseline"]
    assert frame[(frame.scale == 1.0) & (frame.layer == layer)]["value"].mean() == 1.0


def test_sweep_result_is_tidy_plots_and_saves(tmp_path):
    model = zoo("zoo:llama")
    vector = al.steering_vector(model, FRANCE, ITALY, layer=1)
    result = al.steering_sweep(model, ITALY[:2], vector, layers=[0, 1, 2], scales=(0.5, 2.0))
    frame = result.to_frame()
    assert set(frame.columns) >= {"model", "layer", "scale", "prompt", "value", "text"}
    assert result.meta["metric"] == "kl" and (frame["value"] >= -1e-6).all()  # KL from the unsteered run
    figure = result.plot()
    assert figure.axes[0].get_ylabel() == "layer" and figure.axes[0].get_xlabel() == "scale"
    loaded = al.Result.load(result.save(tmp_path / "sweep.json"))
    pd.testing.assert_frame_equal(loaded.to_frame(), frame, check_exact=False, rtol=1e-12)  # JSON keeps 15 digits


def test_steer_with_a_vector_from_another_role():
    """A vector of attention-head values steers the role it was read from."""
    model = zoo("zoo:gpt2")
    vector = al.steering_vector(model, FRANCE, ITALY, role="z", layer=1)
    assert vector.shape == (model.n_heads, model.d_head)
    steered = al.steer(model, ITALY, 3 * vector, role="z", layer=1, max_new_tokens=1)
    plain = al.generate(model, ITALY, max_new_tokens=1, first_logits=True)
    assert not torch.allclose(steered.first_logits, plain.first_logits)
