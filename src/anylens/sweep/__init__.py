"""Sweeps: one experiment over many models and prompts, written to disk chunk by chunk.

>>> import anylens as al
>>> sweep = al.run("logit_lens", models=["zoo:gpt2", "zoo:llama"], dataset="factual", out="results/lens")
>>> sweep.frame            # one tidy frame for every model
>>> sweep.aggregate()      # mean, std, count and 95% interval over prompts per component

Rerunning the same call resumes it (``fresh=True`` starts over); see ``docs/sweeps.md``.
"""

from ..core.errors import (
    SweepBusyError,
    SweepConfigError,
    SweepError,
    SweepIntegrityError,
    SweepModelError,
    SweepWarning,
    SweepWeightsChangedError,
)
from .runner import SweepResult, aggregate, run
from .store import load_results

__all__ = [
    "SweepBusyError",
    "SweepConfigError",
    "SweepError",
    "SweepIntegrityError",
    "SweepModelError",
    "SweepResult",
    "SweepWarning",
    "SweepWeightsChangedError",
    "aggregate",
    "load_results",
    "run",
]
