"""Reuse of unpatched work in patching and ablation sweeps: same results as running every row in
full (``reuse=False``) and as a one-patch-per-forward plain-hook reference, on every tiny family."""

from __future__ import annotations

import pytest
import torch
from families import family_cases
from hook_reference import reference_patch
from tiny_models import model_cache, random_prompt_pairs

import anylens as al
from anylens.engine import baseline as recording
from anylens.engine import blocks, engine_state, reuse, shortcut
from anylens.engine import run as entry
from anylens.engine.baseline import record
from anylens.engine.executor import patched_forward
from anylens.engine.final_position import last_mlp
from anylens.engine.plan import Component, PatchPlan, moved_together
from anylens.engine.scheduling import CostModel, RowBatch, plan_batches
from anylens.testing import tiny

TOL = 1e-5
ANSWER, DISTRACTOR = 300, 301
METRIC = al.metrics.logit_diff(ANSWER, DISTRACTOR)
LENGTH = 10  # longer than the tiny Gemma 2's sliding window (6), so cached windows are exercised
DIFFERENT = (3, 7)  # positions where clean and corrupt prompts differ


model_of = model_cache()


def prompt_pairs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return random_prompt_pairs(seed, LENGTH, DIFFERENT)


def metrics_of(result) -> torch.Tensor:
    return torch.tensor(result.to_frame()["metric"].to_numpy())


CASES = [("resid_pre", ("layer", "pos")), ("z", ("layer", "head")), ("mlp_out", ("layer",))]


@pytest.fixture(params=[True, False], ids=["one-recording", "two-recordings"])
def one_recording(request, monkeypatch):
    """Record the source run and the unpatched run in one forward, or in one each."""
    monkeypatch.setattr(entry, "one_forward", lambda model, source, patched: request.param)
    return request.param


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("family,role,over", family_cases(CASES))
def test_reuse_matches_full_runs_and_hook_reference(family, role, over, direction, one_recording):
    model = model_of(family)
    clean, corrupt = prompt_pairs()
    # Small batches: many forwards, each starting at its own block and position.
    reused = al.patch(model, clean, corrupt, role=role, over=over, metric=METRIC, direction=direction, batch_size=5)
    full = al.patch(model, clean, corrupt, role=role, over=over, metric=METRIC, direction=direction, reuse=False)
    assert (metrics_of(reused) - metrics_of(full)).abs().max() <= TOL
    assert reused.clean_metric == pytest.approx(full.clean_metric, abs=TOL)
    assert reused.corrupt_metric == pytest.approx(full.corrupt_metric, abs=TOL)

    expected, *_ = reference_patch(model.hf, role, over, clean, corrupt, direction)
    frame = reused.to_frame()
    columns = [d for d in ("layer", "head", "pos") if d in over]
    got = {tuple(int(v) for v in row[columns]): row["metric"] for _, row in frame.iterrows()}
    assert max(abs(got[key] - value) for key, value in expected.items()) <= TOL

    assert reused.meta["reuse"] and not full.meta["reuse"]
    assert full.meta["work_fraction"] == 1.0 and full.meta["unchanged"] == 0
    assert reused.meta["work_fraction"] < 1.0  # something was skipped
    assert engine_state(model).reuse_off_reason is None  # every shortcut passed its guard


@pytest.mark.needs_roles("pattern")
def test_reuse_matches_full_runs_for_patterns_and_single_head_positions(family):
    try:
        model = tiny(family)  # its own copy: eager attention for the pattern
    except ImportError as error:
        pytest.skip(f"tiny {family!r} cannot be built here: {error}")
    model.set_attn_implementation("eager")
    clean, corrupt = prompt_pairs()
    cases = [("pattern", ("layer", "head")), ("pattern", ("layer", "head", "pos")), ("z", ("layer", "head", "pos"))]
    for role, over in cases:
        if role not in model.roles:
            continue
        kwargs = dict(role=role, over=over, metric=METRIC)
        reused = al.patch(model, clean, corrupt, batch_size=6, **kwargs)
        full = al.patch(model, clean, corrupt, reuse=False, **kwargs)
        assert (metrics_of(reused) - metrics_of(full)).abs().max() <= TOL, (role, over)
        if "pos" in over:
            assert reused.meta["unchanged"] > 0


def test_shortcut_forward_equals_the_full_forward(family):
    """Skipping blocks and cached positions, and unembedding apart, gives the logits of a full
    patched forward."""
    model = model_of(family)
    clean, corrupt = prompt_pairs(seed=1)
    layers = model.layers()
    sources, _ = record(model, "resid_pre", clean, layers)
    baseline = recording.record_baseline(model, "resid_pre", corrupt, layers, n_blocks=model.n_layers - 1)
    assert baseline.blocks is not None and len(baseline.blocks) == model.n_layers - 1
    last_layer = model.n_layers - 1
    components = [Component(1, 8), Component(last_layer, 7), Component(last_layer, 9), Component(1, None)]
    plan = PatchPlan(
        role="resid_pre",
        inputs=corrupt,
        components=components,
        input_rows=[0, 1, 0, 1],
        source_rows=[0, 1, 0, 1],
        sources=sources,
        target_positions=list(range(LENGTH)),
        source_positions=list(range(LENGTH)),
    )
    rows = torch.arange(len(plan))
    full = patched_forward(model, plan, rows)
    kv = blocks.kv_cache_reusable(model, corrupt)
    positions = (0, 7) if kv else (0,)  # 7 > the sliding window of the tiny Gemma 2
    # Growing batches: rows sorted by the block they join at (at most their patched layer's).
    growing = {
        0: (torch.tensor([0, 3, 1, 2]), [0, 1, last_layer, last_layer]),
        7: (rows[:3], [1, last_layer, last_layer]),
    }
    for block in (0, 1, "growing"):
        for pos in positions:
            if pos and model.n_layers - 1 < 1:
                continue
            if block == "growing":
                batch_rows, starts = growing[pos]
                batch = RowBatch(batch_rows, starts[0], pos, torch.tensor(starts))
            else:
                batch = RowBatch(rows[:3], block, pos) if pos else RowBatch(rows, block, pos)
            # The prefix cache cut from the unpatched run's, and run afresh for the prefix alone.
            # With the last MLP run on the final position alone, and without.
            for full_cache, mlp_cut in ((baseline.cache, None), (None, last_mlp(model, "resid_pre", layers))):
                caches = shortcut.PrefixCaches(model, corrupt, full_cache) if pos else None
                got = shortcut.shortcut_forward(model, plan, batch.rows, batch, baseline, caches, 0, True, mlp_cut)
                guard = shortcut.shortcut_forward(model, plan, batch.rows, batch, baseline, caches, 0, False, mlp_cut)
                with torch.no_grad():
                    got, guard = model.unembed(got), model.unembed(guard)
                assert (got - full[batch.rows]).abs().max() <= TOL, (block, pos)
                # The guard forward: the same shortcuts, unpatched, give the unpatched run's logits.
                expected = baseline.last[plan.input_rows[batch.rows]]
                assert (guard - expected).abs().max() <= TOL, (block, pos)
    if kv and family != "gemma2":
        assert shortcut.PrefixCaches(model, corrupt, baseline.cache).full is not None
    if family == "gemma2":  # its sliding window dropped the first positions: prefixes are run again
        assert shortcut.PrefixCaches(model, corrupt, baseline.cache).full is None


def test_patches_that_write_equal_values_are_not_run():
    model = model_of("gpt2")
    clean, corrupt = prompt_pairs()
    clean, corrupt = clean[:1], corrupt[:1]
    result = al.patch(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=METRIC)
    # Layer 0's input differs only where the tokens do; later layers' from the first of them on.
    first = min(DIFFERENT)
    assert result.meta["unchanged"] == (LENGTH - len(DIFFERENT)) + (model.n_layers - 1) * first
    frame = result.to_frame()
    before = frame[frame["pos"] < first]
    assert (before["metric"] == result.corrupt_metric).all()  # answered from the unpatched run itself
    full = al.patch(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=METRIC, reuse=False)
    assert (metrics_of(result) - metrics_of(full)).abs().max() <= TOL


def test_key_value_caches_are_reused_for_attention_only():
    assert blocks.kv_cache_reusable(model_of("llama"), prompt_pairs()[0])
    assert blocks.kv_cache_reusable(model_of("gemma2"), prompt_pairs()[0])  # sliding-window layers too
    for family in ("mamba", "mamba2"):  # SSM state is not a per-position cache
        assert not blocks.kv_cache_reusable(model_of(family), prompt_pairs()[0])


def test_a_failing_guard_turns_reuse_off_and_keeps_results_right(monkeypatch):
    model = tiny("gpt2")  # a fresh model: no shortcut verified yet
    clean, corrupt = prompt_pairs()
    full = al.patch(model, clean, corrupt, metric=METRIC, reuse=False)
    original = shortcut._cut
    monkeypatch.setattr(shortcut, "_cut", lambda output, inputs, p0: original(output, inputs, p0) * 2)  # a broken skip
    with pytest.warns(UserWarning, match="reuse of unpatched work is off"):
        broken = al.patch(model, clean, corrupt, metric=METRIC, batch_size=6)
    assert "did not reproduce the unpatched run" in engine_state(model).reuse_off_reason
    assert (metrics_of(broken) - metrics_of(full)).abs().max() <= TOL
    again = al.patch(model, clean, corrupt, metric=METRIC, batch_size=6)  # stays off, silently
    assert (metrics_of(again) - metrics_of(full)).abs().max() <= TOL


ABLATION_CASES = [("z", ("layer", "head")), ("resid_pre", ("layer", "pos"))]


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
@pytest.mark.parametrize("family,role,over", family_cases(ABLATION_CASES))
def test_ablation_reuse_matches_full_runs(family, role, over, method):
    model = model_of(family)
    ids = torch.randint(4, 400, (3, LENGTH), generator=torch.Generator().manual_seed(2))
    ids[:, :4] = ids[0, :4]  # a shared prefix: resampled positions there change nothing
    kwargs = dict(role=role, over=over, method=method, metric=METRIC, seed=1)
    reused = al.ablate(model, ids, batch_size=7, **kwargs)
    full = al.ablate(model, ids, reuse=False, **kwargs)
    assert (metrics_of(reused) - metrics_of(full)).abs().max() <= TOL
    assert reused.meta["work_fraction"] < 1.0
    if method == "resample" and role == "resid_pre":
        assert reused.meta["unchanged"] > 0


def test_memory_budget_records_inputs_in_groups(monkeypatch):
    model = model_of("llama")
    generator = torch.Generator().manual_seed(4)
    clean = torch.randint(4, 400, (6, LENGTH), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 5] = torch.randint(4, 400, (6,), generator=generator)
    full = al.patch(model, clean, corrupt, role="z", over=("layer", "head"), metric=METRIC, reuse=False)
    calls = []
    original = recording.record_baseline
    for module in (recording, reuse):  # the recording before the sweep, and the sweep's own
        monkeypatch.setattr(module, "record_baseline", lambda *a, **k: calls.append(a[2].shape[0]) or original(*a, **k))
    sources = 2 * model.n_layers * 6 * LENGTH * model.d_model * 4  # clean and corrupt activations, roughly
    small = al.patch(model, clean, corrupt, role="z", over=("layer", "head"), metric=METRIC, memory_budget=sources * 2)
    assert len(calls) > 1 and sum(calls) >= 6  # the unpatched run is recorded group by group
    assert (metrics_of(small) - metrics_of(full)).abs().max() <= TOL


class _Cost:
    """A cost model with a chosen price per forward and per unit of work."""

    n_blocks, length = 4, 8

    def __init__(self, per_forward: float):
        self.per_forward = per_forward

    def fixed(self, b0: int) -> float:
        return self.per_forward

    def per_row(self, b0: int, p0: int) -> float:
        return (self.n_blocks - b0) * (self.length - p0)


def test_plan_batches_covers_every_row_once_within_the_cap():
    blocks = torch.tensor([b for b in range(4) for _ in range(8)])
    positions = torch.tensor([p for _ in range(4) for p in range(8)])
    rows = torch.arange(32) + 100
    for per_forward, cap in ((0.0, 5), (1.0, 32), (1e9, 7)):
        batches = plan_batches(blocks, positions, rows, cap, _Cost(per_forward))
        covered = torch.cat([c.rows for c in batches]).sort().values
        assert covered.tolist() == rows.tolist()
        for batch in batches:
            assert len(batch.rows) <= cap
            members = batch.rows - 100
            assert batch.block == int(blocks[members].min()) and batch.pos == int(positions[members].min())
    # Forwards that cost nothing: every (block, position) cell alone. Forwards that cost a
    # fortune: as few as the cap allows.
    assert len(plan_batches(blocks, positions, rows, 64, _Cost(0.0))) == 32
    assert len(plan_batches(blocks, positions, rows, 64, _Cost(1e9))) == 1
    assert len(plan_batches(blocks, positions, rows, 7, _Cost(1e9))) == 5
    # Growing forwards: each row joins at its own block, so a split by block saves no work and
    # only positions are split; a batch's rows come sorted by the block they join at.
    batches = plan_batches(blocks, positions, rows, 64, _Cost(0.0), growing=True)
    assert len(batches) == 8
    for batch in batches:
        starts = batch.starts.tolist()
        assert starts == blocks[batch.rows - 100].tolist() == sorted(starts) and batch.block == starts[0]


def test_cost_model_prefers_fewer_forwards_on_tiny_models():
    model = model_of("gpt2")
    cost = CostModel(model, LENGTH)
    assert cost.fixed(0) > cost.per_row(0, 0)  # a tiny model's forward is mostly fixed cost
    assert cost.per_row(1, 0) < cost.per_row(0, 0) and cost.per_row(0, 5) < cost.per_row(0, 0)


def test_first_changes_finds_the_first_position_a_write_changes():
    source = torch.zeros(1, 5, 2, 3)  # z: [input, pos, head, d_head]; the unpatched run is all zeros
    source[0, 3, 1, 2] = 1.0
    source[0, 4, 0, 0] = 1.0
    components = [Component(0), Component(0, head=0), Component(0, head=1), Component(0, 2, 1), Component(0, 3, 1)]
    components.append(Component(0, 3, 0))
    plan = PatchPlan(
        "z",
        torch.zeros(1, 5, dtype=torch.long),
        components,
        [0] * 6,
        [0] * 6,
        {0: source},
        list(range(5)),
        list(range(5)),
    )
    assert reuse.first_changes(plan, {0: torch.zeros(1, 5, 2, 3)}).tolist() == [3, 4, 3, -1, 3, -1]
    # Positions paired up by align: target 1 reads source 3, target 2 reads source 4.
    shifted = PatchPlan(
        "z", torch.zeros(1, 5, dtype=torch.long), components[:3], [0] * 3, [0] * 3, {0: source}, [0, 1, 2], [0, 3, 4]
    )
    assert reuse.first_changes(shifted, {0: torch.zeros(1, 5, 2, 3)}).tolist() == [1, 2, 1]
    # A pattern is [input, head, query, key]; positions are queries.
    pattern = torch.zeros(1, 2, 4, 4)
    pattern[0, 1, 2, 0] = 0.5
    plan = PatchPlan(
        "pattern",
        torch.zeros(1, 4, dtype=torch.long),
        [Component(0), Component(0, head=0)],
        [0, 0],
        [0, 0],
        {0: pattern},
        list(range(4)),
        list(range(4)),
    )
    assert reuse.first_changes(plan, {0: torch.zeros(1, 2, 4, 4)}).tolist() == [2, -1]


@pytest.mark.parametrize(
    "device",
    ["meta", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_index_tensors_reach_a_device_in_one_copy(device):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ in ("_to_copy", "copy_") and str(kwargs.get("device", "")) != "":
                CountCopies.copies += 1
            return func(*args, **kwargs)

    rows, positions, heads = torch.tensor([[3], [1]]), torch.arange(5)[None, :], torch.tensor([2, 0, 1])
    with CountCopies():
        moved = moved_together([rows, positions, heads], torch.device(device))
    assert CountCopies.copies == 1
    assert [t.shape for t in moved] == [rows.shape, positions.shape, heads.shape]
    assert all(t.device.type == device and t.dtype == torch.long for t in moved)
    if device != "meta":
        assert [t.cpu().tolist() for t in moved] == [rows.tolist(), positions.tolist(), heads.tolist()]
        back = moved_together(moved, torch.device("cpu"))  # and to the host in one copy too
        assert [t.tolist() for t in back] == [rows.tolist(), positions.tolist(), heads.tolist()]
    assert moved_together([rows], torch.device("cpu"))[0] is rows  # nothing to move


FIRST_CALLS = """
import json, sys, torch
import anylens as al
from anylens.datasets import ioi_pairs

model = al.load("zoo:llama")
pair = ioi_pairs(model.tokenizer, 1)[0]
metric = al.metrics.logit_diff(pair.answer, pair.distractor)
runs = [
    torch.tensor(al.patch(model, pair.clean, pair.corrupt, role=role, over=over, metric=metric).frame["metric"].to_numpy())
    for role, over in [("resid_pre", ("layer", "pos")), ("z", ("layer", "head"))]
    for _ in range(2)
]
json.dump([torch.equal(runs[0], runs[1]), torch.equal(runs[2], runs[3]), float((runs[0] - runs[1]).abs().max())], sys.stdout)
"""


@pytest.mark.slow
def test_the_first_patch_in_a_process_equals_the_later_ones_bit_for_bit():
    """Reuse checks each new shortcut once per process; the check must not change any result.
    (Unpatched check rows run inside a batch made it larger, and matrix products over a
    batch of another size round differently: the first call differed from later ones.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    source = str(Path(al.__file__).parents[1])
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, env=environment, timeout=120, check=True
    )
    same_resid, same_z, largest = json.loads(done.stdout)
    assert same_resid and same_z, f"first and second call differ by up to {largest}"
