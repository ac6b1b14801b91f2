"""``tiny:plain``: a language model in plain torch, with its own module names and no config.

It stands for a model a user writes themselves: not a transformers class, ``forward(input_ids,
attention_mask=None)`` returning a bare logits tensor, per-head attention whose output projection
reads the concatenated heads (so ``z`` exists), probabilities leaving a ``Softmax`` module (so
``pattern`` exists), and an MLP. Its adapter is data given to ``al.wrap`` — the path
docs/adapters.md ("Bring your own model") describes — not a built-in: a built-in adapter claims
an architecture for every user of anylens and is listed in the reference table, which a toy
class should not be.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.spec import AdapterSpec

WIDTH, HEADS, LAYERS, POSITIONS = 64, 4, 3, 128

#: The adapter of :class:`TinyPlainLM`: role paths over its own module names, facts as numbers.
PLAIN_ADAPTER = AdapterSpec.from_dict(
    {
        "name": "plain",
        "architectures": ["TinyPlainLM"],
        "layers": "blocks",
        "unembed": "readout",
        "out_proj": "blocks.{i}.mix.out",
        "n_heads": HEADS,
        "d_head": WIDTH // HEADS,
        "max_positions": POSITIONS,
        "roles": {
            "embed": "embedding.output",
            "pos_embed": "positions.output",
            "resid_pre": "blocks.{i}.input",
            "resid_mid": "blocks.{i}.norm_b.input",
            "resid_post": "blocks.{i}.output",
            "attn_in": "blocks.{i}.norm_a.input",
            "mixer_in": "blocks.{i}.norm_a.input",
            "mlp_in": "blocks.{i}.norm_b.input",
            "attn_out": "blocks.{i}.mix.output",
            "mixer_out": "blocks.{i}.mix.output",
            "mlp_out": "blocks.{i}.ff.output",
            "z": "blocks.{i}.mix.out.input|heads",
            "q": "blocks.{i}.mix.query.output|heads",
            "k": "blocks.{i}.mix.key.output|heads",
            "v": "blocks.{i}.mix.value.output|heads",
            "pattern": "blocks.{i}.mix.softmax.output",
            "mlp_post": "blocks.{i}.ff.down.input",
            "final_norm": "norm_out.output",
            "logits": "output",
        },
        "description": "a plain-torch toy language model (tiny:plain)",
    }
)


class Mix(nn.Module):
    """Causal multi-head attention; ``mask`` [batch, key] is 1 for real tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.softmax = nn.Softmax(dim=-1)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, pos, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, pos, HEADS, -1).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / (WIDTH // HEADS) ** 0.5
        causal = torch.ones(pos, pos, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None] & mask[:, None, None, :].bool()
        pattern = self.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min))
        z = (pattern @ v).transpose(1, 2).reshape(batch, pos, WIDTH)
        return self.out(z)


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm_a, self.mix, self.norm_b, self.ff = nn.LayerNorm(WIDTH), Mix(), nn.LayerNorm(WIDTH), FeedForward()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm_a(x), mask)
        return x + self.ff(self.norm_b(x))


class TinyPlainLM(nn.Module):
    """Learned positions, pre-norm blocks, a final norm and an untied readout."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, WIDTH)
        self.positions = nn.Embedding(POSITIONS, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm_out = nn.LayerNorm(WIDTH)
        self.readout = nn.Linear(WIDTH, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        # Left padding: each row's first real token is position 0.
        where = (mask.cumsum(-1) - 1).clamp(min=0)
        x = self.embedding(input_ids) + self.positions(where)
        for block in self.blocks:
            x = block(x, mask)
        return self.readout(self.norm_out(x))
