"""The checks a sweep makes of its arguments before any model loads or computes.

Each refuses bad input with a typed error naming it and saying what to give instead, so that a
sweep over many models fails at once rather than after the first model's chunks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import OutputPathError
from . import experiments as experiments_
from .experiments import Item, as_items
from .store import SweepConfigError

DATASETS = ("ioi", "factual")


def check_models(models: Sequence[str]) -> list[str]:
    if isinstance(models, str):
        models = [models]
    models = list(models)
    if not models:
        raise SweepConfigError("no models to sweep: give models=['zoo:gpt2', ...]")
    bad = [m for m in models if not isinstance(m, str)]
    if bad:
        raise SweepConfigError(
            f"models are given by source string (what al.load takes, or 'tiny:FAMILY'), not {type(bad[0]).__name__}: "
            "a sweep reloads them one at a time and records where each came from"
        )
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise SweepConfigError(f"models listed twice: {repeated}; list each once")
    return models


def check_roles(models: Sequence[str], options: dict[str, Any]) -> None:
    """Refuse, before any model computes, a ``role`` some model lacks (with ``over`` over heads,
    a chosen role without heads), naming every such model in one error. A list of roles means
    the first each model has. A model whose adapter cannot be found here is left to its load."""
    from ..core.roles import ALL_ROLES
    from ..engine.plan import HEADED_ROLES
    from ..loading import adapter_of_source

    role = options.get("role")
    if role is None:
        return
    candidates = [role] if isinstance(role, str) else list(role)
    unknown = [name for name in candidates if name not in ALL_ROLES]
    if unknown:
        raise SweepConfigError(f"role {unknown[0]!r} is not a role; roles are: {', '.join(ALL_ROLES)}")
    over = options.get("over", ())
    heads = "head" in ((over,) if isinstance(over, str) else tuple(over))
    problems = []
    for source in models:
        try:
            adapter = adapter_of_source(source)
        except Exception:  # reported as a SweepModelError when the sweep reaches this model
            continue
        chosen = next((name for name in candidates if name in adapter.roles), None)
        if chosen is None:
            problems.append(
                f"{source} (adapter {adapter.name!r} has none of {candidates}; it has {', '.join(adapter.role_names)})"
            )
        elif heads and chosen not in HEADED_ROLES:
            problems.append(f"{source} (its role {chosen!r} has no heads to sweep over)")
    if problems:
        given = repr(role if isinstance(role, str) else candidates)
        raise SweepConfigError(
            f"role={given} does not run on every model: " + "; ".join(problems) + ". Give a list of roles, the "
            "first of which each model has, e.g. role=['z', 'mixer_out'] (with over=('layer',) where one has no heads), "
            "or leave those models out"
        )


def check_out(out: str | Path, what: str = "the sweep") -> None:
    """Refuse an output directory that cannot be created or written, before any model loads
    (``what`` is written there, for the message)."""
    path = Path(out)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent  # the nearest part of the path that exists: where writing starts
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise OutputPathError(f"cannot write {what} to {path}: it {where}; choose a directory path for out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"cannot write {what} to {path}: {existing} is not writable; choose a directory you can write to"
        )


def explicit_items(
    spec: experiments_.ExperimentSpec, prompts: Any, dataset: str | None, n: int | None
) -> list[Item] | None:
    if (prompts is None) == (dataset is None):
        raise SweepConfigError("give either prompts=[...] or dataset='ioi' / 'factual', and not both")
    if dataset is not None:
        if dataset not in DATASETS:
            raise SweepConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise SweepConfigError(f"n must be a positive number of pairs, not {n!r}")
        return None
    items = as_items(prompts)
    if n is not None:
        items = items[:n]
    if spec.needs_pairs:
        lone = [item.clean for item in items if item.corrupt is None]
        if lone:
            raise SweepConfigError(
                f"{spec.name} compares clean and corrupt prompts, but {len(lone)} prompts have no corrupt partner "
                f"(first: {lone[0]!r}); give (clean, corrupt[, answer, distractor]) pairs or dataset='ioi'"
            )
    return items


__all__ = ["DATASETS", "check_models", "check_out", "check_roles", "explicit_items"]
