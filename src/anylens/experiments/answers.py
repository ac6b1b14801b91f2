"""Answers of several tokens, scored by teacher forcing.

``log_prob(" Buenos Aires")`` is the sum of the answer's token log-probabilities, each given the
prompt and the answer tokens before it: log p(t0 | prompt) + log p(t1 | prompt t0) + ... A
metric scores the final position only, so such a metric becomes several *steps*, each an
ordinary final-position metric on the prompt with the answer's first ``j`` tokens appended
(to the clean and the corrupt prompt alike): step ``j`` scores ``log p(t_j)``. The steps' values
are summed per prompt pair. Patched positions are those of the prompt; the appended tokens are
never patched, and a causal model computes the prompt's positions as without them, so the
activations copied between runs are the prompt's own. ``al.patch``, ``al.attribute`` and
``al.ablate`` score such metrics this way.

``logit_diff(answer, distractor)`` between multi-token answers is the difference of the two
sums. Its first step scores both first tokens on the bare prompt, as one logit difference
(which equals the difference of their log-probabilities); every further token of either answer
is a step of its own. The cost: one patching sweep per step, i.e. ``1 + (m_a - 1) + (m_d - 1)``
sweeps for answers of ``m_a`` and ``m_d`` tokens (``m`` for ``log_prob``), each on prompts a few
tokens longer. ``prob`` is ``exp`` of the ``log_prob`` sum. ``rank`` and ``top1`` are defined for
one token only. Where every answer is one token, nothing here applies and a metric scores
exactly as it always has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import MetricError
from .metrics import LogitDiff, LogProb, Metric, Prob, Rank, Top1, _words, answer_tokens

if TYPE_CHECKING:
    from ..core.model import AnyModel
    from .patching import PairedRuns


@dataclass
class AnswerStep:
    """One final-position run of a teacher-forced metric.

    ``pairs``: the prompt pairs it covers (those whose answer has a ``j``-th token);
    ``appended``: ``[len(pairs), j]`` answer tokens appended to both prompts of each pair;
    ``metric``: what it scores at the final position; ``sign``: +1, or -1 for a distractor.
    """

    pairs: torch.Tensor
    appended: torch.Tensor
    metric: Metric
    sign: float = 1.0


@dataclass
class TeacherForced:
    """A metric on multi-token answers as :class:`AnswerStep` runs; ``exp``: the metric is the
    exponential of the steps' sum (a probability)."""

    steps: list[AnswerStep]
    n_pairs: int
    exp: bool = False

    def total(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The signed sum over steps of ``parts`` (one per step, ``[..., len(step.pairs)]``),
        ``[..., n_pairs]``: per pair, the sum of its answer's token log-probabilities."""
        shape = (*parts[0].shape[:-1], self.n_pairs)
        out = torch.zeros(shape, dtype=torch.float64)
        for step, part in zip(self.steps, parts):
            out[..., step.pairs] += step.sign * part.double()
        return out.float()

    def runs(self, runs: PairedRuns, step: AnswerStep) -> PairedRuns:
        """``runs`` cut to the step's pairs, each prompt with the step's answer tokens appended;
        the patched and source positions stay those of the prompt."""
        appended = step.appended.to(runs.clean.dtype)
        return dataclasses.replace(
            runs,
            clean=torch.cat([runs.clean[step.pairs], appended], 1),
            corrupt=torch.cat([runs.corrupt[step.pairs], appended], 1),
        )


def teacher_forcing(metric: Any, model: AnyModel, n_pairs: int) -> TeacherForced | None:
    """``metric`` as teacher-forced steps where one of its answers has several tokens; None
    where every answer is one token (or the metric has no answers), so it scores as it is."""
    if isinstance(metric, LogitDiff):
        answers = _per_pair(model, metric.answer, n_pairs)
        distractors = _per_pair(model, metric.distractor, n_pairs)
        if all(len(t) == 1 for t in answers + distractors):
            return None
        first = LogitDiff(_targets([a[0] for a in answers]), _targets([d[0] for d in distractors]))
        steps = [AnswerStep(torch.arange(n_pairs), torch.zeros(n_pairs, 0, dtype=torch.long), first)]
        return TeacherForced(steps + _later_tokens(answers, 1.0) + _later_tokens(distractors, -1.0), n_pairs)
    if isinstance(metric, (LogProb, Prob)):
        targets = _per_pair(model, metric.target, n_pairs)
        if all(len(t) == 1 for t in targets):
            return None
        first = LogProb(_targets([t[0] for t in targets]))
        steps = [AnswerStep(torch.arange(n_pairs), torch.zeros(n_pairs, 0, dtype=torch.long), first)]
        return TeacherForced(steps + _later_tokens(targets, 1.0), n_pairs, exp=isinstance(metric, Prob))
    if isinstance(metric, (Rank, Top1)):
        long = [w for w in _words(metric.target) if len(answer_tokens(model, w)) > 1]
        if long:
            raise MetricError(
                f"metric {metric.name!r} is defined for a one-token target, and {long[0]!r} is "
                f"{len(answer_tokens(model, long[0]))} tokens: score a multi-token answer with "
                "al.metrics.log_prob or al.metrics.logit_diff"
            )
    return None


def _per_pair(model: AnyModel, target: Any, n_pairs: int) -> list[list[int]]:
    words = _words(target)
    tokens = [answer_tokens(model, word) for word in words]
    if len(tokens) == 1:
        return tokens * n_pairs
    if len(tokens) != n_pairs:
        from ..core.errors import PromptError

        raise PromptError(f"{len(tokens)} targets for {n_pairs} prompts: give one target, or one per prompt")
    return tokens


def _targets(ids: list[int]) -> int | list[int]:
    """One token id where every pair has the same, else one per pair."""
    return ids[0] if len(set(ids)) == 1 else ids


def _later_tokens(answers: list[list[int]], sign: float) -> list[AnswerStep]:
    """Steps ``j >= 1``: on the pairs whose answer has a ``j``-th token, its first ``j`` tokens
    appended, scoring ``log p(t_j)``."""
    steps = []
    for j in range(1, max(len(a) for a in answers)):
        pairs = [i for i, a in enumerate(answers) if len(a) > j]
        appended = torch.tensor([answers[i][:j] for i in pairs], dtype=torch.long)
        metric = LogProb(_targets([answers[i][j] for i in pairs]))
        steps.append(AnswerStep(torch.tensor(pairs, dtype=torch.long), appended, metric, sign))
    return steps


__all__ = ["AnswerStep", "TeacherForced", "teacher_forcing"]
