"""Attention patterns, and the per-head scores that summarise them (previous-token, induction).

Both read the ``pattern`` role ``[batch, heads, query, key]``; models without attention
(Mamba) raise the model's :class:`MissingRoleError` naming the roles they do have.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..core.errors import PromptError
from .extraction import read_roles
from .prompts import Prompts, tokenize
from .renamed import renamed
from .results import Result

if TYPE_CHECKING:
    from ..core.model import AnyModel


@dataclass(repr=False)
class PatternResult(Result):
    """Attention probabilities: one row per (layer, head, query_pos, key_pos)."""

    def pattern(self, layer: int) -> np.ndarray:
        """The pattern of one layer as an array ``[heads, query, key]``."""
        frame = self.frame[self.frame["layer"] == layer]
        if frame.empty:
            raise KeyError(
                f"layer {layer} is not in this result; its layers are {sorted(self.frame['layer'].unique())}"
            )
        heads = int(frame["head"].max()) + 1
        n = int(frame["query_pos"].max()) + 1
        table = np.zeros((heads, n, n))
        table[frame["head"], frame["query_pos"], frame["key_pos"]] = frame["value"]
        return table

    def plot(
        self, layer: int | None = None, heads: Iterable[int] | None = None, cmap: str = "viridis", **_: Any
    ) -> Any:
        """A grid of heatmaps, one per head of ``layer`` (the first layer by default), axes
        labelled with the prompt's tokens (queries down, keys across)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        layer = int(self.frame["layer"].min()) if layer is None else layer
        table = self.pattern(layer)
        chosen = list(range(table.shape[0])) if heads is None else list(heads)
        columns = math.ceil(math.sqrt(len(chosen)))
        rows = math.ceil(len(chosen) / columns)
        tokens = self.meta.get("tokens") or [str(i) for i in range(table.shape[1])]
        side = 1.2 + 0.18 * len(tokens)
        fig, axes = plt.subplots(rows, columns, figsize=(min(20, columns * side), min(20, rows * side)), squeeze=False)
        for ax in axes.flat[len(chosen) :]:
            ax.axis("off")
        labelled = len(tokens) <= 40
        for ax, head in zip(axes.flat, chosen):
            ax.imshow(table[head], cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"head {layer}.{head}", fontsize=8)
            if labelled:
                ax.set_xticks(range(len(tokens)))
                ax.set_xticklabels([repr(t)[1:-1] for t in tokens], rotation=90, fontsize=6)
                ax.set_yticks(range(len(tokens)))
                ax.set_yticklabels([repr(t)[1:-1] for t in tokens], fontsize=6)
        fig.suptitle(f"attention patterns · {self.meta.get('model', '')} · layer {layer}")
        fig.tight_layout()
        return fig


@renamed(prompt="prompts")
def attention_patterns(model: AnyModel, prompts: Prompts, *, layers: Iterable[int] | None = None) -> PatternResult:
    """The attention probabilities of every head at ``layers`` (all by default) on one prompt.

    Needs the ``pattern`` role (eager attention, which ``al.wrap`` selects for attention models).
    """
    model.role("pattern")  # MissingRoleError for attention-free models, with what they do have
    inputs = tokenize(model, prompts)
    if inputs["input_ids"].shape[0] != 1:
        raise PromptError(f"attention_patterns takes one prompt; got {inputs['input_ids'].shape[0]}")
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    chosen = model.layers(layers)
    values = read_roles(model, inputs, [("pattern", layer) for layer in chosen])
    frames = []
    for layer in chosen:
        pattern = values[("pattern", layer)][0].float().cpu().numpy()  # [heads, q, k]
        heads, n_q, n_k = pattern.shape
        head, query, key = np.meshgrid(np.arange(heads), np.arange(n_q), np.arange(n_k), indexing="ij")
        frames.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "head": head.ravel(),
                    "query_pos": query.ravel(),
                    "key_pos": key.ravel(),
                    "value": pattern.ravel(),
                }
            )
        )
    frame = pd.concat(frames, ignore_index=True)
    frame.insert(0, "model", model.name)
    meta = {
        "model": model.name,
        "adapter": model.adapter.name,
        "role": "pattern",
        "tokens": model.to_str_tokens(inputs["input_ids"][0]),
        "prompt": prompts if isinstance(prompts, str) else model.tokenizer.decode(inputs["input_ids"][0]),
        "over": ["layer", "head", "query_pos", "key_pos"],
    }
    return PatternResult("attention_patterns", frame, meta, "value")


@dataclass(repr=False)
class HeadScores(Result):
    """Scores per (layer, head, kind): ``kind`` is ``"previous_token"`` or ``"induction"``."""

    def plot(self, kind: str = "induction", **kwargs: Any) -> Any:
        """A layer x head heatmap of one kind of score."""
        kinds = list(dict.fromkeys(self.frame["kind"]))
        if kind not in kinds:
            raise KeyError(f"kind {kind!r} is not in this result; its kinds are {kinds}")
        view = Result(
            self.experiment,
            self.frame[self.frame["kind"] == kind],
            dict(self.meta, value_label=f"{kind} score"),
            self.value,
        )
        kwargs.setdefault("title", f"{kind} score · {self.meta.get('model', '')}")
        return view.plot(index="layer", columns="head", **kwargs)


@renamed(batch="n_sequences")
def head_scores(
    model: AnyModel,
    prompts: Prompts | None = None,
    *,
    seq_len: int = 20,
    seed: int = 0,
    n_sequences: int = 4,
    sequences: Sequence[str] | torch.Tensor | None = None,
) -> HeadScores:
    """Previous-token and induction scores of every head.

    * induction: on ``n_sequences`` random token sequences of length ``seq_len`` repeated twice (after
      the tokenizer's BOS token, if it has one), the mean attention from each position ``t`` of
      the second copy to the token after that token's first occurrence, ``t - seq_len + 1``;
    * previous-token: the mean attention from position ``t`` to ``t - 1`` over ``prompts`` (pairs
      of real tokens only, so left padding is ignored), or over the repeated sequences when no
      prompts are given.

    The random sequences avoid special tokens and are reproducible from ``seed``. ``sequences``
    replaces them with your own first halves — strings of equal token length (tokenized without
    special tokens) or ids ``[batch, seq_len]`` — to score heads on in-distribution text; its
    tokens should not repeat within a sequence, or "the token after the first occurrence" is
    ambiguous. The repeated ids are kept in ``meta["induction_tokens"]``.
    """
    model.role("pattern")
    layers = model.layers()
    if sequences is None:
        repeated, offset = _repeated_tokens(model, seq_len, seed, n_sequences)
    else:
        repeated, offset = _repeated_given(model, sequences)
        n_sequences, seq_len = repeated.shape[0], (repeated.shape[1] - offset) // 2
    ones = torch.ones_like(repeated)
    patterns = read_roles(model, {"input_ids": repeated, "attention_mask": ones}, [("pattern", i) for i in layers])
    induction = _induction(patterns, layers, offset, seq_len)
    if prompts is None:
        previous = _previous_token(patterns, layers, ones)
    else:
        inputs = {name: t.to(model.device) for name, t in tokenize(model, prompts).items()}
        previous = _previous_token(
            read_roles(model, inputs, [("pattern", i) for i in layers]), layers, inputs["attention_mask"]
        )

    rows = []
    for kind, scores in (("previous_token", previous), ("induction", induction)):
        for index, layer in enumerate(layers):
            for head, score in enumerate(scores[index].tolist()):
                rows.append({"model": model.name, "layer": layer, "head": head, "score": score, "kind": kind})
    meta = {
        "model": model.name,
        "adapter": model.adapter.name,
        "role": "pattern",
        "over": ["layer", "head"],
        "seq_len": seq_len,
        "seed": seed,
        "batch": n_sequences,
        "induction_tokens": repeated.tolist(),
        "prompt": _describe(prompts),
    }
    return HeadScores("head_scores", pd.DataFrame(rows), meta, "score")


def _describe(prompts: Prompts | None) -> Any:
    if prompts is None or isinstance(prompts, str):
        return prompts
    return prompts.tolist() if isinstance(prompts, torch.Tensor) else list(prompts)


def _repeated_tokens(model: AnyModel, seq_len: int, seed: int, batch: int) -> tuple[torch.Tensor, int]:
    """``[batch, prefix + 2 * seq_len]`` ids: optional BOS, then a random sequence twice."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to measure induction, got {seq_len}")
    tokenizer = model.tokenizer
    vocab = min(len(tokenizer), model.d_vocab) if tokenizer is not None else model.d_vocab
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    candidates = torch.tensor([i for i in range(vocab) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    return _repeated(model, candidates[torch.randint(len(candidates), (batch, seq_len), generator=generator)])


def _repeated_given(model: AnyModel, sequences: Sequence[str] | torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[batch, prefix + 2 * seq_len]`` ids: optional BOS, then each given sequence twice."""
    if isinstance(sequences, torch.Tensor):
        ids = sequences.long()
    else:
        if isinstance(sequences, str):
            sequences = [sequences]
        encoded = [model.tokenizer(text, add_special_tokens=False)["input_ids"] for text in sequences]
        lengths = sorted({len(e) for e in encoded})
        if len(lengths) > 1:
            raise PromptError(f"induction sequences must have the same number of tokens; got lengths {lengths}")
        ids = torch.tensor(encoded)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"sequences must be [batch, seq_len] with seq_len >= 2, got shape {tuple(ids.shape)}")
    return _repeated(model, ids)


def _repeated(model: AnyModel, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``ids`` twice after the tokenizer's BOS token (if it has one), and the BOS offset."""
    bos = getattr(model.tokenizer, "bos_token_id", None)
    prefix = torch.full((ids.shape[0], 1), bos, dtype=ids.dtype) if bos is not None else ids[:, :0]
    return torch.cat([prefix, ids, ids], dim=1).to(model.device), prefix.shape[1]


def _induction(patterns: dict, layers: Sequence[int], offset: int, seq_len: int) -> torch.Tensor:
    """[layers, heads]: mean attention from t (second copy) to t - seq_len + 1."""
    queries = torch.arange(offset + seq_len, offset + 2 * seq_len)
    keys = queries - seq_len + 1
    scores = []
    for layer in layers:
        pattern = patterns[("pattern", layer)].float()  # [batch, heads, q, k]
        scores.append(pattern[:, :, queries.to(pattern.device), keys.to(pattern.device)].mean(dim=(0, 2)))
    return torch.stack(scores).cpu()


def _previous_token(patterns: dict, layers: Sequence[int], mask: torch.Tensor) -> torch.Tensor:
    """[layers, heads]: mean attention from t to t - 1 where both are real tokens."""
    pairs = (mask[:, 1:] * mask[:, :-1]).float()  # [batch, pos - 1]
    if pairs.sum() == 0:
        raise PromptError("previous-token scores need prompts of at least two tokens")
    scores = []
    for layer in layers:
        pattern = patterns[("pattern", layer)].float()
        steps = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [batch, heads, pos - 1]: t -> t - 1
        weights = pairs.to(pattern.device)[:, None, :]
        scores.append((steps * weights).sum(dim=(0, 2)) / weights.sum())
    return torch.stack(scores).cpu()


__all__ = ["HeadScores", "PatternResult", "attention_patterns", "head_scores"]
