"""A model that is not a transformers model (the layout of mamba-ssm's own classes, say) is
wrapped through nnsight's generic wrapper and verified like any other."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PlainLM, plain_lm_adapter

import anylens as al


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.mixer = torch.nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mixer(self.norm(hidden))


def plain_lm(vocab: int = 50, width: int = 16, depth: int = 3) -> PlainLM:
    return PlainLM([Block(width) for _ in range(depth)], vocab, width)


ADAPTER = plain_lm_adapter("plain-lm", mixer_out="layers.{i}.mixer.output")


def test_plain_torch_model_passes_check_and_reads_match_hooks():
    torch.manual_seed(0)
    lm = plain_lm().eval()
    model = al.wrap(lm, adapter=ADAPTER)
    assert model.d_model == 16 and model.n_layers == 3
    report = al.check(model)
    assert report.passed, str(report)

    ids = torch.randint(0, 50, (2, 7))
    seen = {}
    handle = lm.layers[1].mixer.register_forward_hook(lambda m, i, o: seen.__setitem__("mixer", o.detach().clone()))
    with torch.no_grad():
        expected_logits = lm(ids)
    handle.remove()
    with torch.no_grad(), model.trace(ids):
        mixer = model.mixer_out[1].save()
        logits = model.logits.save()
    assert torch.allclose(mixer, seen["mixer"], atol=1e-6)
    assert torch.allclose(logits, expected_logits, atol=1e-6)


def test_wrong_mapping_on_plain_model_fails_check():
    wrong = dict(ADAPTER, roles=dict(ADAPTER["roles"], mixer_out="layers.{i}.norm.output"))
    report = al.check(al.wrap(plain_lm().eval(), adapter=wrong))
    assert not report.passed
    assert any(row.invariant.startswith("2 ") for row in report.failures)


def test_plain_model_without_tokenizer_refuses_strings_clearly():
    model = al.wrap(plain_lm().eval(), adapter=ADAPTER)
    with pytest.raises(al.TokenizationError, match="no tokenizer"):
        model.to_tokens("hello")
