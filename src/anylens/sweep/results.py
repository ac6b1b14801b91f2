"""A sweep's results: the tidy frame of every model's rows, and its statistics over prompts.

:class:`SweepResult` is what :func:`anylens.sweep.run` returns; :func:`aggregate` turns the
frame into a mean, standard deviation, count and 95% interval per component, with a bootstrap
interval, a test against zero and Benjamini-Hochberg adjusted p-values
(:mod:`anylens.experiments.statistics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..experiments.results import named_positions
from ..experiments.statistics import ALPHA, N_RESAMPLES, STAT_COLUMNS, component_statistics
from .store import Store, load_results

#: z value of a two-sided 95% interval under the normal approximation.
Z95 = 1.959963984540054
#: Columns that name a component; ``aggregate`` groups by those present unless told otherwise.
COMPONENT_COLUMNS = (
    "model",
    "layer",
    "head",
    "pos",
    "component",
    "kind",
    "query_pos",
    "key_pos",
    "neuron",
    "target_role",
)


@dataclass
class SweepResult:
    """What ``run`` did, and the way to its results: ``frame`` / ``aggregate()``."""

    out: Path
    experiment: str
    models: list[str]
    computed: list[str] = field(default_factory=list)  # chunk keys computed by this call
    skipped: list[str] = field(default_factory=list)  # finished earlier, checksum verified
    recomputed: list[str] = field(default_factory=list)  # found damaged and computed again
    _frame: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def frame(self) -> pd.DataFrame:
        """Every model's rows as one tidy frame (read from disk once, then kept)."""
        if self._frame is None:
            self._frame = load_results(self.out)
        return self._frame

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def aggregate(
        self, by: Sequence[str] | None = None, value: str = "value", alpha: float = ALPHA, seed: int = 0
    ) -> pd.DataFrame:
        return aggregate(self.frame, by=by, value=value, alpha=alpha, seed=seed)

    @property
    def manifest(self) -> dict[str, Any]:
        return Store(self.out).read_manifest()

    def results(self, by: Sequence[str] | None = None) -> dict[str, Any]:
        """Per model, the mean over prompts as an :class:`anylens.Result` (``.plot()`` draws its heatmap).

        The frame keeps the aggregate's columns, with ``value`` = ``mean``.
        """
        from ..experiments.results import Result

        summary = self.aggregate(by=by)
        options = self.manifest["config"]["options"]
        over = options.get("over") if isinstance(options, dict) else None
        results = {}
        for source in self.models:
            frame = summary[summary["model"] == source].drop(columns=["model"]).reset_index(drop=True)
            frame["value"] = frame["mean"]
            meta = {"model": source, "metric": f"mean over prompts of {self.experiment}", "sweep": str(self.out)}
            if isinstance(over, list) and "pos" in over and "pos" not in frame and "pos_label" in frame:
                over = ["pos_label" if d == "pos" else d for d in over]  # positions aggregated by name
            if isinstance(over, list) and all(d in frame.columns for d in over):
                meta["over"] = over
            results[source] = Result(self.experiment, frame, meta)
        return results


def aggregate(
    frame: pd.DataFrame,
    by: Sequence[str] | None = None,
    value: str = "value",
    alpha: float = ALPHA,
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> pd.DataFrame:
    """Per component: ``mean``, ``std`` (sample, ddof=1), ``count`` and a 95% interval over
    prompts, then ``boot_low``, ``boot_high``, ``p_value``, ``p_adjusted`` and ``significant``.

    ``ci_low``/``ci_high`` are the normal approximation ``mean ± 1.96 · std / √count``: fine for a
    few dozen prompts or more, optimistic for a handful (it ignores the t-distribution's wider
    tails); with one prompt ``std`` and the interval are NaN. ``boot_low``/``boot_high`` are the
    percentile bootstrap 95% interval of the mean (``n_resamples`` seeded resamples of the
    prompts); ``p_value`` a sign-flip permutation test of a zero mean, ``p_adjusted`` its
    Benjamini-Hochberg adjustment over every row of the aggregate, and ``significant`` is
    ``p_adjusted < alpha`` (:mod:`anylens.experiments.statistics`). ``by`` defaults to the
    component columns present (model, layer, head, pos, ...), with ``pos_label`` in place of
    ``pos`` where positions were asked for by name (``positions=["S2", "END"]``), so that a name's
    rows group across prompts of different lengths; NaN values are left out of every statistic.
    """
    if value not in frame.columns:
        raise KeyError(f"no column {value!r} to aggregate; columns: {list(frame.columns)}")
    if by is None:
        by = [c for c in COMPONENT_COLUMNS if c in frame.columns and frame[c].notna().any()]
        if named_positions(frame):  # one row per name, whatever position it has in each prompt
            by = ["pos_label" if c == "pos" else c for c in by]
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by if c not in frame.columns]
    if missing:
        raise KeyError(f"cannot group by {missing}: not columns of the frame ({list(frame.columns)})")
    values = frame[value].astype(float)
    if not by:
        grouped = values.agg(["mean", "std", "count"]).to_frame().T
    else:
        grouped = (
            values.groupby([frame[c] for c in by], dropna=False, sort=True).agg(["mean", "std", "count"]).reset_index()
        )
    grouped["count"] = grouped["count"].astype(int)
    half = Z95 * grouped["std"] / grouped["count"].pow(0.5)
    grouped["ci_low"] = grouped["mean"] - half
    grouped["ci_high"] = grouped["mean"] + half
    tests = component_statistics(frame, by, value, alpha=alpha, n_resamples=n_resamples, seed=seed)
    for column in STAT_COLUMNS:  # the same groups in the same order
        grouped[column] = tests[column].to_numpy()
    return grouped.reset_index(drop=True)


__all__ = ["COMPONENT_COLUMNS", "Z95", "SweepResult", "aggregate"]
