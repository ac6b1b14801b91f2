"""The shortcut forward of reuse: a batch of patched rows run without the work their patches
cannot change (the blocks before each row's first patched block, the positions before the
batch's first changed position, the modules of its first block before the role).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from ..core.access import envoy_at
from .baseline import Baseline
from .blocks import block_envoys, block_of, cache_name, residual_of, returned_cache
from .final_position import cut_to_final_position, last_logits_kwargs, read_unembedding_input
from .plan import PatchPlan, writes_by_layer
from .scheduling import RowBatch

if TYPE_CHECKING:
    from ..core.model import AnyModel


class PrefixCaches:
    """The unpatched run's key/value cache of positions ``..p0``, expanded over a batch's rows.

    Cut from the cache of every position when the unpatched run kept one that still holds every
    position (a sliding window may have dropped some); otherwise the positions before ``p0`` are
    run once per ``p0`` (one ``p0`` kept at a time).
    """

    def __init__(self, model: AnyModel, ids: torch.Tensor, full: Any = None):
        self.model, self.ids = model, ids
        length = ids.shape[1]
        complete = full is not None and all(layer.keys.shape[-2] == length for layer in full.layers)
        self.full = full if complete else None
        self._pos, self._cache = -1, None

    def expanded(self, p0: int, inputs: torch.Tensor) -> Any:
        inputs = inputs.to(self.model.device)
        if self.full is not None:
            cache = copy.copy(self.full)  # new layer objects sharing the tensors, then cut: no copies
            cache.layers = [copy.copy(layer) for layer in self.full.layers]
            cache.crop(p0 - self.ids.shape[1])
        else:
            if p0 != self._pos:
                self._cache = None  # free the previous one first
                with torch.no_grad():
                    ids = self.ids[:, :p0].to(self.model.device)
                    output = self.model.hf(input_ids=ids, use_cache=True, **last_logits_kwargs(self.model))
                self._pos, self._cache = p0, returned_cache(output)
            cache = copy.copy(self._cache)
            cache.layers = [copy.copy(layer) for layer in self._cache.layers]
        cache.reorder_cache(inputs)  # one copy of each input's row per patched row (new tensors)
        return cache


def _cut(block_output: Any, inputs: torch.Tensor, p0: int) -> Any:
    """A block's unpatched output for the given input rows, from position ``p0``."""
    residual = residual_of(block_output)
    cut = residual[inputs.to(residual.device), p0:]
    if isinstance(block_output, (tuple, list)):
        return type(block_output)((cut, *block_output[1:]))
    return cut


def shortcut_forward(
    model: AnyModel,
    plan: PatchPlan,
    rows: torch.Tensor,
    batch: RowBatch,
    baseline: Baseline,
    caches: PrefixCaches | None,
    input_offset: int,
    patched: bool = True,
    mlp_cut: str | None = None,
    prefix: bool = True,
) -> torch.Tensor:
    """The unembedding's final-position input for ``rows``, skipping the batch's blocks and
    positions, and with ``prefix`` the modules of its first block before the role.

    Where the batch carries ``starts``, each row joins the forward at its own first block: the
    batch grows block by block, a joining row entering with the unpatched run's output of the
    block before, so no row runs a block its patch cannot change (rows are sorted by start). The
    blocks' other per-row inputs (an attention mask) and the key/value cache are cut to the rows
    present at each block.

    The unembedding itself is skipped too: a sweep applies it to many batches' rows at once
    (:func:`.final_position.final_logits`), reading its weights once rather than once per
    forward. ``patched=False`` runs the rows' inputs with the same shortcuts but without their
    patches: the guard forward, whose logits must be the unpatched run's. ``mlp_cut`` is the last
    MLP to run on the final position only (:mod:`.final_position`).
    """
    device = model.device
    p0, b0 = batch.pos, batch.block
    inputs = plan.input_rows[rows] - input_offset
    starts = batch.starts if batch.starts is not None else torch.full((len(rows),), b0)
    n_all = len(model.module(model.adapter.layers))
    present = [int((starts <= max(k, b0)).sum()) for k in range(n_all)]  # rows in the batch at block k
    total = len(inputs)
    ids = plan.inputs[inputs + input_offset].to(device)
    inputs = inputs.to(device)  # once: it indexes the recorded outputs on the device at every block
    kwargs: dict[str, Any] = dict(last_logits_kwargs(model))
    if p0 > 0:
        cache = caches.expanded(p0, inputs)
        for k, layer in enumerate(cache.layers):
            if present[k] < total:
                layer.keys, layer.values = layer.keys[: present[k]], layer.values[: present[k]]
        kwargs[cache_name(model)] = cache
        kwargs["use_cache"] = True
        data: Any = {"input_ids": ids[:, p0:], "attention_mask": torch.ones_like(ids)}  # the mask covers the cache
    else:
        data = ids
    writes = writes_by_layer(plan, rows, device, start=p0) if patched else {}
    owners = {layer: block_of(model, plan.role, layer) for layer in writes}
    if present[b0] < total and None in owners.values():  # a growing forward writes block by block
        raise AssertionError(f"role {plan.role!r} is written outside the blocks: a batch of it cannot grow")
    access = model.role(plan.role)
    envoys = block_envoys(model)
    before = (baseline.prefix or {}).get(b0, {}) if prefix else {}

    def write(layer: int) -> None:
        target = access.read(layer)
        for target_index, source_index in writes[layer]:
            target[target_index] = plan.sources[layer][source_index].to(target.dtype)

    with torch.no_grad(), model.trace(data, **kwargs):
        for index in range(b0):
            envoys[index].skip(_cut(baseline.blocks[index], inputs[: present[b0]], p0))
        # Interventions follow the forward: per block its input, the modules before the role, the writes.
        for k in range(b0, n_all) if present[b0] < total else ():
            joining = None
            if k > b0 and present[k] > present[k - 1]:
                previous = residual_of(baseline.blocks[k - 1])
                joining = previous[inputs[present[k - 1] : present[k]].to(previous.device), p0:]
            if present[k] < total or joining is not None:
                envoys[k].inputs = _present_rows(envoys[k].inputs, present[k], total, joining)
            if k == b0:
                _skip_prefix(model, before, inputs[: present[b0]], p0, mlp_cut)
            for layer in sorted(layer for layer in writes if owners[layer] == k):
                write(layer)
        if present[b0] == total:
            _skip_prefix(model, before, inputs, p0, mlp_cut)
            for layer in sorted(writes):  # ascending layers: reads must follow the forward order
                write(layer)
        cut_to_final_position(model, mlp_cut)
        last = read_unembedding_input(model)
    return last


def _skip_prefix(model: AnyModel, before: dict[str, Any], inputs: torch.Tensor, p0: int, mlp_cut: str | None) -> None:
    for path, output in before.items():  # in the order they run
        if path != mlp_cut:  # a module cut to the final position must run
            envoy_at(model, path).skip(_cut(output, inputs, p0))


def _present_rows(block_inputs: Any, n: int, total: int, joining: torch.Tensor | None) -> Any:
    """A block's ``(args, kwargs)`` for the first ``n`` batch rows: its first input (the residual)
    cut to the rows already there and extended by ``joining``; every other tensor laid out per
    row (``total`` leading rows, two dimensions or more) cut to ``n`` rows."""
    args, kwargs = block_inputs
    first = next(iter(kwargs)) if not args else None  # the residual's keyword, if not positional
    hidden = args[0] if args else kwargs[first]
    kept = n - (0 if joining is None else len(joining))
    hidden = hidden[:kept] if joining is None else torch.cat([hidden[:kept], joining.to(hidden.dtype)])
    args = [_rows(a, n, total) for a in args]
    kwargs = {name: _rows(v, n, total) for name, v in kwargs.items()}
    if args:
        args[0] = hidden
    else:
        kwargs[first] = hidden
    return tuple(args), kwargs


def _rows(value: Any, n: int, total: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() >= 2 and value.shape[0] == total else value
    if isinstance(value, tuple):
        return tuple(_rows(v, n, total) for v in value)
    return value


__all__ = ["PrefixCaches", "shortcut_forward"]
