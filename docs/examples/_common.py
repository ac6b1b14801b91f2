"""Helpers shared by the example scripts: loading a source, building prompts for any tokenizer,
choosing component roles from ``model.roles``, and writing what a script prints to a file.

Nothing here names an architecture: every choice is made from the roles a model reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODELS = ["zoo:gpt2", "zoo:llama", "zoo:mistral", "zoo:mamba"]
#: Plots are saved small: these examples are committed with their outputs.
DPI = 80


def cli(main: Any, doc: str | None) -> None:
    """``python SCRIPT [--out DIR] [SOURCE ...]``: run ``main`` on the sources (default: the zoo)."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("sources", nargs="*", default=DEFAULT_MODELS, help="model sources (default: the zoo)")
    parser.add_argument("--out", default="docs/examples/output", help="where the report and figures go")
    args = parser.parse_args()
    main(args.sources or DEFAULT_MODELS, out=args.out)


# -- models --------------------------------------------------------------------------------------
def load(source: str) -> Any:
    """Anything ``al.load`` takes, plus ``tiny:FAMILY`` (a random model from ``anylens.tiny``)."""
    from anylens.sweep.runner import load_source

    return load_source(source)


def slug(source: str) -> str:
    """A file-name-safe name for a source: ``zoo:llama`` -> ``zoo_llama``."""
    text = Path(source).name if ("/" in source or "\\" in source) else source
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def component_role(model: Any) -> tuple[str, tuple[str, ...]]:
    """The finest attention-like component a model has: per-head ``z`` over (layer, head) where
    the model has heads, else the SSM ``mixer_out`` per layer, else ``attn_out`` per layer."""
    if "z" in model.roles:
        return "z", ("layer", "head")
    for role in ("mixer_out", "attn_out"):
        if role in model.roles:
            return role, ("layer",)
    return "resid_post", ("layer",)


def writer_roles(model: Any) -> list[str]:
    """The per-layer roles that write into the residual stream, those this model has."""
    return [role for role in ("attn_out", "mlp_out", "mixer_out") if role in model.roles]


# -- prompts -------------------------------------------------------------------------------------
@dataclass
class Task:
    """Prompts with answers to score.

    ``clean``/``corrupt`` are lists of strings, or token-id tensors ``[n, pos]`` for the fallback;
    ``answers``/``distractors`` hold one word (with its leading space) or token id per prompt.
    ``source`` says where the prompts came from ("dataset" or "random ids").
    """

    clean: list[str] | torch.Tensor
    corrupt: list[str] | torch.Tensor | None
    answers: list[str | int]
    distractors: list[str | int]
    source: str

    def __len__(self) -> int:
        return len(self.answers)

    def prompt(self, index: int = 0) -> str | torch.Tensor:
        """One clean prompt, as a string or a ``[1, pos]`` id tensor."""
        return self.clean[index] if isinstance(self.clean, list) else self.clean[index : index + 1]

    def text(self, model: Any, index: int = 0, corrupt: bool = False) -> str:
        prompts = self.corrupt if corrupt else self.clean
        if isinstance(prompts, list):
            return prompts[index]
        return model.tokenizer.decode(prompts[index])

    def label(self, model: Any, value: str | int) -> str:
        return value if isinstance(value, str) else model.tokenizer.decode([int(value)])


def factual_task(model: Any, n: int = 8) -> Task:
    """Up to ``n`` factual-recall prompts of one token length ("The capital of France is" ->
    " Paris", scored against the counterfactual's answer), France first where present.

    Falls back to random-id prompts (see :func:`random_task`) when the tokenizer cannot express
    the dataset (no single-token answers, or no two prompts of the same length).
    """
    from anylens.datasets import factual_pairs

    pairs = factual_pairs(model.tokenizer)
    if pairs:
        by_length: dict[int, list] = {}
        for pair in pairs:
            length = len(model.tokenizer(pair.clean)["input_ids"])
            by_length.setdefault(length, []).append(pair)
        # The largest group of equal-length prompts (ablation and batching need equal lengths),
        # ordered so that "The capital of France is" leads when it is there.
        group = max(by_length.values(), key=len)
        group = sorted(group, key=lambda p: (p.subject != "France", p.relation != "capital"))[:n]
        if len(group) >= min(n, 2):
            return Task(
                [p.clean for p in group], [p.corrupt for p in group],
                [p.answer for p in group], [p.corrupt_answer for p in group], "dataset",
            )  # fmt: skip
    return random_task(model, n)


def ioi_task(model: Any, n: int = 8) -> Task:
    """``n`` IOI pairs of one token length (clean: "..., John gave a drink to" -> " Mary";
    corrupt: the subject swapped), scored as logit(IO) - logit(S); random-id pairs when the
    tokenizer lacks single-token names."""
    from anylens import PromptError
    from anylens.datasets import ioi_pairs

    try:
        pairs = ioi_pairs(model.tokenizer, 4 * n, seed=0)
    except PromptError:
        # The tiny test tokenizer, for one, has only two single-token names.
        return random_task(model, n)
    # Templates differ in length; a batch of pairs must share one (positions line up).
    by_length: dict[int, list] = {}
    for pair in pairs:
        by_length.setdefault(len(model.tokenizer(pair.clean)["input_ids"]), []).append(pair)
    group = max(by_length.values(), key=len)[:n]
    return Task(
        [p.clean for p in group], [p.corrupt for p in group],
        [p.answer for p in group], [p.distractor for p in group], "dataset",
    )  # fmt: skip


def prompt_batch(model: Any, n: int = 4) -> list[str] | torch.Tensor:
    """``n`` distinct factual prompts of as many different token lengths as there are (a batch
    that needs padding), or random-id prompts when the tokenizer cannot express the dataset."""
    from anylens.datasets import factual_pairs

    prompts = list(dict.fromkeys(p.clean for p in factual_pairs(model.tokenizer)))
    by_length: dict[int, list[str]] = {}
    for prompt in prompts:
        by_length.setdefault(len(model.tokenizer(prompt)["input_ids"]), []).append(prompt)
    # One prompt of each length first, then the rest.
    ordered = [group[0] for group in by_length.values()] + [p for group in by_length.values() for p in group[1:]]
    if len(ordered) >= min(n, 2):
        return ordered[:n]
    return random_task(model, n).clean


def random_task(model: Any, n: int = 8, length: int = 10, seed: int = 0) -> Task:
    """A fallback that works with any tokenizer: ``n`` prompts of ``length`` random tokens, and
    corrupt copies whose last token is replaced by another.

    The answer of each prompt is the model's own top prediction on the clean prompt and the
    distractor its top prediction on the corrupt one (or the clean runner-up when both agree), so
    the logit difference is positive on clean prompts and the two runs can be told apart.
    """
    candidates = _word_tokens(model)
    generator = torch.Generator().manual_seed(seed)
    clean = candidates[torch.randint(len(candidates), (n, length), generator=generator)]
    corrupt = clean.clone()
    shift = torch.randint(1, len(candidates), (n,), generator=generator)
    index = torch.searchsorted(candidates, clean[:, -1].contiguous())
    corrupt[:, -1] = candidates[(index + shift) % len(candidates)]
    with torch.no_grad():
        clean_top = model.hf(clean.to(model.device)).logits[:, -1].topk(2, dim=-1).indices.cpu()
        corrupt_top = model.hf(corrupt.to(model.device)).logits[:, -1].argmax(-1).cpu()
    answers = clean_top[:, 0].tolist()
    distractors = [int(c) if int(c) != a else int(top[1]) for a, c, top in zip(answers, corrupt_top, clean_top)]
    return Task(clean, corrupt, answers, distractors, "random ids")


def _word_tokens(model: Any) -> torch.Tensor:
    """Sorted ids of the tokens that decode to a plain word (readable prompts), or of every
    non-special token when there are too few of those."""
    tokenizer = model.tokenizer
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(min(len(tokenizer), model.d_vocab)) if i not in special]
    words = [i for i in ids if tokenizer.decode([i]).strip().isalpha() and tokenizer.decode([i]).isascii()]
    return torch.tensor(words if len(words) >= 20 else ids)


# -- output --------------------------------------------------------------------------------------
class Report:
    """Prints lines and keeps them, to be written to ``out/<name>.txt`` at the end."""

    def __init__(self, out: str | Path, name: str):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        text = text.rstrip()
        print(text, flush=True)
        self.lines.append(text)

    def figure(self, fig: Any, stem: str) -> Path:
        """Save a matplotlib figure as ``out/<stem>.png`` (small) and close it."""
        import matplotlib.pyplot as plt

        path = self.out / f"{stem}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        self(f"  saved {path}")
        return path

    def save(self) -> Path:
        path = self.out / f"{self.name}.txt"
        path.write_text("\n".join(self.lines) + "\n")
        return path
