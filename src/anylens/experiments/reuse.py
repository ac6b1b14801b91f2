"""Work a patched run shares with the unpatched run, done once instead of once per row.

A patch written at block ``b`` and position ``p`` cannot change what the model computes before
it: blocks before ``b`` see exactly the unpatched run, and in a causal model so do positions
before ``p``, at every layer. A batched sweep with reuse therefore

* answers a row whose patch writes what is already there from the unpatched run (patching a
  position where the clean and corrupt activations are equal changes nothing);
* groups the other rows into chunks sharing a first position ``p0`` (and, where forwards cannot
  grow, a first block ``b0``) (:func:`anylens.experiments.chunks.plan_chunks`);
* skips the blocks before the chunk's first block ``b0``, handing each its unpatched output
  (nnsight ``skip``), and lets every other row join the batch at its own block, with the
  unpatched output of the block before (a *growing* forward, :func:`shortcut_forward`);
* in block ``b0``, hands the modules that return before the role their unpatched outputs too
  (:mod:`.block_prefix`);
* runs only positions ``p0..``, on top of the unpatched run's key/value cache of the positions
  before ``p0``, expanded over the chunk's rows (:func:`kv_cache_reusable` says where);
* asks for final-position logits only, the only ones a sweep scores (only the columns its metric
  reads, and the last block's MLP at the final position alone: :mod:`.final_position`).

Only the adapter's paths of the block list and the unembedding are used: nothing here knows an
architecture. Each new shortcut (prompt length, ``b0``, ``p0``, the blocks rows join at, block
prefixes) is checked once per model: before the chunk runs, a guard forward takes the same
shortcuts with unpatched copies of a few of its inputs (one joining at each block rows join at,
and the last row's), which must reproduce the unpatched logits. If they do not, the newest kind
of shortcut is turned off for that model with a warning (growing forwards, then block prefixes,
then reuse as a whole); a growing forward that raises is turned off the same way.

The guard runs apart, never inside the chunk: a row's result must not depend on whether its
shortcut was new to the process. Matrix products over batches of other sizes may round
differently (the kernels block the batch differently), so guard rows riding along in a first
chunk would change its other rows in the last bits, and a resumed sweep would not reproduce an
uninterrupted one. Each chunk therefore always runs exactly its own rows.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.access import envoy_at
from .block_prefix import off_reason, per_position_width, prefix_modules, prefix_width, turn_off
from .chunks import Chunk, CostModel, Sizes, plan_chunks
from .components import HEADED_ROLES, PatchPlan, PlanStats, RowFill, moved_together, writes_by_layer
from .final_position import (
    cut_to_final_position,
    final_logits,
    forward_kwargs,
    last_logits,
    last_logits_kwargs,
    last_mlp,
    matches_within,
    read_last,
    read_unembedding_input,
)

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Relative tolerance of the guard forward (float32; scaled up for coarser dtypes): broken mechanics
#: miss by far more than rounding does.
GUARD_RTOL = 1e-4

_verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(length, b0, p0)}
_disabled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why reuse is off
_fixed_batch: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> why forwards do not grow
_kv_reusable: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> bool


# -- model facts ------------------------------------------------------------------------------
def block_envoys(model: AnyModel) -> Any:
    """The nnsight envoy of the model's list of blocks (the adapter's ``layers`` path)."""
    return envoy_at(model, model.adapter.layers)


def skippable_blocks(model: AnyModel, role: str, layers: list[int]) -> int:
    """How many leading blocks a plan over ``layers`` may skip: those before its last patched
    block (0 when a role lives outside the blocks)."""
    owners = [block_of(model, role, layer) for layer in layers]
    return max(owners) if owners and all(b is not None for b in owners) else 0


def block_prefixes(model: AnyModel, role: str, layers: list[int], n_blocks: int) -> dict[int, tuple[str, ...]]:
    """Per block a chunk may start at (up to ``n_blocks``), the modules there that return before
    ``role`` is reached (:mod:`.block_prefix`); blocks with none are left out."""
    found: dict[int, tuple[str, ...]] = {}
    for layer in layers:
        block = block_of(model, role, layer)
        if block is not None and block <= n_blocks and block not in found:
            found[block] = prefix_modules(model, role, layer, block)
    return {block: modules for block, modules in found.items() if modules}


def block_of(model: AnyModel, role: str, layer: int) -> int | None:
    """Index of the block whose module holds ``role`` at ``layer``; None if outside the blocks."""
    module = model.role(role).path.module_at(layer)
    prefix = model.adapter.layers + "."
    if not module.startswith(prefix):
        return None
    head = module[len(prefix) :].split(".")[0]
    return int(head) if head.isdigit() else None


def _cache_name(model: AnyModel) -> str:
    return "cache" if "cache" in forward_kwargs(model) else "past_key_values"


def _returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def kv_cache_reusable(model: AnyModel, probe_ids: torch.Tensor) -> bool:
    """Whether the model's cache is plain attention keys and values, safe to continue from.

    Continuing from a cache is reused only for transformers' ``DynamicCache`` made of full or
    sliding-window key/value layers: they hold each position's keys and values, which a later
    position never changes. SSM caches (Mamba's convolution and recurrent state) are left out:
    transformers' Mamba continues a multi-token suffix from its state inexactly (it treats it as a
    fresh prefill), and other state layouts are not promised to be position-exact either.
    """
    if model in _kv_reusable:
        return _kv_reusable[model]
    reusable = False
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # pragma: no cover - transformers without the cache classes
        DynamicCache = None  # noqa: N806
    if DynamicCache is not None and {"attention_mask", "use_cache"} <= forward_kwargs(model):
        with torch.no_grad():
            output = model.hf(input_ids=probe_ids[:1, :2].to(model.device), use_cache=True, **last_logits_kwargs(model))
        cache = _returned_cache(output)
        layers = getattr(cache, "layers", None)
        reusable = (
            type(cache) is DynamicCache
            and bool(layers)
            and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers)
        )
    _kv_reusable[model] = reusable
    return reusable


# -- the unpatched run ------------------------------------------------------------------------
@dataclass
class Baseline:
    """The unpatched run of a plan's inputs.

    ``last`` is its final-position logits; ``acts[layer]`` the role's activations (to tell which
    writes change anything), ``blocks[i]`` the output of block ``i`` (to skip the block) and
    ``prefix[b]`` the outputs of block ``b``'s modules before the role, by path (to skip them in
    a chunk that starts at ``b``).
    """

    last: torch.Tensor
    acts: dict[int, torch.Tensor] | None = None
    blocks: list[Any] | None = None
    cache: Any = None  # the key/value cache of every position, where reusable
    prefix: dict[int, dict[str, Any]] | None = None

    def nbytes(self) -> int:
        tensors = list((self.acts or {}).values()) + [_residual(b) for b in self.blocks or []]
        tensors += [_residual(out) for outputs in (self.prefix or {}).values() for out in outputs.values()]
        for layer in getattr(self.cache, "layers", []):
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors) + self.last.numel() * self.last.element_size()


def _residual(block_output: Any) -> torch.Tensor:
    return block_output[0] if isinstance(block_output, (tuple, list)) else block_output


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
    With block outputs, the outputs of the modules before the role in each block a chunk may
    start at are kept too (:func:`block_prefixes`).
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
    structures: list[Any] = []  # each block's output as the first chunk returned it
    prefix_structures: dict[str, Any] = {}  # the same for the modules before the role
    for start in range(0, ids.shape[0], step):
        acts: dict[int, torch.Tensor] = {}
        outputs: list[Any] = []
        before: dict[str, Any] = {}
        kwargs = last_logits_kwargs(model) if last_only else {}
        if cache is not None:
            kwargs.update({_cache_name(model): cache, "use_cache": True})
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
                rows.put(("block", index), start, _residual(output))
            else:
                structures = None
        if start == 0:
            prefix_structures = dict(before)
        for path, output in before.items():
            if path in prefix_structures and per_position_width(output, last.shape[0], ids.shape[1]):
                rows.put(("prefix", path), start, _residual(output))
            else:
                prefix_structures.pop(path, None)
    acts_out = {layer: rows[("act", layer)] for layer in layers} if layers else None
    kept, prefix = None, None
    if n_blocks and structures is not None:
        kept = [_with_residual(structure, rows[("block", i)]) for i, structure in enumerate(structures)]
        prefix = _kept_prefixes(prefixes, prefix_structures, rows)
    return Baseline(rows["last"], acts_out, kept, cache, prefix)


def _kept_prefixes(prefixes: dict[int, tuple[str, ...]], structures: dict[str, Any], rows: RowFill) -> dict:
    """Per block, its prefix modules' outputs by path, in the order they run; a block loses its
    prefix if any of its modules' outputs could not be kept (a skip must hand back all of them)."""
    kept = {}
    for block, paths in prefixes.items():
        if all(path in structures for path in paths):
            kept[block] = {path: _with_residual(structures[path], rows[("prefix", path)]) for path in paths}
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
    where reading the weights sets the pace (:func:`.chunks.one_forward`)."""
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
    return _with_residual(output, _residual(output)[n:].clone())


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _with_residual(structure: Any, residual: torch.Tensor) -> Any:
    if isinstance(structure, (tuple, list)):
        return type(structure)((residual, *structure[1:]))
    return residual


# -- which rows change what -------------------------------------------------------------------
def first_changes(plan: PatchPlan, acts: dict[int, torch.Tensor], input_offset: int = 0) -> torch.Tensor:
    """Per row, the first target position whose write differs from the unpatched value; -1 if none.

    ``acts[layer]`` is the role in the unpatched run of the plan's inputs ``input_offset..``.
    Equality is exact: a write is skipped only if it writes the very value already there.
    """
    n = len(plan)
    start = torch.full((n,), -1, dtype=torch.long)
    head_first = plan.role == "pattern"  # [batch, head, query, key]
    headed = plan.role in HEADED_ROLES
    targets = torch.tensor(plan.target_positions, dtype=torch.long)
    index_of = {p: i for i, p in enumerate(plan.target_positions)}
    by_layer: dict[int, list[int]] = {}
    for row, component in enumerate(plan.components):
        by_layer.setdefault(component.layer, []).append(row)
    # Compare on the device, layer by layer, and bring every layer's answer over in one copy:
    # each copy to the host waits for the device, which costs more than the comparisons. The
    # indices go the other way in one copy too.
    source_pos = torch.tensor(plan.source_positions, dtype=torch.long)
    # Per layer, the distinct (input, source) pairs of its rows: a row's writes differ from the
    # unpatched values exactly where its pair's do.
    inputs, sources = plan.input_rows.tolist(), plan.source_rows.tolist()
    pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, rows in by_layer.items():
        first_of: dict[tuple[int, int], int] = {}
        inverse = [first_of.setdefault((inputs[r] - input_offset, sources[r]), len(first_of)) for r in rows]
        pairs[layer] = (torch.tensor(list(first_of), dtype=torch.long).view(-1, 2), torch.tensor(inverse))
    device = next(iter(acts.values())).device if acts else torch.device("cpu")
    indices = [targets, source_pos, torch.zeros_like(source_pos)]
    indices += [column for unique, _ in pairs.values() for column in (unique[:, 0], unique[:, 1])]
    on_device = iter(moved_together(indices, device))
    targets_at, source_pos_at, zeros_at = next(on_device), next(on_device), next(on_device)
    compared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in by_layer:
        act, source = acts[layer], plan.sources[layer]
        if head_first:
            act, source = act.transpose(1, 2), source.transpose(1, 2)  # -> [batch, pos, head, key]
        positions = zeros_at if source.shape[1] == 1 else source_pos_at  # one value for every position (a mean)
        target_rows, source_rows = next(on_device), next(on_device)
        target_values = act[target_rows.to(act.device)][:, targets_at.to(act.device)]
        source_values = source[source_rows.to(source.device)][:, positions.to(source.device)]
        differs = target_values != source_values.to(device=act.device, dtype=act.dtype)
        keep = 3 if headed else 2  # [pair, pos, head?] after reducing the features
        compared[layer] = (differs.flatten(keep).any(-1) if differs.dim() > keep else differs, pairs[layer][1])
    on_host = moved_together([differs for differs, _ in compared.values()], torch.device("cpu"))
    for (layer, rows), differs in zip(by_layer.items(), on_host):
        inverse, row_index = compared[layer][1], torch.tensor(rows)
        changed = differs[inverse]  # [row, pos, head?]
        components = [plan.components[row] for row in rows]
        if headed:
            heads = torch.tensor([-1 if c.head is None else c.head for c in components])
            one_head = changed.gather(2, heads.clamp(min=0)[:, None, None].expand(-1, changed.shape[1], 1))[..., 0]
            changed = torch.where((heads < 0)[:, None], changed.any(-1), one_head)  # [row, pos]
        # A component at one position changes from there if it changes anything; one at every
        # position from the first position it changes.
        only = torch.tensor([-1 if c.pos is None else index_of[c.pos] for c in components])
        changed = torch.where((only < 0)[:, None], changed, changed & (torch.arange(len(targets)) == only[:, None]))
        first = torch.where(changed, targets, torch.iinfo(torch.long).max).min(-1).values
        start[row_index] = torch.where(changed.any(-1), first, -1)
    return start


# -- running a chunk --------------------------------------------------------------------------
class PrefixCaches:
    """The unpatched run's key/value cache of positions ``..p0``, expanded over a chunk's rows.

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
                self._pos, self._cache = p0, _returned_cache(output)
            cache = copy.copy(self._cache)
            cache.layers = [copy.copy(layer) for layer in self._cache.layers]
        cache.reorder_cache(inputs)  # one copy of each input's row per patched row (new tensors)
        return cache


def _cut(block_output: Any, inputs: torch.Tensor, p0: int) -> Any:
    """A block's unpatched output for the given input rows, from position ``p0``."""
    residual = _residual(block_output)
    cut = residual[inputs.to(residual.device), p0:]
    if isinstance(block_output, (tuple, list)):
        return type(block_output)((cut, *block_output[1:]))
    return cut


def shortcut_forward(
    model: AnyModel,
    plan: PatchPlan,
    rows: torch.Tensor,
    chunk: Chunk,
    baseline: Baseline,
    caches: PrefixCaches | None,
    input_offset: int,
    patched: bool = True,
    mlp_cut: str | None = None,
    prefix: bool = True,
) -> torch.Tensor:
    """The unembedding's final-position input for ``rows``, skipping the chunk's blocks and
    positions, and with ``prefix`` the modules of its first block before the role.

    Where the chunk carries ``starts``, each row joins the forward at its own first block: the
    batch grows block by block, a joining row entering with the unpatched run's output of the
    block before, so no row runs a block its patch cannot change (rows are sorted by start). The
    blocks' other per-row inputs (an attention mask) and the key/value cache are cut to the rows
    present at each block.

    The unembedding itself is skipped too: a sweep applies it to many chunks' rows at once
    (:func:`.final_position.final_logits`), reading its weights once rather than once per
    forward. ``patched=False`` runs the rows' inputs with the same shortcuts but without their
    patches: the guard forward, whose logits must be the unpatched run's. ``mlp_cut`` is the last
    MLP to run on the final position only (:mod:`.final_position`).
    """
    device = model.device
    p0, b0 = chunk.pos, chunk.block
    inputs = plan.input_rows[rows] - input_offset
    starts = chunk.starts if chunk.starts is not None else torch.full((len(rows),), b0)
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
        kwargs[_cache_name(model)] = cache
        kwargs["use_cache"] = True
        data: Any = {"input_ids": ids[:, p0:], "attention_mask": torch.ones_like(ids)}  # the mask covers the cache
    else:
        data = ids
    writes = writes_by_layer(plan, rows, device, start=p0) if patched else {}
    owners = {layer: block_of(model, plan.role, layer) for layer in writes}
    if present[b0] < total and None in owners.values():  # a growing forward writes block by block
        raise AssertionError(f"role {plan.role!r} is written outside the blocks: a chunk of it cannot grow")
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
                previous = _residual(baseline.blocks[k - 1])
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


# -- guard ------------------------------------------------------------------------------------
def disabled_reason(model: AnyModel) -> str | None:
    """Why reuse is off for ``model`` (a guard forward failed), or None."""
    return _disabled.get(model)


# -- the whole plan ---------------------------------------------------------------------------
class ReusingRun:
    """One plan run with reuse: inputs in groups that fit the budget, each group in chunks."""

    def __init__(
        self,
        model: AnyModel,
        plan: PatchPlan,
        score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        plain_forward: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int | None,
        memory_budget: int | None,
        baseline: Baseline | None,
        columns: torch.Tensor | None = None,
    ):
        self.model, self.plan, self.score, self.plain_forward = model, plan, score, plain_forward
        self.columns = columns
        self.length = plan.inputs.shape[1]
        self.layers = sorted({c.layer for c in plan.components})
        self.owner = {layer: block_of(model, plan.role, layer) or 0 for layer in self.layers}
        self.n_blocks = skippable_blocks(model, plan.role, self.layers)
        self.cost = CostModel(model, self.length)
        n_inputs = plan.inputs.shape[0]
        width = prefix_width(model, block_prefixes(model, plan.role, self.layers, self.n_blocks))
        sizes = Sizes.of(model, plan.role, self.n_blocks, self.length, plan.sources, memory_budget, n_inputs, width)
        if baseline is not None and baseline.acts is not None:
            self.baseline, self.group_size = baseline, n_inputs
            free = sizes.free - baseline.nbytes()
        else:
            self.baseline, self.group_size = None, sizes.inputs_per_group(n_inputs)
            free = sizes.free - self.group_size * sizes.per_input
        self.cap = batch_size or sizes.rows_for(max(free, 0))
        # Logits of many chunks' rows per unembedding call, in at most a quarter of what is free.
        logits_bytes = 2 * model.d_vocab * next(model.hf.parameters()).element_size()
        self.unembed_rows = max(self.cap, min(4096, max(free, 0) // 4 // logits_bytes))
        # A pattern's key axis is laid out by the cache (a sliding window keeps part of it), so
        # pattern patches run every position.
        self.kv = plan.role != "pattern" and kv_cache_reusable(model, plan.inputs)
        self.mlp_cut = last_mlp(model, plan.role, self.layers)
        self.scores = torch.empty(len(plan))
        self.stats = PlanStats(patches=len(plan))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._work = 0

    def run(self) -> tuple[torch.Tensor, PlanStats]:
        plan = self.plan
        for first in range(0, plan.inputs.shape[0], self.group_size):
            last = min(first + self.group_size, plan.inputs.shape[0])
            rows = torch.nonzero((plan.input_rows >= first) & (plan.input_rows < last)).flatten()
            if len(rows):
                self._group(first, last, rows)
        full = len(plan) * self.cost.n_blocks * self.length
        self.stats.work_fraction = self._work / full if full else 0.0
        return self.scores, self.stats

    def _group(self, first: int, last: int, rows: torch.Tensor) -> None:
        """Rows whose inputs are ``first..last-1``, against those inputs' unpatched run."""
        plan, model = self.plan, self.model
        state = self.baseline
        if state is None:
            state = record_baseline(
                model, plan.role, plan.inputs[first:last], self.layers, self.n_blocks, self.cap, columns=self.columns
            )
        starts = first_changes(_subplan(plan, rows), state.acts, first)
        unchanged = rows[starts < 0]
        for start in range(0, len(unchanged), self.unembed_rows):  # a block at a time: logits are wide
            part = unchanged[start : start + self.unembed_rows]
            unpatched = state.last[plan.input_rows[part] - first]
            self.scores[part] = self.score(unpatched, part).detach().float().cpu()
        self.stats.unchanged += len(unchanged)
        live = rows[starts >= 0]
        n_skippable = 0 if state.blocks is None else len(state.blocks)
        owners = [min(self.owner[plan.components[r].layer], n_skippable) for r in live.tolist()]
        blocks = torch.tensor(owners, dtype=torch.long)
        positions = starts[starts >= 0] if self.kv else torch.zeros(len(live), dtype=torch.long)
        caches = PrefixCaches(model, plan.inputs[first:last], state.cache) if self.kv else None
        # A role read as flattened tokens is unflattened by the trace's batch, which growing changes.
        growing = self.model not in _fixed_batch and self.model.role(plan.role).path.view != "tokens"
        for chunk in plan_chunks(blocks, positions, live, self.cap, self.cost, growing):
            self._chunk(chunk, state, caches, first)
        self._flush()

    def _chunk(self, chunk: Chunk, state: Baseline, caches: PrefixCaches | None, first: int) -> None:
        model, rows = self.model, chunk.rows
        self.stats.forwards += 1
        self.stats.rows_per_forward = max(self.stats.rows_per_forward, len(rows))
        if model in _disabled:
            self._full(rows)
            return
        prefix = chunk.block in (state.prefix or {}) and off_reason(model) is None
        growing = chunk.starts is not None and model not in _fixed_batch
        if not growing:
            chunk = Chunk(chunk.rows, chunk.block, chunk.pos)
        joins = tuple(chunk.starts.unique().tolist()) if growing else ()
        key = (self.length, chunk.block, chunk.pos, prefix, joins)
        if key not in _verified.setdefault(model, set()):
            problem = self._guard(chunk, state, caches, first, prefix)
            if problem is not None:
                # Take the newest shortcuts back one at a time; the rest of reuse stays on.
                if growing:
                    self._fixed_batch(problem)
                elif prefix:
                    self._prefix_off(chunk, state)
                else:
                    self._disable(chunk)
                    self.stats.forwards += 1
                    self._full(rows)
                    return
                self._chunk(chunk, state, caches, first)
                return
            _verified[model].add(key)
        try:
            hidden = shortcut_forward(model, self.plan, rows, chunk, state, caches, first, True, self.mlp_cut, prefix)
        except Exception as error:  # noqa: BLE001 - a block that cannot take a growing batch
            if not growing:
                raise
            self._fixed_batch(f"a growing forward failed: {type(error).__name__}: {error}")
            self._chunk(chunk, state, caches, first)
            return
        self._pending.append((rows, hidden))
        starts = chunk.starts if growing else torch.full((len(rows),), chunk.block)
        self._work += int((self.cost.n_blocks - starts).sum()) * (self.length - chunk.pos)
        if sum(len(r) for r, _ in self._pending) >= self.unembed_rows:
            self._flush()

    def _guard(
        self, chunk: Chunk, state: Baseline, caches: PrefixCaches | None, first: int, prefix: bool
    ) -> str | None:
        """Run the guard forward of a chunk whose shortcuts are new (unpatched copies of a few of
        its inputs, apart from it); None when it reproduces the unpatched run, else what failed."""
        guard = _guard_chunk(chunk)
        try:
            hidden = shortcut_forward(
                self.model, self.plan, guard.rows, guard, state, caches, first, False, self.mlp_cut, prefix
            )
        except Exception as error:  # noqa: BLE001 - a block that cannot take a growing batch
            if chunk.starts is None:
                raise
            return f"a growing forward failed: {type(error).__name__}: {error}"
        expected = state.last[self.plan.input_rows[guard.rows] - first]
        with torch.no_grad():
            got = final_logits(self.model, hidden, self.columns)
        if matches_within(got, expected, GUARD_RTOL):
            return None
        return f"a {'growing ' if chunk.starts is not None else ''}forward did not reproduce the unpatched run"

    def _full(self, rows: torch.Tensor) -> None:
        self.scores[rows] = self.score(self.plain_forward(rows), rows).detach().float().cpu()
        self._work += len(rows) * self.cost.n_blocks * self.length

    def _flush(self) -> None:
        """Unembed and score the rows run so far, many chunks' rows per call."""
        if not self._pending:
            return
        rows = torch.cat([r for r, _ in self._pending])
        hidden = torch.cat([h for _, h in self._pending])
        self._pending = []
        for start in range(0, len(rows), self.unembed_rows):
            part = rows[start : start + self.unembed_rows]
            with torch.no_grad():
                logits = final_logits(self.model, hidden[start : start + self.unembed_rows], self.columns)
            self.scores[part] = self.score(logits, part).detach().float().cpu()

    def _fixed_batch(self, reason: str) -> None:
        _fixed_batch[self.model] = reason
        warnings.warn(
            f"anylens: growing forwards are off for {self.model.name!r} ({reason}); each chunk runs "
            "all its rows from its first block, the rest of reuse stays on",
            stacklevel=7,
        )

    def _prefix_off(self, chunk: Chunk, state: Baseline) -> None:
        modules = ", ".join(state.prefix[chunk.block])
        turn_off(self.model, f"handing back {modules} did not reproduce the unpatched run")
        warnings.warn(
            f"anylens: skipping the modules before {self.plan.role!r} in a chunk's first block is off for "
            f"{self.model.name!r} ({off_reason(self.model)}); they run again, the rest of reuse stays on",
            stacklevel=7,
        )

    def _disable(self, chunk: Chunk) -> None:
        _disabled[self.model] = (
            f"skipping blocks before {chunk.block} and positions before {chunk.pos} did not reproduce the unpatched run"
        )
        warnings.warn(
            f"anylens: reuse of unpatched work is off for {self.model.name!r} ({_disabled[self.model]}); "
            "every patched row now runs in full",
            stacklevel=6,
        )


def run_reusing(
    model: AnyModel,
    plan: PatchPlan,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    plain_forward: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int | None = None,
    memory_budget: int | None = None,
    baseline: Baseline | None = None,
    columns: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PlanStats]:
    """Run ``plan`` with reuse: the scores of running every row in full, for less work.

    Inputs are taken in groups whose recorded unpatched run fits half of what ``memory_budget``
    leaves after the plan's sources; the rest sizes the chunks (or ``batch_size`` rows).
    ``baseline`` is the unpatched run of every input, if the caller recorded it with the role
    (:func:`record_for_plan`). ``plain_forward(rows)`` runs rows in full, should a guard fail.
    ``columns`` are the only logits ``score`` reads, if it says (:func:`.final_position.metric_columns`).
    """
    return ReusingRun(model, plan, score, plain_forward, batch_size, memory_budget, baseline, columns).run()


def _guard_chunk(chunk: Chunk) -> Chunk:
    """The guard forward of ``chunk``: its first row at each block rows join at, and its last row
    (all from the chunk's first block when it does not grow); run unpatched."""
    if chunk.starts is None:
        picked = sorted({0, len(chunk.rows) - 1})
        return Chunk(chunk.rows[picked], chunk.block, chunk.pos)
    starts = chunk.starts.tolist()
    picked = sorted({starts.index(s) for s in set(starts)} | {len(starts) - 1})
    return Chunk(chunk.rows[picked], chunk.block, chunk.pos, chunk.starts[picked])


def _subplan(plan: PatchPlan, rows: torch.Tensor) -> PatchPlan:
    """The rows ``rows`` of ``plan`` as a plan of their own (sharing inputs and sources)."""
    index = rows.tolist()
    return PatchPlan(
        role=plan.role,
        inputs=plan.inputs,
        components=[plan.components[i] for i in index],
        input_rows=plan.input_rows[rows],
        source_rows=plan.source_rows[rows],
        sources=plan.sources,
        target_positions=plan.target_positions,
        source_positions=plan.source_positions,
    )


__all__ = [
    "GUARD_RTOL",
    "Baseline",
    "block_of",
    "block_prefixes",
    "disabled_reason",
    "first_changes",
    "kv_cache_reusable",
    "record_baseline",
    "record_for_plan",
    "record_pair",
    "run_reusing",
    "skippable_blocks",
]
