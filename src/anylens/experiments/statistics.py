"""Statistics over prompts for every component: bootstrap intervals, a test against zero, and a
correction for testing many components at once.

Per component, over its per-prompt values ``x_1..x_n``:

* ``boot_low``, ``boot_high``: the percentile bootstrap 95% interval of the mean
  (:data:`N_RESAMPLES` resamples of the prompts with replacement, seeded: the same values and
  seed give the same interval);
* ``p_value``: a two-sided sign-flip permutation test of "the mean is zero": under the null
  each value is as likely positive as negative (a distribution symmetric about 0), so
  ``p = (#{flips s : |mean(s * x)| >= |mean(x)|}) / #flips``, over every one of the ``2^n``
  sign patterns where ``2^n <= N_RESAMPLES`` (exact), else over the identity and
  ``N_RESAMPLES - 1`` random ones (``p >= 1 / N_RESAMPLES``). No distributional assumption
  beyond symmetry, and no dependency beyond numpy;
* ``p_adjusted``: Benjamini-Hochberg adjusted p-values over every component tested together
  (they control the false discovery rate), and ``significant`` = ``p_adjusted < alpha``
  (:data:`ALPHA` = 0.05 unless given).

A component with fewer than two values, or whose values are all equal to zero, gets NaN for the
quantities that need them and is not significant.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..core.errors import StatisticsError

#: Resamples of the bootstrap and of the sign-flip test.
N_RESAMPLES = 10_000
#: The false discovery rate ``significant`` is controlled at, unless given.
ALPHA = 0.05
#: Components resampled together: each pass holds ``[groups, resamples]`` means (20 MB at 10,000).
GROUPS_PER_PASS = 256
#: Columns :func:`component_statistics` adds.
STAT_COLUMNS = ("boot_low", "boot_high", "p_value", "p_adjusted", "significant")


def bootstrap_interval(
    values: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean of each row of ``values`` ``[groups, n]``."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    n = values.shape[1]
    rng = np.random.default_rng(seed)
    # Resample weights: how often each prompt is drawn, shared by the rows (they have the same n).
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).T / n  # [n, resamples]
    means = values @ weights
    tail = (1.0 - level) / 2
    return np.quantile(means, tail, axis=1), np.quantile(means, 1.0 - tail, axis=1)


def sign_flip_p_values(values: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Two-sided sign-flip permutation p-value of "mean = 0" for each row of ``values`` ``[groups, n]``."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    n = values.shape[1]
    if 2**n <= n_resamples:  # every sign pattern: the exact test
        signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice([-1.0, 1.0], size=(n_resamples, n))
        signs[0] = 1.0  # the observed arrangement counts among the flips
    observed = np.abs(values.mean(1))
    flipped = np.abs(values @ signs.T / n)  # [groups, flips]
    # A tolerance so that a flip equal to the observed mean (up to rounding) counts as extreme.
    extreme = flipped >= observed[:, None] * (1 - 1e-12) - 1e-300
    return extreme.mean(1)


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values, in the order given; NaN entries stay NaN and are
    not counted among the tests. ``adjusted_(i) = min_{j >= i} p_(j) * m / j`` over the sorted
    p-values, capped at 1."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if not m:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return adjusted


def component_statistics(
    frame: pd.DataFrame,
    by: Sequence[str],
    value: str,
    alpha: float = ALPHA,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """Per group of ``by`` (one component): the :data:`STAT_COLUMNS` of its ``value`` over
    prompts. Groups are those of ``frame.groupby(by, dropna=False, sort=True)``, in that order
    and with its key columns and dtypes; NaN values are left out of each group's statistics."""
    if not 0 < alpha < 1:
        raise StatisticsError(
            f"alpha={alpha!r}: give the false discovery rate as a number between 0 and 1, such as 0.05"
        )
    values = frame[value].astype(float)
    if by:
        grouped = values.groupby([frame[c] for c in by], dropna=False, sort=True)
        out = grouped.size().reset_index()[list(by)]
        groups = [part.dropna().to_numpy() for _, part in grouped]
    else:
        out, groups = pd.DataFrame(index=range(1)), [values.dropna().to_numpy()]
    stats = np.full((len(groups), 4), np.nan)
    by_count: dict[int, list[int]] = {}  # groups of equal size share one resample matrix
    for index, group in enumerate(groups):
        by_count.setdefault(len(group), []).append(index)
    for count, members in by_count.items():
        if count < 2:
            continue
        for start in range(0, len(members), GROUPS_PER_PASS):  # [groups, resamples] doubles stay small
            chunk = members[start : start + GROUPS_PER_PASS]
            matrix = np.stack([groups[i] for i in chunk])
            low, high = bootstrap_interval(matrix, n_resamples, seed)
            p = sign_flip_p_values(matrix, n_resamples, seed)
            p[np.all(matrix == 0, axis=1)] = np.nan  # no evidence either way: not a test
            stats[chunk, 0], stats[chunk, 1], stats[chunk, 2] = low, high, p
    stats[:, 3] = benjamini_hochberg(stats[:, 2])
    for column, column_values in zip(STAT_COLUMNS[:4], stats.T):
        out[column] = column_values
    out["significant"] = out["p_adjusted"] < alpha
    return out


__all__ = [
    "ALPHA",
    "N_RESAMPLES",
    "STAT_COLUMNS",
    "benjamini_hochberg",
    "bootstrap_interval",
    "component_statistics",
    "sign_flip_p_values",
]
