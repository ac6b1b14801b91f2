"""Testing a circuit hypothesis by resampling what it says does not matter (causal scrubbing, on edges).

A :class:`Hypothesis` names the edges that matter and, for some receivers, a feature of the prompt
that is all their kept inputs need ("the name movers only need the IO name"). :func:`scrub` runs
every prompt of a dataset with

* each edge **outside** the hypothesis carrying its sender's write from another prompt of the
  dataset, drawn at random (a resampling ablation), and
* each kept edge into a receiver with a feature carrying its sender's write from a prompt that
  agrees with this one on the feature (drawn at random among them, this one included); kept edges
  into receivers without a feature carry this prompt's own write,

all in one forward per batch, each receiver's input rebuilt from the writes of that same forward
(the ``ablate`` mode of :mod:`.edges`). It reports the share of the metric the hypothesis keeps,
``(scrubbed - ablated) / (clean - ablated)``, where ``ablated`` resamples every edge: 1 when the
hypothesis explains the behaviour, 0 when it explains none of it, with a bootstrap interval over
prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.errors import CircuitGraphError, OptionError, PromptError
from ..engine.metric_rows import score_rows
from ..experiments.prompts import tokenize_aligned
from ..experiments.results import Result
from .edges import EdgeRows, graph_roles, record_senders, rows_per_forward, run_rows, usable_metric
from .graph import HEAD_NAME, Edge, Graph, component_graph

if TYPE_CHECKING:
    from ..core.model import AnyModel

Feature = str | Callable[[Any], Hashable]


@dataclass(frozen=True)
class Hypothesis:
    """The edges a behaviour needs, and what some receivers' kept inputs need of the prompt.

    ``edges``: edges as ``"sender->receiver"``, ``(sender, receiver)`` or :class:`Edge`.
    ``features``: receiver name -> the feature its kept inputs may be resampled under: the name of
    a field of the dataset items (``"io"``) or a function of an item. ``level``: the graph's level
    (default: "head" when an edge starts at a head).
    """

    edges: tuple[Any, ...]
    features: Mapping[str, Feature] = field(default_factory=dict)
    level: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "edges", tuple(self.edges))
        object.__setattr__(self, "features", dict(self.features))


@dataclass(repr=False)
class ScrubResult(Result):
    """Per prompt (and resample): the ``clean``, ``scrubbed`` and ``ablated`` metric; ``fraction``
    kept and its bootstrap ``interval`` in ``meta`` and as properties."""

    @property
    def fraction(self) -> float:
        return self.meta["fraction"]

    @property
    def interval(self) -> tuple[float, float]:
        low, high = self.meta["interval"]
        return low, high


def scrub(
    model: AnyModel,
    hypothesis: Hypothesis | Mapping[str, Any],
    dataset: Iterable[Any],
    *,
    metric: Any,
    samples: int = 1,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
) -> ScrubResult:
    """Resample-ablate what ``hypothesis`` says does not matter, over ``dataset``, and report the
    share of ``metric`` it keeps (see the module docstring).

    ``dataset``: prompts of one token length, as strings or items with a ``prompt`` or ``clean``
    text (the zoo's ``IOIPrompt``, ``IOIPair``, dicts); features read fields of these items.
    ``metric`` may have one target per item. ``samples`` independent resamplings per prompt.
    """
    hypothesis = _as_hypothesis(hypothesis)
    items = list(dataset)
    if len(items) < 2:
        raise PromptError(f"scrub resamples from other prompts of the dataset: give at least two, not {len(items)}")
    for name, value in (("samples", samples), ("n_bootstrap", n_bootstrap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"{name}={value!r}: give a positive whole number")
    if not 0 < confidence < 1:
        raise OptionError(f"confidence={confidence!r}: give a share between 0 and 1, such as 0.95")
    metric = usable_metric(metric, items)
    ids = _token_ids(model, [_text(item) for item in items])
    graph = component_graph(model, hypothesis.level or _level_of(hypothesis))
    kept = graph.parse_edges(hypothesis.edges)
    features = _feature_classes(graph, hypothesis, items)

    n = len(items)
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.arange(n).repeat(samples)  # row -> prompt, sample-major
    scrubbed, ablated = _scenarios(graph, kept, features, prompts, n, generator)
    rows = EdgeRows(
        torch.cat([scrubbed[0], ablated[0]]), torch.cat([prompts, prompts]), torch.cat([scrubbed[1], ablated[1]])
    )
    with model.operation_hooks_only_for(graph_roles(graph)):
        per_forward = rows_per_forward(model, graph, ids.shape[1], "ablate", batch_size, memory_budget)
        source, clean_last = record_senders(model, graph, ids, per_forward)
        last = run_rows(
            model, graph, ids, rows, mode="ablate", source=source, batch_size=batch_size, memory_budget=memory_budget
        )
    every = torch.arange(n)
    clean = score_rows(metric, model, clean_last, every, n, clean_last).float().cpu()[prompts]
    values = score_rows(metric, model, last, rows.pair_of_row, n, clean_last).float().cpu()
    scrubbed_values, ablated_values = values[: len(prompts)], values[len(prompts) :]

    fraction = _fraction(clean, scrubbed_values, ablated_values)
    interval = _bootstrap(clean, scrubbed_values, ablated_values, prompts, n, n_bootstrap, confidence, seed)
    frame = pd.DataFrame(
        {
            "prompt": prompts.numpy(),
            "sample": torch.arange(samples).repeat_interleave(n).numpy(),
            "clean": clean.double().numpy(),
            "scrubbed": scrubbed_values.double().numpy(),
            "ablated": ablated_values.double().numpy(),
        }
    )
    meta = {
        "model": model.name,
        "adapter": model.adapter.name,
        "level": graph.level,
        "edges_kept": len(kept),
        "edges": len(graph),
        "features": {
            name: feature if isinstance(feature, str) else repr(feature)
            for name, feature in hypothesis.features.items()
        },
        "metric": getattr(metric, "name", type(metric).__name__),
        "n_prompts": n,
        "samples": samples,
        "clean_metric": float(clean.mean()),
        "scrubbed_metric": float(scrubbed_values.mean()),
        "ablated_metric": float(ablated_values.mean()),
        "fraction": fraction,
        "interval": list(interval),
        "confidence": confidence,
    }
    result = ScrubResult("scrub", frame, meta, value="scrubbed")
    result.sources = {"scrubbed": scrubbed[1], "ablated": ablated[1]}  # prompt each edge read, per row
    return result


def _as_hypothesis(hypothesis: Any) -> Hypothesis:
    if isinstance(hypothesis, Hypothesis):
        return hypothesis
    if isinstance(hypothesis, Mapping) and "edges" in hypothesis:
        unknown = set(hypothesis) - {"edges", "features", "level"}
        if not unknown:
            return Hypothesis(**hypothesis)
    raise CircuitGraphError(
        f"cannot read {hypothesis!r} as a hypothesis: give anylens.circuits.Hypothesis(edges=[...], "
        "features={receiver: feature}) or a dict with 'edges' (and optionally 'features', 'level')"
    )


def _level_of(hypothesis: Hypothesis) -> str:
    """ "head" when an edge starts at a head (``a{layer}.h{head}``), else "layer"."""
    senders = []
    for edge in hypothesis.edges:
        if isinstance(edge, Edge):
            senders.append(edge.sender.name)
        elif isinstance(edge, tuple) and edge:
            senders.append(str(edge[0]))
        elif isinstance(edge, str):
            senders.append(edge.split("->", 1)[0].strip())
    return "head" if any(HEAD_NAME.match(name) for name in senders) else "layer"


def _text(item: Any) -> str | torch.Tensor:
    if isinstance(item, (str, torch.Tensor)):
        return item
    for name in ("prompt", "clean"):
        value = item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)
        if isinstance(value, (str, torch.Tensor)):
            return value
    raise PromptError(
        f"cannot read {item!r} as a prompt: give strings, token ids, or items with a 'prompt' or 'clean' text"
    )


def _token_ids(model: AnyModel, prompts: list[str | torch.Tensor]) -> torch.Tensor:
    """``[n, pos]`` token ids of prompts of one length (texts, or 1-d token-id tensors)."""
    if all(isinstance(p, torch.Tensor) for p in prompts):
        lengths = sorted({int(p.shape[-1]) for p in prompts})
        if len(lengths) > 1 or any(p.dim() != 1 for p in prompts):
            raise PromptError(f"scrub needs prompts of one token length; these have {lengths} tokens")
        return torch.stack(prompts).to(model.device)
    if any(isinstance(p, torch.Tensor) for p in prompts):
        raise PromptError("give the dataset's prompts all as texts or all as token ids, not both")
    return tokenize_aligned(model, prompts).to(model.device)


def _feature_classes(graph: Graph, hypothesis: Hypothesis, items: list[Any]) -> dict[str, torch.Tensor]:
    """Receiver name -> for each prompt, the id of its feature value's class."""
    classes = {}
    for name, feature in hypothesis.features.items():
        receiver = graph.receiver(name)
        values = [_feature(feature, item, name) for item in items]
        ids: dict[Hashable, int] = {}
        classes[receiver.name] = torch.tensor([ids.setdefault(value, len(ids)) for value in values])
    return classes


def _feature(feature: Feature, item: Any, receiver: str) -> Hashable:
    if callable(feature):
        return feature(item)
    value = item.get(feature) if isinstance(item, Mapping) else getattr(item, feature, None)
    if value is None:
        raise PromptError(
            f"the feature {feature!r} of receiver {receiver!r} is not a field of {item!r}: name a field the "
            "dataset's items have, or give a function of an item"
        )
    return value


def _scenarios(
    graph: Graph,
    kept: list,
    features: dict[str, torch.Tensor],
    prompts: torch.Tensor,
    n: int,
    generator: torch.Generator,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(coefficients, source prompt per edge) of the scrubbed and of the fully ablated rows."""
    rows, n_edges = len(prompts), len(graph)
    receivers = [r.name for r in graph.receivers]
    receiver_of_edge = torch.tensor([receivers.index(e.receiver.name) for e in graph.edges])
    # A random other prompt per row and receiver: an offset of 1 .. n-1 never lands on the prompt itself.
    other = (prompts[:, None] + torch.randint(1, n, (rows, len(receivers)), generator=generator)) % n
    agree = prompts[:, None].repeat(1, len(receivers))
    for name, classes in features.items():
        column = receivers.index(name)
        for row, prompt in enumerate(prompts.tolist()):
            same = (classes == classes[prompt]).nonzero()[:, 0]
            agree[row, column] = same[torch.randint(len(same), (1,), generator=generator)]
    kept_mask = torch.zeros(n_edges, dtype=torch.bool)
    kept_mask[[graph.index(edge) for edge in kept]] = True
    featured = torch.tensor([e.receiver.name in features for e in graph.edges])
    other_per_edge, agree_per_edge = other[:, receiver_of_edge], agree[:, receiver_of_edge]
    # Kept edges into a receiver without a feature read this prompt's own write: nothing to change.
    coefficients = (~kept_mask | featured).float().expand(rows, n_edges).clone()
    scrubbed_source = torch.where(kept_mask[None, :], agree_per_edge, other_per_edge)
    ablated = (torch.ones(rows, n_edges), other_per_edge)
    return (coefficients, scrubbed_source), ablated


def _fraction(clean: torch.Tensor, scrubbed: torch.Tensor, ablated: torch.Tensor) -> float:
    gap = float(clean.mean() - ablated.mean())
    if abs(gap) < 1e-8:
        return float("nan")
    return float(scrubbed.mean() - ablated.mean()) / gap


def _bootstrap(
    clean: torch.Tensor,
    scrubbed: torch.Tensor,
    ablated: torch.Tensor,
    prompts: torch.Tensor,
    n: int,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> tuple[float, float]:
    """A percentile interval of the fraction over resampled prompts (a prompt's resamples stay together)."""
    generator = torch.Generator().manual_seed(seed + 1)
    draws = torch.randint(n, (n_bootstrap, n), generator=generator)  # prompts drawn with replacement
    counts = torch.zeros(n_bootstrap, n).scatter_add_(1, draws, torch.ones(n_bootstrap, n))
    weights = counts[:, prompts]  # each row weighs as often as its prompt was drawn
    weights = weights / weights.sum(1, keepdim=True)
    means = [(weights * values[None]).sum(1) for values in (clean, scrubbed, ablated)]
    gap = means[0] - means[2]
    fractions = (means[1] - means[2]) / torch.where(gap.abs() < 1e-8, torch.nan, gap)
    fractions = fractions[~fractions.isnan()]
    if len(fractions) == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = torch.quantile(fractions.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


__all__ = ["Hypothesis", "ScrubResult", "scrub"]
