"""A model that is not a transformers model (the layout of mamba-ssm's own classes, say) is
wrapped through nnsight's generic wrapper and verified like any other."""

from __future__ import annotations

import pytest
import torch

import anylens as al


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.mixer = torch.nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mixer(self.norm(hidden))


class PlainLM(torch.nn.Module):
    def __init__(self, vocab: int = 50, width: int = 16, depth: int = 3):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.norm_f = torch.nn.LayerNorm(width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)
        self.config = type("Config", (), {"d_model": width, "vocab_size": vocab})()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return self.lm_head(self.norm_f(hidden))


ADAPTER = {
    "name": "plain-lm",
    "architectures": ["PlainLM"],
    "layers": "layers",
    "roles": {
        "embed": "embedding.output",
        "resid_pre": "layers.{i}.input",
        "resid_post": "layers.{i}.output",
        "mixer_out": "layers.{i}.mixer.output",
        "final_norm": "norm_f.output",
        "logits": "output",
    },
}


def test_plain_torch_model_passes_check_and_reads_match_hooks():
    torch.manual_seed(0)
    lm = PlainLM().eval()
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
    report = al.check(al.wrap(PlainLM().eval(), adapter=wrong))
    assert not report.passed
    assert any(row.invariant.startswith("2 ") for row in report.failures)


def test_plain_model_without_tokenizer_refuses_strings_clearly():
    model = al.wrap(PlainLM().eval(), adapter=ADAPTER)
    with pytest.raises(al.TokenizationError, match="no tokenizer"):
        model.to_tokens("hello")
