"""Sweeps batch across prompts: one call per group of a chunk's pairs with the same token lengths,
with the rows of each pair what a call on that pair alone gives (to float32 rounding).

The pair-by-pair reference is the same sweep with ``chunk_size=1``: every call then holds one
pair, as every call did before sweeps batched across pairs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_models import model_cache

import anylens as al
from anylens.testing import tiny

model_of = model_cache()

#: Two token lengths (5 and 14 tokens on the tiny tokenizer), interleaved, so that a chunk of
#: all six holds two groups and each group's pairs are not neighbours.
PAIRS = [
    ("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
    (
        "When Mary and John went to the store, John gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to",
        " Mary",
        " John",
    ),
    ("the cat sat on the", "the dog sat on the", " mat", " log"),
    ("The capital of Italy is", "The capital of France is", " Rome", " Paris"),
    (
        "When John and Mary went to the store, Mary gave a drink to",
        "When Mary and John went to the store, Mary gave a drink to",
        " John",
        " Mary",
    ),
    ("the dog sat on the", "the cat sat on the", " log", " mat"),
]
#: The bound on raw metric values (``metric``, ``baseline``, ``estimate``) between a pair computed
#: in a batch of pairs and alone, float32 (matrix products round by batch size; seen: <= 5e-7).
EPSILON = 1e-5
EXPERIMENTS = {
    "patch": dict(role="resid_pre", over=("layer", "pos")),
    "ablate": dict(role=["mlp_out", "mixer_out"], over=("layer", "pos"), method="mean"),
    "attribute": dict(role=["z", "mixer_out"], over=("layer",)),
}


def sweep(experiment: str, family: str, out: Path, chunk_size: int, **options) -> al.SweepResult:
    options = {**EXPERIMENTS[experiment], "metric": "logit_diff", **options}
    return al.run(
        experiment, models=[f"tiny:{family}"], prompts=PAIRS, out=out, chunk_size=chunk_size, quiet=True, **options
    )


def chunk_metas(out: Path) -> list[dict]:
    """Every prompt's meta, in prompt order, read from the chunk files."""
    files = sorted(out.glob("chunks/*/*.json"))
    return [meta for path in files for meta in json.loads(path.read_text())["meta"]]


def assert_same_rows(batched: pd.DataFrame, alone: pd.DataFrame, metas: list[dict]) -> None:
    """Every column but ``chunk`` equal, raw values within ``EPSILON`` and normalised scores
    within the bound that follows from it: n = (m - c0) / (c1 - c0) moves by at most
    2 EPSILON (1 + |n|) / |c1 - c0| when m, c0 and c1 each move by EPSILON."""
    batched, alone = batched.drop(columns="chunk"), alone.drop(columns="chunk")
    assert list(batched.columns) == list(alone.columns)
    floats = [c for c in batched.columns if batched[c].dtype.kind == "f"]
    others = [c for c in batched.columns if c not in floats]
    pd.testing.assert_frame_equal(batched[others], alone[others])
    for column in floats:
        got, want = batched[column].to_numpy(), alone[column].to_numpy()
        if column == "normalized" or (column == "value" and "normalized" in floats):
            gap = np.array([abs(m["clean_metric"] - m["corrupt_metric"]) for m in metas])[alone["prompt"]]
            bound = 2 * EPSILON * (1 + np.abs(want)) / gap
        else:
            bound = np.full(len(want), 2 * EPSILON if column == "value" else EPSILON)  # value = metric - baseline
        assert (np.abs(got - want) <= bound).all(), column


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_a_sweep_batched_across_pairs_gives_each_pair_its_own_rows(family, experiment, tmp_path):
    model_of(family)  # skips a family that cannot be built here
    batched = sweep(experiment, family, tmp_path / "batched", chunk_size=len(PAIRS))
    alone = sweep(experiment, family, tmp_path / "alone", chunk_size=1)
    assert_same_rows(batched.frame, alone.frame, chunk_metas(tmp_path / "alone"))
    metas = chunk_metas(tmp_path / "batched")
    assert [m["call_prompts"] for m in metas] == [4, 2, 4, 4, 2, 4]  # a call per token length
    assert [m["n_prompts"] for m in metas] == [1] * len(PAIRS)
    for meta, own in zip(metas, chunk_metas(tmp_path / "alone")):
        for key in ("tokens", "clean_tokens", "corrupt_tokens", "metric_spec"):
            assert meta.get(key) == own.get(key), key


def test_each_length_is_one_call_and_each_row_names_its_own_pairs_token(tmp_path, monkeypatch):
    import anylens.experiments.patching as patching

    calls = []
    original = patching.patch

    @functools.wraps(original)  # the sweep reads the experiment's signature
    def counting(model, clean, corrupt, **options):
        calls.append(list(clean))
        return original(model, clean, corrupt, **options)

    monkeypatch.setattr(patching, "patch", counting)
    frame = sweep("patch", "gpt2", tmp_path, chunk_size=4).frame  # chunks of pairs 0-3 and 4-5
    assert calls == [[PAIRS[0][0], PAIRS[2][0], PAIRS[3][0]], [PAIRS[1][0]], [PAIRS[4][0]], [PAIRS[5][0]]]
    assert sorted(frame["prompt"].unique()) == list(range(len(PAIRS)))
    tokenizer = tiny("gpt2").tokenizer
    for index, (_, corrupt, _, _) in enumerate(PAIRS):  # denoising patches the corrupt run
        ids = tokenizer(corrupt)["input_ids"]
        rows = frame[frame["prompt"] == index]
        assert list(rows["token"]) == [tokenizer.decode([ids[pos]]) for pos in rows["pos"]]
        assert (rows["pos_from_end"] == rows["pos"] - len(ids)).all()


def test_a_small_memory_budget_splits_the_batched_pairs_and_keeps_their_rows(tmp_path):
    roomy = sweep("patch", "gpt2", tmp_path / "roomy", chunk_size=len(PAIRS))
    tight = sweep("patch", "gpt2", tmp_path / "tight", chunk_size=len(PAIRS), memory_budget=64 * 2**10)
    roomy_meta, tight_meta = chunk_metas(tmp_path / "roomy"), chunk_metas(tmp_path / "tight")
    # The same calls (one per token length), run in more and smaller forwards.
    assert [m["call_prompts"] for m in tight_meta] == [m["call_prompts"] for m in roomy_meta]
    assert all(t["forwards"] > r["forwards"] for t, r in zip(tight_meta, roomy_meta))
    assert all(t["patches_per_forward"] < r["patches_per_forward"] for t, r in zip(tight_meta, roomy_meta))
    assert_same_rows(tight.frame, roomy.frame, roomy_meta)


def test_resampling_ablation_calls_each_prompt_alone(tmp_path, monkeypatch):
    """A resample draws each call's sources from one seeded generator: a batch would draw others."""
    import anylens.experiments.ablation as ablation

    sizes = []
    original = ablation.ablate

    @functools.wraps(original)
    def counting(model, prompts, **options):
        sizes.append(1 if isinstance(prompts, str) else len(prompts))
        return original(model, prompts, **options)

    monkeypatch.setattr(ablation, "ablate", counting)
    sweep("ablate", "gpt2", tmp_path, chunk_size=len(PAIRS), method="resample")
    assert sizes == [1] * len(PAIRS)


def test_named_positions_alignment_and_multi_token_answers_batch_as_pair_by_pair(tmp_path):
    """The prompt features of a researcher's dataset together: IOI pairs of several templates
    (several lengths), positions by name, align='auto' and a two-token answer, batched across pairs
    and one pair at a time."""
    from anylens.datasets import ioi_pairs

    model = al.load("zoo:gpt2")
    pairs = ioi_pairs(model.tokenizer, 6, seed=1)
    assert len({len(model.to_str_tokens(p.clean)) for p in pairs}) > 1
    options = dict(
        role="resid_pre",
        over=("layer", "pos"),
        positions=["S2", "END"],
        align="auto",
        metric=al.metrics.log_prob(" Mary John"),
        quiet=True,
    )

    def run(out: Path, chunk_size: int) -> al.SweepResult:
        return al.run("patch", models=["zoo:gpt2"], prompts=pairs, out=out, chunk_size=chunk_size, **options)

    batched, alone = run(tmp_path / "batched", len(pairs)), run(tmp_path / "alone", 1)
    assert max(m["call_prompts"] for m in chunk_metas(tmp_path / "batched")) > 1  # some pairs shared a call
    assert_same_rows(batched.frame, alone.frame, chunk_metas(tmp_path / "alone"))
    assert set(batched.frame["pos_label"]) == {"S2", "END"}
