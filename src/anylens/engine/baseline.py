"""Recording the runs a sweep patches from and into: activations of a role, final-position
logits, and for reuse the unpatched run's block outputs, block prefixes and key/value cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.access import envoy_at
from .block_prefix import per_position_width, prefix_width
from .blocks import (
    block_envoys,
    block_of,
    block_prefixes,
    cache_name,
    kv_cache_reusable,
    residual_of,
    skippable_blocks,
    with_residual,
)
from .final_position import cut_to_final_position, last_logits, last_logits_kwargs, last_mlp, read_last
from .memory import Sizes

if TYPE_CHECKING:
    from ..core.model import AnyModel


def record(
    model: AnyModel,
    role: str,
    ids: torch.Tensor,
    layers: Sequence[int],
    rows_per_forward: int | None = None,
    last_only: bool = False,
    columns: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Activations of ``role`` at ``layers`` and the final-position logits, no-grad.

    ``rows_per_forward`` inputs per trace (all at once by default), so that recording many
    prompts stays within the memory a sweep's forwards are sized to; ``last_only`` asks the
    model for final-position logits only (and runs the last MLP on that position alone), of
    which ``columns`` computes only those (:mod:`.final_position`).
    """
    access = model.role(role)
    step = rows_per_forward or max(ids.shape[0], 1)
    kwargs = last_logits_kwargs(model) if last_only else {}
    mlp_cut = last_mlp(model, role, layers) if last_only else None
    columns = columns if last_only else None
    rows = RowFill(ids.shape[0])
    for start in range(0, ids.shape[0], step):
        saved: dict[int, torch.Tensor] = {}
        with torch.no_grad(), model.trace(ids[start : start + step].to(model.device), **kwargs):
            for layer in sorted(layers):
                saved[layer] = access.read(layer).clone().save()
            cut_to_final_position(model, mlp_cut)
            last = read_last(model, columns)
        for layer, value in saved.items():
            rows.put(layer, start, value)
        with torch.no_grad():
            rows.put("last", start, last_logits(model, last, columns))
    return {layer: rows[layer] for layer in layers}, rows["last"]


class RowFill:
    """Tensors of ``n`` rows filled a batch of rows at a time, never holding the batches twice."""

    def __init__(self, n: int):
        self.n = n
        self.tensors: dict[Any, torch.Tensor] = {}

    def put(self, key: Any, start: int, value: torch.Tensor) -> None:
        if start == 0 and value.shape[0] == self.n:
            self.tensors[key] = value  # one batch: nothing to copy
            return
        if key not in self.tensors:
            self.tensors[key] = value.new_empty((self.n, *value.shape[1:]))
        self.tensors[key][start : start + value.shape[0]] = value

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self.tensors[key]


@dataclass
class Baseline:
    """The unpatched run of a plan's inputs.

    ``last`` is its final-position logits; ``acts[layer]`` the role's activations (to tell which
    writes change anything), ``blocks[i]`` the output of block ``i`` (to skip the block) and
    ``prefix[b]`` the outputs of block ``b``'s modules before the role, by path (to skip them in
    a batch that starts at ``b``).
    """

    last: torch.Tensor
    acts: dict[int, torch.Tensor] | None = None
    blocks: list[Any] | None = None
    cache: Any = None  # the key/value cache of every position, where reusable
    prefix: dict[int, dict[str, Any]] | None = None

    def nbytes(self) -> int:
        tensors = list((self.acts or {}).values()) + [residual_of(b) for b in self.blocks or []]
        tensors += [residual_of(out) for outputs in (self.prefix or {}).values() for out in outputs.values()]
        for layer in getattr(self.cache, "layers", []):
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors) + self.last.numel() * self.last.element_size()


def record_baseline(
    model: AnyModel,
    role: str,
    ids: torch.Tensor,
    layers: list[int],
    n_blocks: int = 0,
    rows_per_forward: int | None = None,
    last_only: bool = True,
    columns: torch.Tensor | None = None,
) -> Baseline:
    """Record the unpatched run of ``ids``: final logits, ``role`` at ``layers`` and the outputs
    of the first ``n_blocks`` blocks, ``rows_per_forward`` inputs at a time; with block outputs,
    also its key/value cache where that is reusable and one forward covers every input.

    Blocks whose output is not a residual tensor (or a tuple led by one, with no other tensors)
    cannot be handed back by a skip, so then no block outputs are kept (``blocks`` is None).
    With block outputs, the outputs of the modules before the role in each block a batch may
    start at are kept too (:func:`.blocks.block_prefixes`).
    ``columns`` are the only final-position logits to compute (:mod:`.final_position`).
    """
    access = model.role(role)
    blocks = block_envoys(model)
    prefixes = block_prefixes(model, role, layers, n_blocks) if n_blocks else {}
    # Reads follow the forward: in block k, the modules before the role, the role, the block's output.
    reads: list[tuple[int, int, str, Any]] = [
        ((block_of(model, role, layer) or 0), 0, "act", layer) for layer in layers
    ]
    reads += [(index, 1, "block", index) for index in range(n_blocks)]
    reads += [(b, -1, "prefix", (k, path)) for b, paths in prefixes.items() for k, path in enumerate(paths)]
    reads.sort()
    step = rows_per_forward or ids.shape[0]
    cache = _empty_cache(model) if n_blocks and step >= ids.shape[0] and kv_cache_reusable(model, ids) else None
    rows = RowFill(ids.shape[0])
    mlp_cut = last_mlp(model, role, layers) if last_only else None
    columns = columns if last_only else None
    structures: list[Any] = []  # each block's output as the first batch returned it
    prefix_structures: dict[str, Any] = {}  # the same for the modules before the role
    for start in range(0, ids.shape[0], step):
        acts: dict[int, torch.Tensor] = {}
        outputs: list[Any] = []
        before: dict[str, Any] = {}
        kwargs = last_logits_kwargs(model) if last_only else {}
        if cache is not None:
            kwargs.update({cache_name(model): cache, "use_cache": True})
        with torch.no_grad(), model.trace(ids[start : start + step].to(model.device), **kwargs):
            for _, _, kind, index in reads:
                if kind == "act":
                    acts[index] = access.read(index).clone().save()
                elif kind == "block":
                    outputs.append(_clone(blocks[index].output).save())
                else:
                    before[index[1]] = _clone(envoy_at(model, index[1]).output).save()
            cut_to_final_position(model, mlp_cut)
            last = read_last(model, columns)
        with torch.no_grad():
            last = last_logits(model, last, columns)
        for layer, value in acts.items():
            rows.put(("act", layer), start, value)
        rows.put("last", start, last)
        if start == 0:
            structures = outputs
        for index, output in enumerate(outputs):
            if structures is not None and per_position_width(output, last.shape[0], ids.shape[1]):
                rows.put(("block", index), start, residual_of(output))
            else:
                structures = None
        if start == 0:
            prefix_structures = dict(before)
        for path, output in before.items():
            if path in prefix_structures and per_position_width(output, last.shape[0], ids.shape[1]):
                rows.put(("prefix", path), start, residual_of(output))
            else:
                prefix_structures.pop(path, None)
    acts_out = {layer: rows[("act", layer)] for layer in layers} if layers else None
    kept, prefix = None, None
    if n_blocks and structures is not None:
        kept = [with_residual(structure, rows[("block", i)]) for i, structure in enumerate(structures)]
        prefix = _kept_prefixes(prefixes, prefix_structures, rows)
    return Baseline(rows["last"], acts_out, kept, cache, prefix)


def _kept_prefixes(prefixes: dict[int, tuple[str, ...]], structures: dict[str, Any], rows: RowFill) -> dict:
    """Per block, its prefix modules' outputs by path, in the order they run; a block loses its
    prefix if any of its modules' outputs could not be kept (a skip must hand back all of them)."""
    kept = {}
    for block, paths in prefixes.items():
        if all(path in structures for path in paths):
            kept[block] = {path: with_residual(structures[path], rows[("prefix", path)]) for path in paths}
    return kept


def _empty_cache(model: AnyModel) -> Any:
    """A cache for the model to fill, laid out from its config as the model would lay out its own."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=model.config)


def record_for_plan(
    model: AnyModel,
    role: str,
    ids: torch.Tensor,
    layers: list[int],
    sources: dict[int, torch.Tensor],
    memory_budget: int | None = None,
    need_acts: bool = False,
    columns: torch.Tensor | None = None,
) -> Baseline:
    """The unpatched run of ``ids`` for a plan over ``layers``.

    With the role and block outputs reuse needs if they fit half the budget left by ``sources``;
    else the final logits only (the plan then records the rest group by group), or the role
    without block outputs when the caller ``need_acts``. ``columns``: the logits to compute.
    """
    layers = sorted(layers)
    n_blocks = skippable_blocks(model, role, layers)
    width = prefix_width(model, block_prefixes(model, role, layers, n_blocks))
    sizes = Sizes.of(model, role, n_blocks, ids.shape[1], sources, memory_budget, ids.shape[0], width)
    rows = sizes.rows_for(sizes.free // 2)
    if sizes.inputs_per_group(ids.shape[0]) == ids.shape[0]:
        return record_baseline(model, role, ids, layers, n_blocks, rows, columns=columns)
    return record_baseline(model, role, ids, layers if need_acts else [], 0, rows, columns=columns)


def record_pair(
    model: AnyModel,
    role: str,
    source_ids: torch.Tensor,
    ids: torch.Tensor,
    layers: list[int],
    columns: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor, Baseline]:
    """The source run (``role`` at ``layers`` and final logits) and the unpatched run of ``ids``
    (as :func:`record_baseline` records it), in one forward over both runs' rows: for short runs,
    where reading the weights sets the pace (:func:`.scheduling.one_forward`)."""
    layers = sorted(layers)
    n = source_ids.shape[0]
    both = record_baseline(
        model, role, torch.cat([source_ids, ids]), layers, skippable_blocks(model, role, layers), columns=columns
    )
    sources = {layer: act[:n] for layer, act in both.acts.items()}
    blocks, prefix = None, None
    if both.blocks is not None:  # copies: a view would keep the source rows alive
        blocks = [_patched_rows(block, n) for block in both.blocks]
        prefix = {b: {path: _patched_rows(out, n) for path, out in outs.items()} for b, outs in both.prefix.items()}
    if both.cache is not None:
        both.cache.batch_select_indices(torch.arange(n, 2 * n, device=model.device))
    acts = {layer: act[n:] for layer, act in both.acts.items()}
    baseline = Baseline(both.last[n:], acts, blocks, both.cache, prefix)
    return sources, both.last[:n], baseline


def _patched_rows(output: Any, n: int) -> Any:
    """A recorded output of both runs cut to the patched run's rows (after the first ``n``), copied."""
    return with_residual(output, residual_of(output)[n:].clone())


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


__all__ = ["Baseline", "RowFill", "record", "record_baseline", "record_for_plan", "record_pair"]
