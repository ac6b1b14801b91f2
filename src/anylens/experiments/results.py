"""Experiment results: a tidy frame plus what is needed to plot and reload it.

One row per (model, layer, head, position, ...) with the measured ``value``. ``plot`` draws a
heatmap over two of the result's dimensions, labelling positions with the prompt's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.errors import ResultFileError, StatisticsError

#: Dimensions a result may be indexed by, in the order axes are chosen for a plot.
DIMENSIONS = ("layer", "head", "pos", "component", "neuron", "prompt", "rank")


@dataclass
class Result:
    """The outcome of an experiment: ``to_frame()``, ``plot()``, ``save()`` / ``Result.load()``."""

    experiment: str
    frame: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)
    value: str = "value"

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    @property
    def dims(self) -> list[str]:
        """The dimensions this result varies over (e.g. ``["layer", "pos"]``)."""
        over = self.meta.get("over")
        if over:
            return list(over)
        return [d for d in DIMENSIONS if d in self.frame.columns and self.frame[d].nunique() > 1]

    def pivot(self, index: str | None = None, columns: str | None = None, aggfunc: str = "mean") -> pd.DataFrame:
        index, columns = self._axes(index, columns)
        if index == columns:  # a result over one dimension: a single column
            return self.frame.groupby(index)[self.value].agg(aggfunc).to_frame(self.value)
        return self.frame.pivot_table(index=index, columns=columns, values=self.value, aggfunc=aggfunc)

    def _axes(self, index: str | None, columns: str | None) -> tuple[str, str]:
        dims = [d for d in self.dims if d in self.frame.columns]
        if index is None:
            index = dims[0] if dims else "layer"
        if columns is None:
            rest = [d for d in dims if d != index]
            columns = rest[0] if rest else index
        return index, columns

    def plot(
        self,
        index: str | None = None,
        columns: str | None = None,
        ax: Any = None,
        title: str | None = None,
        cmap: str | None = None,
        significant: bool = False,
    ) -> Any:
        """A heatmap of ``value`` with labelled axes; positions are labelled with tokens.

        ``significant=True`` marks with ``*`` the cells whose ``significant`` column is true (a
        :meth:`summary`, or a sweep's aggregate, has one).
        """
        if significant and "significant" not in self.frame.columns:
            raise StatisticsError(
                f"this {self.experiment} result has no 'significant' column to mark: take result.summary() of a "
                "result with per_prompt=True (or a sweep's aggregate) and plot that"
            )
        index, columns = self._axes(index, columns)
        table = self.pivot(index, columns)
        width = min(16, 2.5 + 0.55 * max(len(table.columns), 4))
        height = min(12, 1.8 + 0.35 * max(len(table.index), 4))
        fig, ax = figure_and_axes(ax, (width, height))
        data = table.to_numpy(dtype=float)
        bound = float(abs(data[~pd.isna(data)]).max()) if data.size and (~pd.isna(data)).any() else 1.0
        diverging = (data[~pd.isna(data)] < 0).any() if data.size else False
        image = ax.imshow(
            data,
            aspect="auto",
            cmap=cmap or ("RdBu_r" if diverging else "viridis"),
            vmin=-bound if diverging else None,
            vmax=bound if diverging else None,
            interpolation="nearest",
        )
        fig.colorbar(image, ax=ax, label=self.meta.get("value_label", self.value))
        if significant:
            self._mark_significant(ax, index, columns, table, abs(data) > 0.6 * bound)
        ax.set_xticks(range(len(table.columns)))
        ax.set_xticklabels(
            self._labels(columns, table.columns),
            rotation=60 if columns == "pos" else 0,
            ha="right" if columns == "pos" else "center",
            fontsize=8,
        )
        ax.set_yticks(range(len(table.index)))
        ax.set_yticklabels(self._labels(index, table.index), fontsize=8)
        ax.set_xlabel(columns if columns != index else "")
        ax.set_ylabel(index)
        ax.set_title(title or self.title)
        fig.tight_layout()
        return fig

    def _mark_significant(self, ax: Any, index: str, columns: str, table: pd.DataFrame, dark: Any) -> None:
        flags = self.frame.assign(significant=self.frame["significant"].astype(float))
        marked = Result(self.experiment, flags, self.meta, "significant").pivot(index, columns, aggfunc="max")
        marked = marked.reindex(index=table.index, columns=table.columns)
        for row, column in zip(*(marked.to_numpy(dtype=float) > 0).nonzero()):
            color = "white" if dark[row, column] else "black"  # readable on the strongest colours
            ax.text(column, row, "*", ha="center", va="center", color=color, fontsize=12, fontweight="bold")

    def summary(self, alpha: float = 0.05, seed: int = 0, n_resamples: int | None = None) -> Result:
        """Per component, statistics of ``value`` over the prompts of a ``per_prompt=True`` result:
        ``mean``, ``std``, ``count``, the bootstrap 95% interval ``boot_low``/``boot_high``, the
        sign-flip test's ``p_value``, its Benjamini-Hochberg ``p_adjusted`` over the components,
        and ``significant`` (``p_adjusted < alpha``); see :mod:`anylens.experiments.statistics`.
        The summary's value is ``mean``; ``summary().plot(significant=True)`` marks the cells."""
        from .statistics import N_RESAMPLES, STAT_COLUMNS, component_statistics

        if "prompt" not in self.frame.columns:
            raise StatisticsError(
                f"this {self.experiment} result has one row per component, already averaged over prompts: run it "
                "with per_prompt=True to keep a row per prompt, then take .summary()"
            )
        by = [c for c in self.frame.columns if c in DIMENSIONS and c != "prompt"]
        if "pos" in by and named_positions(self.frame):  # a name's rows, wherever it sits in each prompt
            by = ["pos_label" if c == "pos" else c for c in by]
        values = self.frame[self.value].astype(float)
        grouped = values.groupby([self.frame[c] for c in by], dropna=False, sort=True)
        grouped = grouped.agg(["mean", "std", "count"]).reset_index()
        if "token" in self.frame.columns and "pos" in by:  # the first prompt's token, to read rows by
            first = self.frame.groupby(by, dropna=False, sort=True)["token"].first().to_numpy()
            grouped.insert(by.index("pos") + 1, "token", first)
        tests = component_statistics(self.frame, by, self.value, alpha, n_resamples or N_RESAMPLES, seed)
        frame = grouped.assign(**{column: tests[column].to_numpy() for column in STAT_COLUMNS})
        meta = dict(self.meta, statistics={"of": self.value, "alpha": alpha, "seed": seed})
        return Result(self.experiment, frame, meta, value="mean")

    def _labels(self, dim: str, values: Any) -> list[str]:
        tokens = self.meta.get("tokens")
        if dim == "pos" and tokens:
            return [f"{tokens[int(p)]!r} {int(p)}" if 0 <= int(p) < len(tokens) else str(p) for p in values]
        return [str(v) for v in values]

    @property
    def title(self) -> str:
        parts = [self.experiment, self.meta.get("model", ""), self.meta.get("role", ""), self.meta.get("metric", "")]
        return " · ".join(str(p) for p in parts if p)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the result as one JSON file (meta + rows); ``Result.load`` reads it back."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "experiment": self.experiment,
            "value": self.value,
            "meta": self.meta,
            "columns": list(self.frame.columns),
            "rows": json.loads(self.frame.to_json(orient="values", double_precision=15)),
            "dtypes": {c: str(t) for c, t in self.frame.dtypes.items()},
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, default=_jsonable))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Read a file written by :meth:`save`; a damaged one raises :class:`ResultFileError`."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            frame = pd.DataFrame(payload["rows"], columns=payload["columns"])
            for column, dtype in payload.get("dtypes", {}).items():
                if dtype.startswith(("int", "float", "bool")):
                    frame[column] = frame[column].astype(dtype)
            return cls(payload["experiment"], frame, payload.get("meta", {}), payload.get("value", "value"))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            # Truncated JSON, another file's JSON, or rows that do not fit the columns.
            what = (
                "not JSON"
                if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError))
                else f"not a saved result ({error!r})"
            )
            raise ResultFileError(
                f"{path} is damaged: {what}; save the result again with result.save(path), "
                "or load a file that Result.save wrote"
            ) from None

    def __repr__(self) -> str:
        return f"<Result {self.title}: {len(self.frame)} rows over {self.dims}>"


class ComparesRuns:
    """A result of a clean and a corrupt run: their metrics, as its ``meta`` records them."""

    meta: dict[str, Any]

    @property
    def clean_metric(self) -> float:
        return self.meta["clean_metric"]

    @property
    def corrupt_metric(self) -> float:
        return self.meta["corrupt_metric"]


def figure_and_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """``ax``'s figure and ``ax``, or a new figure of ``figsize`` with one axes; without a given
    ``ax`` matplotlib draws headless (Agg) unless a backend was already chosen."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def named_positions(frame: pd.DataFrame) -> bool:
    """Whether positions were asked for by name: some ``pos_label`` is not its row's token."""
    if "pos_label" not in frame.columns or "token" not in frame.columns:
        return False
    return bool((frame["pos_label"].astype(str) != frame["token"].astype(str)).any())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def concat(results: list[Result]) -> Result:
    """Results of the same experiment on several models as one (the frames stacked)."""
    if not results:
        raise ValueError("no results to combine")
    frame = pd.concat([r.frame for r in results], ignore_index=True)
    meta = dict(results[0].meta)
    meta["models"] = [r.meta.get("model") for r in results]
    return Result(results[0].experiment, frame, meta, results[0].value)
