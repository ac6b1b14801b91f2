"""A self-contained HTML report: sections of text, tables and inline heatmaps (PNG data URIs)."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1200px;
       color: #1d2433; line-height: 1.45; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 2px solid #dde3ee; padding-bottom: .2rem; margin-top: 2.5rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
th, td { border: 1px solid #cfd6e4; padding: .3rem .6rem; text-align: left; }
th { background: #eef2f8; }
figure { display: inline-block; margin: .5rem 1rem 1rem 0; vertical-align: top; }
figure img { max-width: 560px; border: 1px solid #e3e7ef; }
figcaption { font-size: .85rem; color: #4a5468; max-width: 560px; }
.note { color: #4a5468; font-size: .9rem; }
"""


def figure_to_data_uri(figure: Any, dpi: int = 110) -> str:
    """A matplotlib figure as an inline PNG; the figure is closed afterwards."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class Report:
    title: str
    intro: str = ""
    _body: list[str] = field(default_factory=list)

    def section(self, heading: str, text: str = "", anchor: str | None = None) -> None:
        anchor_attr = f' id="{html.escape(anchor)}"' if anchor else ""
        self._body.append(f"<h2{anchor_attr}>{html.escape(heading)}</h2>")
        if text:
            self.paragraph(text)

    def paragraph(self, text: str, css: str = "") -> None:
        klass = f' class="{css}"' if css else ""
        self._body.append(f"<p{klass}>{html.escape(text)}</p>")

    def table(self, frame: pd.DataFrame, table_id: str | None = None, float_format: str = "{:.3g}") -> None:
        formatted = frame.copy()
        for column in formatted.columns:
            if pd.api.types.is_float_dtype(formatted[column]):
                formatted[column] = formatted[column].map(lambda x: "" if pd.isna(x) else float_format.format(x))
        markup = formatted.to_html(index=False, escape=True, border=0)
        if table_id:
            markup = markup.replace("<table", f'<table id="{html.escape(table_id)}"', 1)
        self._body.append(markup)

    def figure(self, figure: Any, caption: str) -> None:
        uri = figure_to_data_uri(figure)
        self._body.append(
            f'<figure><img class="heatmap" src="{uri}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def circuit(self, result: Any, k: int = 20, heading: str | None = None, anchor: str = "circuit") -> None:
        """A section for a :class:`~anylens.circuits.CircuitResult`: how it was scored, its ``k``
        strongest edges as a table and as a graph, and its faithfulness curve (table and plot)
        where measured. ``anchor`` is the section's id and prefixes its tables' ids
        (``{anchor}-edges``, ``{anchor}-faithfulness``), so one report can hold several circuits."""
        meta = result.meta
        self.section(heading or result.title, anchor=anchor)
        self.paragraph(
            f"{meta.get('method', '')} on {meta.get('pairs', '?')} prompt pairs, {meta.get('level', '')} level: "
            f"{meta.get('graph_edges', len(result.frame))} edges scored in {meta.get('forwards', '?')} forward and "
            f"{meta.get('backwards', '?')} backward passes. Metric {meta.get('metric', '')}: clean "
            f"{meta.get('clean_metric', float('nan')):.3g}, corrupt {meta.get('corrupt_metric', float('nan')):.3g}. "
            "A score estimates metric(edge corrupted) - metric(clean).",
            css="note",
        )
        self.table(result.top(k)[["rank", "sender", "receiver", "score"]], table_id=f"{anchor}-edges")
        self.figure(result.plot(k=k), f"the {k} strongest edges, layers bottom to top")
        faithfulness = meta.get("faithfulness")
        if faithfulness:
            self.paragraph(
                f"Faithfulness ({faithfulness['ablation']} ablation): the metric with only the top-k edges "
                "carrying clean values; normalized 0 = no edge kept, 1 = every edge kept.",
                css="note",
            )
            self.table(pd.DataFrame(faithfulness["curve"]), table_id=f"{anchor}-faithfulness")
            self.figure(
                result.plot_faithfulness(),
                "faithfulness against the number of edges kept; the dashed line at 0.8 marks the smallest k reaching it",
            )

    def to_html(self) -> str:
        intro = f"<p>{html.escape(self.intro)}</p>" if self.intro else ""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{intro}{''.join(self._body)}</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_html(), encoding="utf-8")
        tmp.replace(path)
        return path
