"""What the sweep runner knows about each experiment: where it lives and how it eats a chunk.

A sweep feeds an experiment *items*: a prompt, or a clean/corrupt pair with its answer and
distractor. Every row of the sweep belongs to one prompt (the ``prompt`` column): prompts of
different token lengths never share a batch, positions keep their meaning within each prompt,
and :func:`anylens.sweep.aggregate` can report the spread over prompts, not only a mean.
Experiments that batch across prompts (patching, ablation, attribution) are called once per group
of a chunk's items that may share a batch (:func:`batch_key`), with ``per_prompt=True``, and
their rows are split back per prompt; the others are called once per item.

A metric given by name (``metric="logit_diff"``) is built per item from its answer and
distractor, which is how one sweep runs over a dataset whose answers differ prompt to prompt.
Mean and resample ablation take their reference batch from the sweep's other prompts of the
same token length (see :func:`_prepare_ablate`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..core.errors import MetricError
from ..experiments import metrics
from ..experiments.pair_positions import asks_by_name
from ..experiments.renamed import canonical
from .store import SweepConfigError

if TYPE_CHECKING:
    from ..core.model import AnyModel
    from ..experiments.results import Result


# -- items --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One prompt, or one clean/corrupt pair, with the words a metric may need."""

    clean: str
    corrupt: str | None = None
    answer: str | None = None
    distractor: str | None = None
    #: Any other fields of the pair (template, relation, ...), recorded for the prompt hash.
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    #: The pair's named positions (name -> (clean position, corrupt position)), which the
    #: experiment resolves ``positions=["S2", ...]`` with; worked out from the texts, so not hashed.
    positions: dict[str, Any] | None = field(default=None, compare=False)

    def record(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "corrupt": self.corrupt,
            "answer": self.answer,
            "distractor": self.distractor,
            **self.extra,
        }


def as_item(value: Any) -> Item:
    """A prompt string, a ``(clean, corrupt[, answer[, distractor]])`` tuple, a dict, or a pair
    object such as :class:`anylens.datasets.IOIPair` / :class:`~anylens.datasets.FactPair`."""
    if isinstance(value, Item):
        return value
    if isinstance(value, str):
        return Item(value)
    if isinstance(value, (tuple, list)):
        if not 1 <= len(value) <= 4 or not all(isinstance(v, str) or v is None for v in value):
            raise SweepConfigError(
                f"a pair given as a tuple is (clean, corrupt[, answer[, distractor]]) strings, not {value!r}"
            )
        return Item(*value)
    if isinstance(value, dict):
        fields = dict(value)
    elif dataclasses.is_dataclass(value):
        fields = dataclasses.asdict(value)
    elif hasattr(value, "clean"):
        fields = dict(vars(value))
    else:
        raise SweepConfigError(
            f"cannot use {value!r} as a prompt: give strings, (clean, corrupt) tuples or pairs with .clean/.corrupt"
        )
    positions = fields.pop("positions", None) or None
    clean = fields.pop("clean", None) or fields.pop("prompt", None)
    if not isinstance(clean, str):
        raise SweepConfigError(f"a pair needs a 'clean' prompt string; got fields {sorted(fields)}")
    corrupt = fields.pop("corrupt", None)
    answer = fields.pop("answer", None)
    # IOI pairs name the competing word 'distractor'; factual pairs only have the corrupt answer.
    distractor = fields.pop("distractor", None) or fields.get("corrupt_answer")
    extra = {k: v if isinstance(v, (str, int, float, bool)) or v is None else repr(v) for k, v in fields.items()}
    return Item(clean, corrupt, answer, distractor, extra, positions)


def as_items(prompts: Sequence[Any]) -> list[Item]:
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    items = [as_item(p) for p in prompts]
    if not items:
        raise SweepConfigError("no prompts to sweep: give prompts=[...] or dataset='ioi' / 'factual'")
    return items


# -- metrics named per item -----------------------------------------------------------------------
#: metric name -> the item fields it is built from (the table lives with the metrics)
METRIC_FIELDS = metrics.NAMED


def item_metric(value: Any, item: Item | Sequence[Item], words: bool = False) -> Any:
    """``value`` itself, or for a metric name the metric built from this item's words (from
    several items': one word per item where they differ).

    With ``words`` (an experiment that takes target words as its metric), a string that is not
    a metric name is a target word and passes unchanged.
    """
    if not isinstance(value, str) or (words and value not in METRIC_FIELDS):
        return value
    try:
        return metrics.named(value, item)
    except MetricError as error:
        # A sweep's arguments are refused as one kind of error, whatever part of them is wrong.
        raise SweepConfigError(str(error)) from None


def check_metric(value: Any, items: Sequence[Item], words: bool = False) -> None:
    """Refuse a metric by name that some item cannot build, before any model is loaded."""
    if isinstance(value, str):
        for item in items:
            item_metric(value, item, words)


def item_words(item: Item) -> Any:
    """The item's answer and distractor as target words: a pair, one word, or None."""
    words = [w for w in (item.answer, item.distractor) if w is not None]
    return tuple(words) if len(words) == 2 else words[0] if words else None


# -- calling an experiment on items ---------------------------------------------------------------
@dataclass
class ChunkOutput:
    """The tidy rows of a chunk (``prompt`` = index within the chunk) and each call's meta."""

    frame: pd.DataFrame
    metas: list[dict[str, Any]]


# -- ablation: mean and resample need a reference batch ---------------------------------------
#: Ablation methods whose replacement activations come from other prompts.
_REFERENCED = ("mean", "resample")


def _token_length(model: AnyModel, prompt: str) -> int:
    return len(model.tokenizer(prompt)["input_ids"])  # as the experiments tokenize one prompt


def _prepare_ablate(model: AnyModel, items: Sequence[Item], options: dict[str, Any]) -> dict[int, list[str]] | None:
    """Group the model's prompts by token length: the reference batch of each prompt.

    Called one prompt at a time, ``ablate`` would take the mean over that prompt alone (a no-op)
    and could not resample at all. Without an explicit ``reference``, each prompt's reference is
    every prompt of the sweep with its token length (for ``resample``, the others), which does
    not depend on how the prompts are chunked. Prompts left without one are refused up front.
    """
    if options.get("method", "zero") not in _REFERENCED or "reference" in options:
        return None
    groups: dict[int, list[str]] = {}
    for item in items:
        groups.setdefault(_token_length(model, item.clean), []).append(item.clean)
    alone = [group[0] for group in groups.values() if len(set(group)) < 2]
    if alone:
        raise SweepConfigError(
            f"ablate with method={options['method']!r} takes its replacement activations from the sweep's other prompts "
            f"of the same token length, and {len(alone)} prompts have none (first: {alone[0]!r}, "
            f"{_token_length(model, alone[0])} tokens): add prompts of those lengths, or pass reference=[...] prompts "
            "of one token length"
        )
    return groups


def _ablate_reference(model: AnyModel, item: Item, options: dict[str, Any], groups: Any) -> dict[str, Any]:
    """The reference batch of ``item`` from :func:`_prepare_ablate`'s groups."""
    if groups is None:
        return {}
    group = groups[_token_length(model, item.clean)]
    return {"reference": group if options.get("method") == "mean" else [p for p in group if p != item.clean]}


def _not_resampled(options: dict[str, Any]) -> bool:
    # Resampling draws each prompt's source with a seeded generator: one draw per call, so a
    # batch of prompts would draw other sources than the same prompts one at a time.
    return options.get("method", "zero") != "resample"


def batch_key(model: AnyModel, item: Item, options: dict[str, Any]) -> tuple[Any, ...]:
    """Items of a chunk with equal keys are computed in one call: the token lengths of their
    clean and corrupt prompts (a batch holds prompts of one length, positions matched up)."""
    corrupt = None if item.corrupt is None else _token_length(model, item.corrupt)
    return (_token_length(model, item.clean), corrupt)


@dataclass(frozen=True)
class ExperimentSpec:
    """An experiment as the sweep sees it.

    Every experiment is called the same way: ``fn(model, clean, **options)``, or
    ``fn(model, clean, corrupt, **options)`` for pairs, where a metric given by name is built
    from the item's words.
    """

    name: str
    module: str
    attribute: str
    #: True when each item must be a clean/corrupt pair (patching, attribution).
    needs_pairs: bool = False
    #: The experiment's ``metric`` takes target words (logit lens, DLA): other strings than metric
    #: names are words, and without a metric the item's answer (and distractor) are used.
    metric_words: bool = False
    #: ``metric_words`` and no item words: True refuses the item, False runs without a metric.
    metric_required: bool = False
    #: Computes, once per model from all its items, what each call needs beyond its item ...
    prepare: Callable[[AnyModel, Sequence[Item], dict[str, Any]], Any] | None = None
    #: ... and turns that into the options of one item's call.
    per_item: Callable[[AnyModel, Item, dict[str, Any], Any], dict[str, Any]] | None = None
    #: The experiment takes a list of prompts and keeps a row per prompt with ``per_prompt=True``
    #: (a ``prompt`` column), giving each prompt the rows it gives that prompt alone. Items that
    #: share a :func:`batch_key` (and their per-item options) are then computed in one call ...
    batches: bool = False
    #: ... unless these options rule it out.
    batches_with: Callable[[dict[str, Any]], bool] | None = None

    def function(self) -> Callable[..., Any]:
        # Looked up on every use, so that a monkeypatched experiment is the one that runs.
        return getattr(importlib.import_module(self.module), self.attribute)

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse options the experiment does not take, before any model is loaded; warn about
        old names of options (they keep working for one release)."""
        try:
            function = self.function()
            parameters = inspect.signature(function).parameters
        except (ImportError, AttributeError) as error:
            raise SweepConfigError(f"experiment {self.name!r} is not available: {error}") from None
        old_names = getattr(function, "__renamed__", {})
        for old in sorted(set(options) & set(old_names)):
            warnings.warn(
                f"{self.name} option {old!r} is now {old_names[old]!r}; the old name stops working in the next release",
                FutureWarning,
                stacklevel=3,
            )
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        keywords = {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        accepted = keywords | set(old_names)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise SweepConfigError(
                f"{self.name} does not take {', '.join(map(repr, unknown))}; its options are: {', '.join(sorted(keywords))}"
            )

    def check_metric(self, options: dict[str, Any], items: Sequence[Item]) -> None:
        """Refuse a metric by name that some item cannot build, before any model is loaded."""
        check_metric(canonical(self.function(), options).get("metric"), items, self.metric_words)

    def context(self, model: AnyModel, items: Sequence[Item], options: dict[str, Any]) -> Any:
        """What every call on this model needs from all of its items (see ``prepare``)."""
        return None if self.prepare is None else self.prepare(model, items, options)

    def call(
        self, function: Callable[..., Any], model: AnyModel, item: Item, options: dict[str, Any], context: Any
    ) -> Result:
        """The experiment on one item."""
        own = self.item_options(function, model, item, options, context)
        return function(model, *self.inputs([item], own, single=True), **own)

    def inputs(self, items: Sequence[Item], options: dict[str, Any], single: bool = False) -> tuple[Any, ...]:
        """The prompt arguments of a call on ``items``: texts, or where positions are asked for by
        name, each item with its names (``{"clean", "corrupt", "positions"}`` on both sides)."""
        named = asks_by_name(options.get("positions"))

        def side(item: Item, text: str | None) -> Any:
            if named and item.positions:
                return {"clean": item.clean, "corrupt": item.corrupt, "positions": item.positions}
            return text

        clean = [side(item, item.clean) for item in items]
        corrupt = [side(item, item.corrupt) for item in items]
        if single:
            clean, corrupt = clean[0], corrupt[0]
        return (clean, corrupt) if self.needs_pairs else (clean,)

    def item_options(
        self, function: Callable[..., Any], model: AnyModel, item: Item, options: dict[str, Any], context: Any
    ) -> dict[str, Any]:
        """The options of the call on ``item``: a metric by name built from its words, and what
        ``per_item`` adds."""
        if self.needs_pairs and item.corrupt is None:
            raise SweepConfigError(
                f"{self.name} compares a clean and a corrupt prompt; {item.clean!r} has no corrupt prompt"
            )
        options = canonical(function, options)
        if "metric" in options:
            options["metric"] = item_metric(options["metric"], item, self.metric_words)
        elif self.metric_words and item.answer is not None:
            # Over a dataset the interesting targets are each prompt's own answer (and distractor).
            options["metric"] = item_words(item)
        elif self.metric_required:
            raise SweepConfigError(
                f"{self.name} needs a target: pass metric='logit_diff' or a word, or sweep pairs with answers "
                f"(prompt {item.clean!r} has none)"
            )
        if self.per_item is not None:
            options.update(self.per_item(model, item, options, context))
        return options

    def groups(self, model: AnyModel, items: Sequence[Item], options: dict[str, Any]) -> list[list[int]]:
        """The items (indices) computed together, in the order of their first item."""
        if not self.batches or (self.batches_with is not None and not self.batches_with(options)):
            return [[index] for index in range(len(items))]
        groups: dict[Any, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(batch_key(model, item, options), []).append(index)
        return list(groups.values())

    def run_chunk(
        self, model: AnyModel, items: Sequence[Item], options: dict[str, Any], context: Any = None
    ) -> ChunkOutput:
        function = self.function()
        frames: list[pd.DataFrame] = []
        metas: list[dict[str, Any]] = [{} for _ in items]
        for group in self.groups(model, items, options):
            if not self.batches:
                (index,) = group
                result = self.call(function, model, items[index], options, context)
                frames.append(tidy(result, index, items[index]))
                metas[index] = dict(result.meta)
                continue
            own = {index: self.item_options(function, model, items[index], options, context) for index in group}
            for part in self._shared_options(group, own):
                frames.append(self._run_group(function, model, items, part, options, own, metas))
        frame = pd.concat(frames, ignore_index=True)
        # Prompt by prompt, each prompt's rows in the order its own call gives them.
        frame = frame.sort_values("prompt", kind="stable", ignore_index=True)
        return ChunkOutput(frame, metas)

    @staticmethod
    def _shared_options(group: list[int], own: dict[int, dict[str, Any]]) -> list[list[int]]:
        """``group`` split where per-item options (``own``) other than the metric differ (an
        ablation's reference batch): only prompts that would be called alike share a call."""
        parts: dict[str, list[int]] = {}
        for index in group:
            alike = {name: value for name, value in own[index].items() if name != "metric"}
            parts.setdefault(repr(sorted(alike.items())), []).append(index)
        return list(parts.values())

    def _run_group(
        self,
        function: Callable[..., Any],
        model: AnyModel,
        items: Sequence[Item],
        group: list[int],
        options: dict[str, Any],
        own: dict[int, dict[str, Any]],
        metas: list[dict[str, Any]],
    ) -> pd.DataFrame:
        """One call on the items of ``group`` (``own``: each item's options); fills their metas and
        returns their tidy rows."""
        chosen = [items[index] for index in group]
        call_options = dict(own[group[0]])
        if isinstance(options.get("metric"), str):  # a metric by name: one word per pair
            call_options["metric"] = item_metric(canonical(function, options)["metric"], chosen)
        call_options["per_prompt"] = True
        result = function(model, *self.inputs(chosen, call_options), **call_options)
        for position, index in enumerate(group):
            metas[index] = pair_meta(model, result.meta, position, len(group), items[index], own[index].get("metric"))
        return tidy(result, group, chosen)


def pair_meta(
    model: AnyModel, meta: dict[str, Any], position: int, n_prompts: int, item: Item, metric: Any
) -> dict[str, Any]:
    """The meta of one prompt of a call on ``n_prompts``: what the call gives that prompt alone,
    except for the call's counts (``patches``, ``forwards``, ...), which ``call_prompts`` qualifies."""
    own = dict(meta, n_prompts=1, call_prompts=n_prompts)
    for key, value in meta.items():
        if key.endswith("_per_prompt") and isinstance(value, list) and len(value) == n_prompts:
            own[key] = [value[position]]
            own[key.removesuffix("_per_prompt")] = float(value[position])  # the mean over one prompt
    tokens: dict[str, list[str]] = {}

    def tokens_of(text: str) -> list[str]:
        if text not in tokens:
            tokens[text] = model.to_str_tokens(model.tokenizer(text, return_tensors="pt")["input_ids"][0])
        return tokens[text]

    sides = {"clean_tokens": item.clean, "corrupt_tokens": item.corrupt}
    for key, text in sides.items():
        if key in meta and text is not None:
            own[key] = tokens_of(text)
    if "tokens" in meta:  # the tokens of the run the rows' positions belong to
        patched = item.corrupt if meta.get("direction") == "denoise" and item.corrupt is not None else item.clean
        own["tokens"] = tokens_of(patched)
    if "metric_spec" in meta and metric is not None:
        own["metric_spec"] = repr(metric)
    return own


def tidy(result: Result, prompt: int | Sequence[int], item: Item | Sequence[Item]) -> pd.DataFrame:
    """One call's frame with the sweep's columns: ``prompt``, ``value``, ``pos_from_end``, ``target_role``.

    A call on one item gives its index and item; a call on several (``per_prompt=True``, whose
    frame's ``prompt`` column counts the call's prompts) gives their indices and items.
    """
    frame = result.to_frame().drop(columns=["model"], errors="ignore")
    if isinstance(prompt, int):
        # One prompt per call: an experiment's own prompt index is always 0 here, the sweep's is global.
        local = np.zeros(len(frame), dtype=np.int64)
        prompt, item = [prompt], [item]
        frame = frame.drop(columns=["prompt"], errors="ignore")
    else:
        local = frame.pop("prompt").to_numpy()
    frame.insert(0, "prompt", np.asarray(prompt, dtype=np.int64)[local])
    if isinstance(result.meta.get("role"), str) and "role" not in frame.columns:
        frame["role"] = result.meta["role"]  # which role this model used, where role= was a list
    if result.value != "value" and result.value in frame.columns:
        frame["value"] = frame[result.value]
    tokens = result.meta.get("tokens")
    if "pos" in frame.columns and isinstance(tokens, list):
        # Prompts differ in length; the distance from the end lines up their last tokens.
        frame["pos_from_end"] = frame["pos"] - len(tokens)  # one length per call
    if "target" in frame.columns and any(i.answer is not None for i in item):
        roles = [{i.answer: "answer", i.distractor: "distractor"} if i.answer is not None else {} for i in item]
        frame["target_role"] = [roles[p].get(t, "other") for p, t in zip(local, frame["target"])]
    return frame


EXPERIMENTS: dict[str, ExperimentSpec] = {
    spec.name: spec
    for spec in (
        ExperimentSpec("logit_lens", "anylens.experiments.logit_lens", "logit_lens", metric_words=True),
        ExperimentSpec("patch", "anylens.experiments.patching", "patch", needs_pairs=True, batches=True),
        ExperimentSpec("attribute", "anylens.experiments.attribution", "attribute", needs_pairs=True, batches=True),
        ExperimentSpec(
            "ablate",
            "anylens.experiments.ablation",
            "ablate",
            prepare=_prepare_ablate,
            per_item=_ablate_reference,
            batches=True,
            batches_with=_not_resampled,
        ),
        ExperimentSpec("attention_patterns", "anylens.experiments.patterns", "attention_patterns"),
        ExperimentSpec("head_scores", "anylens.experiments.patterns", "head_scores"),
        ExperimentSpec(
            "dla",
            "anylens.experiments.dla",
            "direct_logit_attribution",
            metric_words=True,
            metric_required=True,
        ),
    )
}
ALIASES = {
    "direct_logit_attribution": "dla",
    "logit-lens": "logit_lens",
    "attention-patterns": "attention_patterns",
    "head-scores": "head_scores",
}


def experiment(name: str) -> ExperimentSpec:
    spec = EXPERIMENTS.get(ALIASES.get(name, name))
    if spec is None:
        raise SweepConfigError(f"unknown experiment {name!r}; a sweep runs one of: {', '.join(EXPERIMENTS)}")
    return spec


__all__ = [
    "EXPERIMENTS",
    "ChunkOutput",
    "ExperimentSpec",
    "Item",
    "as_item",
    "as_items",
    "batch_key",
    "check_metric",
    "experiment",
    "item_metric",
    "item_words",
    "pair_meta",
    "tidy",
]
