"""Lists of prompt pairs whose positions differ pair to pair: grouped, patched a group at a time.

Patched runs are batched along one tensor, so the pairs of a batch must have the same token
lengths and patch the same positions from the same positions. :func:`group_pairs` works out
each pair's positions (:mod:`.pair_positions`) and groups the pairs that agree; each group is
patched as one batch, and :func:`run_in_groups` puts the groups' rows back together: per pair
with ``per_prompt=True``, else averaged over every pair of the list, matching a position across
groups by its label (the name it was asked for by, or its token).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..core.errors import MisalignmentWarning, PromptError
from ..engine.metric_rows import metric_for_rows
from .alignment import misalignment_message
from .pair_positions import PairPositions, pair_items, pair_tokens, per_pair_aligns, resolve_pair

if TYPE_CHECKING:
    from ..core.model import AnyModel
    from .results import Result


@dataclass
class Grouping:
    """Pairs grouped by token lengths and patched positions (indices into the list of pairs)."""

    groups: list[list[int]]
    positions: list[PairPositions]
    misaligned: list[str] = field(default_factory=list)  # one message per pair whose positions shift

    def warn(self, stacklevel: int = 4) -> None:
        """One :class:`MisalignmentWarning` for the whole list, showing the first pair it concerns."""
        if self.misaligned:
            many = f"{len(self.misaligned)} of {len(self.positions)} prompt pairs: " if len(self.positions) > 1 else ""
            warnings.warn(many + self.misaligned[0], MisalignmentWarning, stacklevel=stacklevel)


def group_pairs(model: AnyModel, clean: Any, corrupt: Any, direction: str, align: Any, positions: Any) -> Grouping:
    items = pair_items(clean, corrupt)
    aligns = per_pair_aligns(align, len(items))
    groups: dict[tuple, list[int]] = {}
    resolved, misaligned = [], []
    for index, (clean_item, corrupt_item) in enumerate(items):
        tokens = pair_tokens(model, clean_item, corrupt_item)
        pair = resolve_pair(model, tokens, direction, aligns[index], positions)
        resolved.append(pair)
        groups.setdefault((len(tokens.clean), len(tokens.corrupt), pair.key), []).append(index)
        if pair.shifted:
            misaligned.append(
                misalignment_message(
                    model, tokens.clean_text, tokens.corrupt_text, tokens.clean, tokens.corrupt, list(pair.shifted)
                )
            )
    return Grouping(list(groups.values()), resolved, misaligned)


def _side(items: list[Any]) -> Any:
    """One side of a group as an experiment takes it: token-id rows stacked, anything else a list."""
    return torch.stack(items) if all(isinstance(i, torch.Tensor) for i in items) else items


def run_in_groups(
    experiment: Callable[..., Result],
    model: AnyModel,
    clean: Any,
    corrupt: Any,
    grouping: Grouping,
    *,
    metric: Any,
    align: Any,
    over: tuple[str, ...],
    per_prompt: bool,
    normalize: bool,
    value: str,
    **options: Any,
) -> Result:
    """``experiment`` (patch or attribute) on each group, its rows put back together."""
    from .patching import PatchResult, _normalized

    items = pair_items(clean, corrupt)
    aligns = per_pair_aligns(align, len(items))
    n = len(items)
    frames, parts = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MisalignmentWarning)  # given once, for the whole list
        for group in grouping.groups:
            part = experiment(
                model,
                _side([items[i][0] for i in group]),
                _side([items[i][1] for i in group]),
                metric=metric_for_rows(metric, torch.tensor(group), n),
                align=[aligns[i] for i in group],
                over=over,
                per_prompt=True,
                normalize=False,
                **options,
            )
            frame = part.frame.copy()
            frame["prompt"] = [group[p] for p in frame["prompt"]]
            frames.append(frame)
            parts.append(part)
    clean_values, corrupt_values = np.zeros(n), np.zeros(n)
    for group, part in zip(grouping.groups, parts):
        clean_values[group] = part.meta["clean_metric_per_prompt"]
        corrupt_values[group] = part.meta["corrupt_metric_per_prompt"]
    frame = pd.concat(frames, ignore_index=True)
    numeric = [c for c in ("metric", "estimate") if c in frame.columns]
    component = [c for c in ("layer", "head") if c in over]
    meta = dict(parts[0].meta)
    meta["over"] = list(over)
    if "verify" in meta:  # attribute(verify=k): each group was checked on its own components
        meta["verify"] = [part.meta["verify"] for part in parts]
    if per_prompt:
        frame = frame.sort_values([*component, "prompt"], kind="stable").reset_index(drop=True)
        if normalize:
            prompts = frame["prompt"].to_numpy()
            frame["normalized"] = _normalized(
                torch.tensor(frame["metric"].to_numpy())[:, None],
                torch.tensor(clean_values[prompts])[:, None],
                torch.tensor(corrupt_values[prompts])[:, None],
            ).numpy()[:, 0]
    else:
        by = component + (_position_key(frame, grouping, meta) if "pos" in over else [])
        first = {c: "first" for c in frame.columns if c not in (*by, *numeric, "prompt")}
        frame = frame.groupby(by, sort=False).agg({**first, **{c: "mean" for c in numeric}}).reset_index()
        if normalize:
            frame["normalized"] = _normalized(
                torch.tensor(frame["metric"].to_numpy())[:, None],
                torch.tensor(clean_values.mean()).reshape(1, 1),
                torch.tensor(corrupt_values.mean()).reshape(1, 1),
            ).numpy()[:, 0]
        frame = frame.drop(columns=[c for c in ("pos", "token") if c not in by and c in frame.columns])
    meta.update(
        n_prompts=n,
        clean_metric=float(clean_values.mean()),
        corrupt_metric=float(corrupt_values.mean()),
        clean_metric_per_prompt=clean_values.tolist(),
        corrupt_metric_per_prompt=corrupt_values.tolist(),
        groups=[
            {"prompts": group, "tokens": part.meta.get("tokens"), "align": part.meta.get("align")}
            for group, part in zip(grouping.groups, parts)
        ],
    )
    for counted in ("patches", "forwards", "components"):
        if counted in meta:
            meta[counted] = sum(part.meta[counted] for part in parts)
    return PatchResult(parts[0].experiment, frame, meta, value=value)


def _position_key(frame: pd.DataFrame, grouping: Grouping, meta: dict[str, Any]) -> list[str]:
    """Match positions across groups by index where every group patches the same ones, else by label."""
    targets = {grouping.positions[group[0]].target for group in grouping.groups}
    if len(targets) == 1 and all(
        grouping.positions[g[0]].labels == grouping.positions[0].labels for g in grouping.groups
    ):
        return ["pos"]
    labels = []
    for group in grouping.groups:  # the labels of one pair's positions, at one component
        rows = frame[frame["prompt"] == group[0]]
        for column in ("layer", "head"):
            if column in rows.columns:
                rows = rows[rows[column] == rows[column].iloc[0]]
        labels.append(tuple(rows["pos_label"]))
    if any(len(set(labelled)) != len(labelled) for labelled in labels) or len({frozenset(lab) for lab in labels}) > 1:
        raise PromptError(
            "the prompt pairs differ in token length or aligned positions, and their positions cannot be matched "
            f"across pairs by token (labels {[list(lab) for lab in labels[:2]]}): name the positions "
            "(positions=['END', ...] with pairs that define names), pass per_prompt=True for a row per pair, "
            "or leave 'pos' out of over"
        )
    meta["over"] = ["pos_label" if d == "pos" else d for d in meta["over"]]
    return ["pos_label"]


__all__ = ["Grouping", "group_pairs", "run_in_groups"]
