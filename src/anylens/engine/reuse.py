"""Work a patched run shares with the unpatched run, done once instead of once per row.

A patch written at block ``b`` and position ``p`` cannot change what the model computes before
it: blocks before ``b`` see exactly the unpatched run, and in a causal model so do positions
before ``p``, at every layer. A batched sweep with reuse therefore

* answers a row whose patch writes what is already there from the unpatched run (patching a
  position where the clean and corrupt activations are equal changes nothing);
* groups the other rows into batches sharing a first position ``p0`` (and, where forwards cannot
  grow, a first block ``b0``) (:func:`.scheduling.plan_batches`);
* skips the blocks before the batch's first block ``b0``, handing each its unpatched output
  (nnsight ``skip``), and lets every other row join the batch at its own block, with the
  unpatched output of the block before (a *growing* forward, :func:`.shortcut.shortcut_forward`);
* in block ``b0``, hands the modules that return before the role their unpatched outputs too
  (:mod:`.block_prefix`);
* runs only positions ``p0..``, on top of the unpatched run's key/value cache of the positions
  before ``p0``, expanded over the batch's rows (:func:`.blocks.kv_cache_reusable` says where);
* asks for final-position logits only, the only ones a sweep scores (only the columns its metric
  reads, and the last block's MLP at the final position alone: :mod:`.final_position`).

Only the adapter's paths of the block list and the unembedding are used: nothing here knows an
architecture. Each new shortcut (prompt length, ``b0``, ``p0``, the blocks rows join at, block
prefixes) is checked once per model: before the batch runs, a guard forward takes the same
shortcuts with unpatched copies of a few of its inputs (one joining at each block rows join at,
and the last row's), which must reproduce the unpatched logits. If they do not, the newest kind
of shortcut is turned off for that model with a warning (growing forwards, then block prefixes,
then reuse as a whole); a growing forward that raises is turned off the same way. What was
verified and what is off lives in the model's :class:`.state.EngineState`.

The guard runs apart, never inside the batch: a row's result must not depend on whether its
shortcut was new to the process. Matrix products over batches of other sizes may round
differently (the kernels block the batch differently), so guard rows riding along in a first
batch would change its other rows in the last bits, and a resumed sweep would not reproduce an
uninterrupted one. Each batch therefore always runs exactly its own rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .baseline import Baseline, record_baseline
from .block_prefix import prefix_width
from .blocks import block_of, block_prefixes, kv_cache_reusable, skippable_blocks
from .final_position import final_logits, last_mlp, matches_within
from .memory import Sizes
from .plan import HEADED_ROLES, PatchPlan, PlanStats, moved_together
from .scheduling import CostModel, RowBatch, plan_batches
from .shortcut import PrefixCaches, shortcut_forward
from .state import engine_state

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Relative tolerance of the guard forward (float32; scaled up for coarser dtypes): broken mechanics
#: miss by far more than rounding does.
GUARD_RTOL = 1e-4


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


class ReusingRun:
    """One plan run with reuse: inputs in groups that fit the budget, each group in batches."""

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
        self.engine = engine_state(model)
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
        # Logits of many batches' rows per unembedding call, in at most a quarter of what is free.
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
        growing = self.engine.growing_off_reason is None and self.model.role(plan.role).path.view != "tokens"
        for batch in plan_batches(blocks, positions, live, self.cap, self.cost, growing):
            self._run_batch(batch, state, caches, first)
        self._flush()

    def _run_batch(self, batch: RowBatch, state: Baseline, caches: PrefixCaches | None, first: int) -> None:
        model, rows = self.model, batch.rows
        self.stats.forwards += 1
        self.stats.rows_per_forward = max(self.stats.rows_per_forward, len(rows))
        if self.engine.reuse_off_reason is not None:
            self._full(rows)
            return
        prefix = batch.block in (state.prefix or {}) and self.engine.prefix_off_reason is None
        growing = batch.starts is not None and self.engine.growing_off_reason is None
        if not growing:
            batch = RowBatch(batch.rows, batch.block, batch.pos)
        joins = tuple(batch.starts.unique().tolist()) if growing else ()
        key = (self.length, batch.block, batch.pos, prefix, joins)
        if key not in self.engine.verified:
            problem = self._guard(batch, state, caches, first, prefix)
            if problem is not None:
                # Take the newest shortcuts back one at a time; the rest of reuse stays on.
                if growing:
                    self._stop_growing(problem)
                elif prefix:
                    self._prefix_off(batch, state)
                else:
                    self._disable(batch)
                    self.stats.forwards += 1
                    self._full(rows)
                    return
                self._run_batch(batch, state, caches, first)
                return
            self.engine.verified.add(key)
        try:
            hidden = shortcut_forward(model, self.plan, rows, batch, state, caches, first, True, self.mlp_cut, prefix)
        except Exception as error:
            if not growing:
                raise
            self._stop_growing(f"a growing forward failed: {type(error).__name__}: {error}")
            self._run_batch(batch, state, caches, first)
            return
        self._pending.append((rows, hidden))
        starts = batch.starts if growing else torch.full((len(rows),), batch.block)
        self._work += int((self.cost.n_blocks - starts).sum()) * (self.length - batch.pos)
        if sum(len(r) for r, _ in self._pending) >= self.unembed_rows:
            self._flush()

    def _guard(
        self, batch: RowBatch, state: Baseline, caches: PrefixCaches | None, first: int, prefix: bool
    ) -> str | None:
        """Run the guard forward of a batch whose shortcuts are new (unpatched copies of a few of
        its inputs, apart from it); None when it reproduces the unpatched run, else what failed."""
        guard = _guard_batch(batch)
        try:
            hidden = shortcut_forward(
                self.model, self.plan, guard.rows, guard, state, caches, first, False, self.mlp_cut, prefix
            )
        except Exception as error:
            if batch.starts is None:
                raise
            return f"a growing forward failed: {type(error).__name__}: {error}"
        expected = state.last[self.plan.input_rows[guard.rows] - first]
        with torch.no_grad():
            got = final_logits(self.model, hidden, self.columns)
        if matches_within(got, expected, GUARD_RTOL):
            return None
        return f"a {'growing ' if batch.starts is not None else ''}forward did not reproduce the unpatched run"

    def _full(self, rows: torch.Tensor) -> None:
        self.scores[rows] = self.score(self.plain_forward(rows), rows).detach().float().cpu()
        self._work += len(rows) * self.cost.n_blocks * self.length

    def _flush(self) -> None:
        """Unembed and score the rows run so far, many batches' rows per call."""
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

    def _stop_growing(self, reason: str) -> None:
        self.engine.stop_growing(reason)
        warnings.warn(
            f"anylens: growing forwards are off for {self.model.name!r} ({reason}); each batch runs "
            "all its rows from its first block, the rest of reuse stays on",
            stacklevel=7,
        )

    def _prefix_off(self, batch: RowBatch, state: Baseline) -> None:
        modules = ", ".join(state.prefix[batch.block])
        self.engine.stop_prefixes(f"handing back {modules} did not reproduce the unpatched run")
        warnings.warn(
            f"anylens: skipping the modules before {self.plan.role!r} in a batch's first block is off for "
            f"{self.model.name!r} ({self.engine.prefix_off_reason}); they run again, the rest of reuse stays on",
            stacklevel=7,
        )

    def _disable(self, batch: RowBatch) -> None:
        self.engine.disable_reuse(
            f"skipping blocks before {batch.block} and positions before {batch.pos} did not reproduce the unpatched run"
        )
        warnings.warn(
            f"anylens: reuse of unpatched work is off for {self.model.name!r} ({self.engine.reuse_off_reason}); "
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
    leaves after the plan's sources; the rest sizes the batches (or ``batch_size`` rows).
    ``baseline`` is the unpatched run of every input, if the caller recorded it with the role
    (:func:`.baseline.record_for_plan`). ``plain_forward(rows)`` runs rows in full, should a guard fail.
    ``columns`` are the only logits ``score`` reads, if it says (:func:`.final_position.metric_columns`).
    """
    return ReusingRun(model, plan, score, plain_forward, batch_size, memory_budget, baseline, columns).run()


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


def _guard_batch(batch: RowBatch) -> RowBatch:
    """The guard forward of ``batch``: its first row at each block rows join at, and its last row
    (all from the batch's first block when it does not grow); run unpatched."""
    if batch.starts is None:
        picked = sorted({0, len(batch.rows) - 1})
        return RowBatch(batch.rows[picked], batch.block, batch.pos)
    starts = batch.starts.tolist()
    picked = sorted({starts.index(s) for s in set(starts)} | {len(starts) - 1})
    return RowBatch(batch.rows[picked], batch.block, batch.pos, batch.starts[picked])


__all__ = ["GUARD_RTOL", "first_changes", "run_reusing"]
