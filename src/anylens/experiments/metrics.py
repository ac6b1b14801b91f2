"""Metrics on model outputs: scalars per prompt, computed from logits at the last position.

A metric is built from words (``logit_diff(" Paris", " Rome")``) and bound to a model's
tokenizer when it is evaluated. Targets may be one word for the whole batch or one word per
prompt. A metric scores the final position, so each word is one token there; ``al.patch``,
``al.attribute`` and ``al.ablate`` also take answers of several tokens (``log_prob(" Buenos
Aires")``), which they score by teacher forcing (:mod:`.answers`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import EmptyAnswerError, MetricError, TokenizationError

if TYPE_CHECKING:
    from ..core.model import AnyModel

Target = str | int | Sequence[str | int]


def target_ids(model: AnyModel, target: Target, batch: int) -> torch.Tensor:
    """Token ids ``[batch]`` for one target or one target per prompt (each must be one token)."""
    if isinstance(target, (str, int)):
        return torch.full((batch,), _one_token(model, target), dtype=torch.long)
    ids = [_one_token(model, word) for word in target]
    if len(ids) != batch:
        from ..core.errors import PromptError

        raise PromptError(f"{len(ids)} targets for {batch} prompts: give one target, or one per prompt")
    return torch.tensor(ids, dtype=torch.long)


def answer_tokens(model: AnyModel, word: str | int) -> list[int]:
    """The token ids of one answer: a token id, or a word's tokens (several for a multi-token
    answer such as ``" Buenos Aires"``, each checked as :meth:`AnyModel.token_id` checks one)."""
    if isinstance(word, int) or model.tokenizer is None:
        return [model.token_id(word)]
    ids = model.tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) <= 1:
        return [model.token_id(word)]  # its checks: an empty string, the unknown token
    unknown = getattr(model.tokenizer, "unk_token_id", None)
    if unknown is not None and unknown in ids:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise TokenizationError(
            f"answer {word!r} tokenizes to {pieces}, which holds the unknown token {model.tokenizer.unk_token!r}: "
            "scored so, it would stand for every word the vocabulary lacks; choose words the vocabulary has"
        )
    return list(ids)


_EMPTY = (
    "{what} is an empty string: it has no tokens to score; give the answer's text with its leading space "
    "(such as ' Paris'), or a token id"
)


def check_answers(metric: str, field: str, target: Target) -> None:
    """Refuse an empty answer string when a metric is built, naming the metric and the field."""
    for index, word in enumerate(_words(target)):
        if isinstance(word, str) and not word:
            where = f"{field}" if isinstance(target, str) else f"{field} of prompt {index}"
            raise EmptyAnswerError(_EMPTY.format(what=f"the {where} of al.metrics.{metric}"))


def _one_token(model: AnyModel, word: str | int) -> int:
    """``model.token_id(word)``, saying where a multi-token answer is scored instead."""
    try:
        return model.token_id(word)
    except TokenizationError as error:
        if isinstance(word, str) and model.tokenizer is not None and len(answer_tokens(model, word)) > 1:
            raise TokenizationError(
                f"{error}; al.patch, al.attribute and al.ablate score a multi-token answer by teacher forcing, "
                "but this reads the final position's logits alone"
            ) from None
        raise


def _words(target: Target) -> list[str | int]:
    return [target] if isinstance(target, (str, int)) else list(target)


def _last(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, :] if logits.dim() == 3 else logits


def _gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, ids.to(values.device)[:, None])[:, 0]


@dataclass(frozen=True)
class Metric:
    """Base class: ``metric(logits, model, clean_logits=None) -> Tensor[batch]`` (float32)."""

    name = "metric"
    #: True when larger values mean "more of the clean behaviour"; used to read patching scores.
    higher_is_clean = True
    #: Whether ``__call__`` reads ``clean_logits``. Sweeps hand them over only then: one row of
    #: clean logits per patched row is a ``[rows, vocab]`` copy. True unless a metric says not.
    reads_clean_logits = True

    def __call__(self, logits: torch.Tensor, model: AnyModel, clean_logits: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def columns(self, model: AnyModel) -> list[int] | None:
        """The vocabulary ids this metric reads, or None when it reads the whole distribution.

        Sweeps then compute only these logits; the others are NaN, so reading them shows.
        """
        return None


@dataclass(frozen=True)
class LogitDiff(Metric):
    answer: Target
    distractor: Target
    name = "logit_diff"
    reads_clean_logits = False

    def __post_init__(self):
        check_answers(self.name, "answer", self.answer)
        check_answers(self.name, "distractor", self.distractor)

    def __call__(self, logits, model, clean_logits=None):
        last = _last(logits).float()
        batch = last.shape[0]
        return _gather(last, target_ids(model, self.answer, batch)) - _gather(
            last, target_ids(model, self.distractor, batch)
        )

    def columns(self, model):
        words = [w for target in (self.answer, self.distractor) for w in _words(target)]
        return sorted({model.token_id(word) for word in words})


@dataclass(frozen=True)
class TargetProbability(Metric):
    """The target's share of the next-token distribution, as the class's ``normaliser`` of the
    logits gives it (``"softmax"``: a probability, ``"log_softmax"``: a log-probability)."""

    target: Target
    reads_clean_logits = False
    normaliser = "softmax"

    def __post_init__(self):
        check_answers(self.name, "target", self.target)

    def __call__(self, logits, model, clean_logits=None):
        last = _last(logits).float()
        return _gather(getattr(last, self.normaliser)(-1), target_ids(model, self.target, last.shape[0]))


@dataclass(frozen=True)
class Prob(TargetProbability):
    name = "prob"
    normaliser = "softmax"


@dataclass(frozen=True)
class LogProb(TargetProbability):
    name = "log_prob"
    normaliser = "log_softmax"


@dataclass(frozen=True)
class Rank(Metric):
    """0 when the target is the top prediction."""

    target: Target
    name = "rank"
    higher_is_clean = False
    reads_clean_logits = False

    def __post_init__(self):
        check_answers(self.name, "target", self.target)

    def __call__(self, logits, model, clean_logits=None):
        last = _last(logits).float()
        chosen = _gather(last, target_ids(model, self.target, last.shape[0]))
        return (last > chosen[:, None]).sum(-1).float()


@dataclass(frozen=True)
class Top1(Metric):
    """1 where the target is the top prediction (the token greedy decoding picks), else 0."""

    target: Target
    name = "top1"
    reads_clean_logits = False

    def __post_init__(self):
        check_answers(self.name, "target", self.target)

    def __call__(self, logits, model, clean_logits=None):
        last = _last(logits).float()
        return (last.argmax(-1) == target_ids(model, self.target, last.shape[0]).to(last.device)).float()


@dataclass(frozen=True)
class KL(Metric):
    """KL(clean || run) over the next-token distribution; 0 means the clean distribution."""

    name = "kl"
    higher_is_clean = False

    def __call__(self, logits, model, clean_logits=None):
        if clean_logits is None:
            raise ValueError("the KL metric needs the clean run's logits (experiments pass them)")
        run = _last(logits).float().log_softmax(-1)
        clean = _last(clean_logits).float().log_softmax(-1).to(run.device)
        if clean.shape[0] == 1 and run.shape[0] > 1:
            clean = clean.expand_as(run)
        return (clean.exp() * (clean - run)).sum(-1)


def logit_diff(answer: Target, distractor: Target) -> LogitDiff:
    """logit(answer) - logit(distractor) at the last position."""
    return LogitDiff(answer, distractor)


def prob(target: Target) -> Prob:
    return Prob(target)


def log_prob(target: Target) -> LogProb:
    return LogProb(target)


def rank(target: Target) -> Rank:
    return Rank(target)


def top1(target: Target) -> Top1:
    return Top1(target)


def kl() -> KL:
    return KL()


# -- metrics by name ----------------------------------------------------------------------------
#: metric name -> the words of each prompt pair it is built from (``answer``, ``distractor``)
NAMED: dict[str, tuple[str, ...]] = {
    "logit_diff": ("answer", "distractor"),
    "prob": ("answer",),
    "log_prob": ("answer",),
    "rank": ("answer",),
    "top1": ("answer",),
    "kl": (),
}
_BUILDERS = {"logit_diff": logit_diff, "prob": prob, "log_prob": log_prob, "rank": rank, "top1": top1, "kl": kl}


def pair_word(prompt: Any, field: str) -> str | None:
    """A prompt pair's ``answer`` or ``distractor``, or None when it carries none.

    Pairs are dataset pairs (``IOIPair``, ``FactPair``), sweep items or dicts; factual pairs name
    their distractor ``corrupt_answer``.
    """
    if isinstance(prompt, (str, torch.Tensor)):
        return None
    get = prompt.get if isinstance(prompt, dict) else lambda name: getattr(prompt, name, None)
    word = get(field)
    if word is None and field == "distractor":
        word = get("corrupt_answer")
    return word


def named(name: str, prompts: Any = None) -> Metric:
    """The metric ``name`` (a key of :data:`NAMED`), its words taken from each prompt pair.

    One word when every pair has the same, else one word per pair.
    """
    if name not in NAMED:
        # A known name the given one starts with ("kl_div" -> "kl") before spelling neighbours.
        close = [known for known in NAMED if name.startswith(known)] or difflib.get_close_matches(
            name, list(NAMED), n=1, cutoff=0.5
        )
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MetricError(
            f"unknown metric {name!r}; {hint}metrics by name: {', '.join(NAMED)} (or pass a metric object such as "
            "al.metrics.logit_diff(' Paris', ' Rome'))"
        )
    fields = NAMED[name]
    pairs = _as_pairs(prompts)
    words = []
    for field in fields:
        per_prompt = [pair_word(p, field) for p in pairs]
        lacking = next((p for p, w in zip(pairs, per_prompt) if w is None), None)
        if lacking is not None or not pairs:
            shown = "given as token ids" if isinstance(lacking, torch.Tensor) else repr(_clean_text(lacking))
            shown = f"prompt {shown} carries none" if pairs else "no prompts were given"
            example = ", ".join(("' Paris'", "' Rome'")[: len(fields)])
            raise MetricError(
                f"metric {name!r} is built from each prompt's {' and '.join(fields)}, and {shown}: "
                "give prompt pairs that carry them (such as anylens.datasets.ioi_pairs(model.tokenizer) or, in a "
                "sweep, (clean, corrupt, answer, distractor) tuples), or pass "
                f"a metric object such as al.metrics.{name}({example})"
            )
        words.append(per_prompt[0] if len(set(per_prompt)) == 1 else per_prompt)
    return _BUILDERS[name](*words)


def _clean_text(prompt: Any) -> Any:
    text = prompt.get("clean") if isinstance(prompt, dict) else getattr(prompt, "clean", None)
    return prompt if text is None else text


def _as_pairs(prompts: Any) -> list[Any]:
    if prompts is None:
        return []
    if isinstance(prompts, (str, dict, torch.Tensor)) or hasattr(prompts, "clean"):
        return [prompts]
    return list(prompts)


def resolve(metric: Any, prompts: Any = None, default: Callable[[], Metric] = kl) -> Any:
    """What an experiment scores with: ``metric`` itself, ``default()`` for None, or a metric by
    name built from the prompts' words (see :func:`named`)."""
    if metric is None:
        return default()
    if isinstance(metric, str):
        return named(metric, prompts)
    return metric


def normalized(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """(patched - corrupt) / (clean - corrupt): 0 = corrupt behaviour, 1 = clean behaviour."""
    gap = clean - corrupt
    if torch.any(gap.abs() < 1e-8):
        raise ValueError("clean and corrupt runs give the same metric value: the normalised score is undefined")
    return (patched - corrupt) / gap


__all__ = [
    "KL",
    "NAMED",
    "LogProb",
    "LogitDiff",
    "Metric",
    "Prob",
    "TargetProbability",
    "Rank",
    "answer_tokens",
    "check_answers",
    "kl",
    "log_prob",
    "logit_diff",
    "named",
    "normalized",
    "pair_word",
    "prob",
    "rank",
    "resolve",
    "top1",
]
