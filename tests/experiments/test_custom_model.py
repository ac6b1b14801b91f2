"""The "Bring your own model" walkthrough of docs/adapters.md, run as written, and checked
against plain torch hooks on the same model (float32, absolute tolerance ``ATOL``)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch

import anylens as al

DOCS = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"
ATOL = 1e-5


def walkthrough_code() -> str:
    text = DOCS.read_text()
    section = text.split("## Bring your own model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3, "the walkthrough lost its code blocks"
    return "\n".join(blocks)


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # Run from a file: nnsight reads the source of each `with model.trace(...)` block from it.
    script = tmp_path_factory.mktemp("walkthrough") / "bring_your_own_model.py"
    script.write_text(walkthrough_code())
    return runpy.run_path(str(script))


def hooked(toy: torch.nn.Module, ids: torch.Tensor, layer: int, edit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of layer's attention output projection (z, flat) and the logits of one plain
    forward, with ``edit`` applied to that input if given."""
    seen = {}

    def pre(module, args):
        seen["z"] = args[0].detach().clone()
        return (edit(args[0].clone()),) if edit is not None else None

    handle = toy.stack[layer].attn.proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            logits = toy(ids)
    finally:
        handle.remove()
    return seen["z"], logits


def test_the_model_has_no_config_and_no_tokenizer(walk):
    model = walk["model"]
    assert model.config is None and model.tokenizer is None
    assert (model.n_heads, model.d_head, model.d_model, model.d_vocab) == (4, 12, 48, 100)


def test_reads_equal_plain_hooks(walk):
    z, logits = hooked(walk["toy"], walk["ids"], layer=1)
    torch.testing.assert_close(walk["logits"], logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(walk["z"], z.unflatten(-1, (4, 12)), rtol=0, atol=ATOL)
    torch.testing.assert_close(walk["cache"]["z", 1], z.unflatten(-1, (4, 12)), rtol=0, atol=ATOL)


def test_a_patched_head_equals_the_hook_patch(walk):
    """Head 1.2 of the clean run written into the corrupt run, at every position, by hand."""
    toy, clean, corrupt = walk["toy"], walk["clean"], walk["corrupt"]
    clean_z, _ = hooked(toy, clean, layer=1)

    def put_head(z):
        z[..., 2 * 12 : 3 * 12] = clean_z[..., 2 * 12 : 3 * 12]
        return z

    _, logits = hooked(toy, corrupt, layer=1, edit=put_head)
    expected = float((logits[:, -1, 7] - logits[:, -1, 8]).mean())
    frame = walk["patched"].to_frame()
    got = frame[(frame["layer"] == 1) & (frame["head"] == 2)]["metric"]
    assert len(frame) == 3 * 4 and len(got) == 1
    assert float(got.iloc[0]) == pytest.approx(expected, abs=ATOL)


def test_lens_and_dla_agree_with_the_logits(walk):
    log_probs = walk["logits"][0].log_softmax(-1)  # prompt 0, [pos, vocab]
    frame = walk["lens"].to_frame()
    last = frame[(frame["layer"] == 2) & (frame["target_id"] == 7)].sort_values("pos")
    torch.testing.assert_close(torch.tensor(last["log_prob"].to_numpy()), log_probs[:, 7], rtol=0, atol=ATOL)
    real = float(walk["logits"][0, -1, 7] - walk["logits"][0, -1, 8])
    assert walk["dla"].meta["logit_diff"] == pytest.approx([real], abs=ATOL)  # one per prompt
    assert float(walk["dla"].to_frame()["value"].sum()) == pytest.approx(real, abs=1e-4)


def test_every_result_has_its_rows(walk):
    assert walk["parts"].components.shape[1:] == (4, 12, 48)
    assert walk["resid"].shape == (3, 4, 12, 48)
    assert len(walk["ablated"].to_frame()) == 3
    assert len(walk["attributed"].to_frame()) == 3 * 4
    assert walk["patterns"].to_frame()["layer"].nunique() == 3
    assert set(walk["scores"].to_frame()["head"]) == {0, 1, 2, 3}
    assert walk["vector"].shape[-1] == 48


TEXT_CALLS = {
    "trace": lambda m: m.trace("The cat sat").__enter__(),
    "cache": lambda m: al.cache(m, "The cat sat"),
    "logit_lens": lambda m: al.logit_lens(m, "The cat sat"),
    "dla": lambda m: al.direct_logit_attribution(m, "The cat sat", metric=(7, 8)),
    "attention_patterns": lambda m: al.attention_patterns(m, "The cat sat"),
    "patch": lambda m: al.patch(m, "The cat sat", "The dog sat", role="z", over=("layer",)),
    "ablate": lambda m: al.ablate(m, "The cat sat", role="z", over=("layer",)),
    "attribute": lambda m: al.attribute(m, "The cat sat", "The dog sat", role="z", over=("layer",)),
    "steering_vector": lambda m: al.steering_vector(m, ["The cat sat"], ["The dog sat"], layer=1),
}


@pytest.mark.parametrize("call", TEXT_CALLS.values(), ids=list(TEXT_CALLS))
def test_text_without_a_tokenizer_gets_a_typed_error(walk, call):
    with pytest.raises(al.TokenizationError, match="pass token ids"):
        call(walk["model"])
