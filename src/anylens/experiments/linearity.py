"""Checking attribution patching against exact patching: ``al.attribute(..., verify=k)``.

Attribution patching is a first-order estimate. Where the metric is far from linear in the
patched activation (large patches, saturated probabilities, prompts of different lengths whose
aligned positions do not play the same part) the estimate can rank components badly while its
arithmetic is right. ``verify=k`` runs exact patching (:func:`.patching.patched_values`, what
``al.patch`` runs) on the ``k`` components of largest ``|estimate|`` (averaged over prompt
pairs), and reports the Pearson and Spearman correlations between the estimated and the exact
patched metric over them. A Pearson r below :data:`LINEARITY_THRESHOLD` (or one that cannot be
measured, as when every exact value is the same) gives a :class:`LinearityWarning`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..core.errors import LinearityWarning, StatisticsError
from .patching import PairedRuns, patched_values

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Pearson r under which the estimate is reported as untrustworthy: below 0.5 it explains under
#: a quarter of the exact effects' variance over the verified components.
LINEARITY_THRESHOLD = 0.5
#: Fewest components a correlation is reported over.
MIN_VERIFIED = 3


def check_verify(verify: Any) -> int | None:
    """``verify`` as a number of components, or a :class:`StatisticsError` saying what to give."""
    if verify is None:
        return None
    if isinstance(verify, bool) or not isinstance(verify, (int, np.integer)) or verify < MIN_VERIFIED:
        raise StatisticsError(
            f"verify={verify!r}: give the number of top components to patch exactly, at least {MIN_VERIFIED} "
            "for a correlation (such as verify=20), or None"
        )
    return int(verify)


def verify_estimate(
    model: AnyModel,
    runs: PairedRuns,
    role: str,
    layer_list: list[int],
    components: list,
    metric: Any,
    estimate: torch.Tensor,
    unpatched: torch.Tensor,
    k: int,
) -> dict[str, Any]:
    """Exact patching of the ``k`` components with the largest ``|estimate|`` averaged over
    pairs (``estimate``: ``[components, pairs]``, the estimated patched metric less the
    unpatched run's ``unpatched`` ``[pairs]``), and how well the estimated patched metric
    tracks the exact one over them."""
    mean_estimate = estimate.double().mean(1)
    order = torch.argsort(mean_estimate.abs(), descending=True, stable=True)
    top = order[: min(k, len(components))].tolist()
    chosen = [components[i] for i in top]
    exact, _, _, _ = patched_values(model, runs, role, layer_list, chosen, metric)
    exact_mean = exact.double().mean(1).numpy()
    guess = (mean_estimate[top] + unpatched.double().mean()).numpy()
    pearson = _correlation(guess, exact_mean)
    spearman = _correlation(pd.Series(guess).rank().to_numpy(), pd.Series(exact_mean).rank().to_numpy())
    if not pearson >= LINEARITY_THRESHOLD:
        shown = "cannot be measured (the values do not vary)" if np.isnan(pearson) else f"is {pearson:.2f}"
        warnings.warn(
            f"attribution patching checked against exact patching on its top {len(top)} components: Pearson r "
            f"{shown}, under {LINEARITY_THRESHOLD}; the linear estimate does not hold here, so rank components "
            "with al.patch (or attribute smaller changes: heads or sublayer outputs rather than the residual stream)",
            LinearityWarning,
            stacklevel=5,  # the caller of al.attribute (through its two wrappers)
        )
    return {
        "k": len(top),
        "components": [{"layer": c.layer, "pos": c.pos, "head": c.head} for c in chosen],
        "estimated": guess.tolist(),
        "exact": exact_mean.tolist(),
        "pearson": pearson,
        "spearman": spearman,
        "threshold": LINEARITY_THRESHOLD,
    }


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


__all__ = ["LINEARITY_THRESHOLD", "MIN_VERIFIED", "check_verify", "verify_estimate"]
