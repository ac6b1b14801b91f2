"""Sweeps: chunks on disk, resumption, damaged chunks, refused reconfiguration, aggregates, CLI.

Tiny random models from ``anylens.testing`` stand in for real ones (``tiny:FAMILY`` sources).
Their tokenizer is a small byte-level BPE, so prompts and targets are chosen from its corpus,
where the words used here are single tokens.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from pandas.testing import assert_frame_equal

import anylens as al
from anylens.datasets import factual_pairs
from anylens.experiments.statistics import STAT_COLUMNS
from anylens.sweep import (
    SweepBusyError,
    SweepConfigError,
    SweepIntegrityError,
    SweepWarning,
    aggregate,
    load_results,
)
from anylens.sweep.cli import add_run_parser, read_prompts, run_cli
from anylens.sweep.experiments import as_items
from anylens.sweep.store import MANIFEST, Store, frame_to_payload, payload_to_frame, sha256_bytes, write_atomic
from anylens.testing import tiny

MODELS = ["tiny:gpt2", "tiny:llama"]
PROMPTS = [
    "The capital of France is",
    "The cat sat on the",
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is in",
    "the dog sat on the log",
]
CHUNK = 2  # 5 prompts -> chunks of 2, 2, 1 per model: 6 chunks in all
N_CHUNKS = len(MODELS) * math.ceil(len(PROMPTS) / CHUNK)
LENS = dict(metric=[" Paris"])


def sweep(out, **overrides):
    arguments = dict(models=MODELS, prompts=PROMPTS, out=out, chunk_size=CHUNK, quiet=True, **LENS)
    arguments.update(overrides)
    return al.run("logit_lens", **arguments)


def sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [c for c in ("model", "prompt", "layer", "pos", "target") if c in frame.columns]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted sweep: what every resumed or repaired sweep must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    result = sweep(out)
    return out, result


@pytest.fixture
def calls(monkeypatch):
    """Counts logit-lens calls (one per prompt); ``calls.fail_after = k`` raises on call k + 1."""
    import anylens.experiments.logit_lens as module

    original = module.logit_lens
    state = argparse.Namespace(count=0, fail_after=None)

    @functools.wraps(original)
    def counting(*args, **kwargs):
        if state.fail_after is not None and state.count >= state.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        state.count += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "logit_lens", counting)
    return state


def copy_of(reference, tmp_path):
    """A finished sweep to damage, without paying for computing it again."""
    out = tmp_path / "sweep"
    shutil.copytree(reference[0], out)
    return out


def chunk_hashes(out) -> dict[str, str]:
    manifest = json.loads((out / MANIFEST).read_text())
    return {key: entry["sha256"] for key, entry in manifest["chunks"].items()}


# -- (a) chunks, manifest, tidy frame ---------------------------------------------------------
def test_run_writes_chunks_manifest_and_a_tidy_frame(reference):
    out, result = reference
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is True
    config = manifest["config"]
    assert config["experiment"] == "logit_lens"
    assert config["models"] == MODELS
    assert config["chunk_size"] == CHUNK
    assert config["options"] == {"metric": [" Paris"]}
    assert config["prompts"]["count"] == len(PROMPTS) and len(config["prompts"]["sha256"]) == 64
    identities = list(manifest["models"].values())
    assert [m["source"] for m in identities] == MODELS
    assert [m["adapter"] for m in identities] == ["gpt2", "llama"]
    assert all(m["parameters"] > 0 and len(m["config_sha256"]) == 64 for m in identities)
    versions = manifest["runs"][0]["environment"]
    assert {"anylens", "torch", "transformers", "nnsight", "python"} <= set(versions)

    assert len(manifest["chunks"]) == N_CHUNKS
    for entry in manifest["chunks"].values():
        data = (out / entry["file"]).read_bytes()
        assert sha256_bytes(data) == entry["sha256"] and len(data) == entry["bytes"]
    assert not list(out.rglob("*.tmp"))

    frame = load_results(out)
    assert {"model", "chunk", "prompt", "layer", "pos", "value", "pos_from_end"} <= set(frame.columns)
    assert list(dict.fromkeys(frame["model"])) == MODELS
    assert sorted(frame["prompt"].unique()) == list(range(len(PROMPTS)))
    assert_frame_equal(result.frame, frame)

    # Every row is the logit lens of its own prompt, computed alone.
    model = tiny("llama")
    direct = al.logit_lens(model, PROMPTS[2], **LENS).frame
    rows = frame[(frame["model"] == "tiny:llama") & (frame["prompt"] == 2)].reset_index(drop=True)
    assert len(rows) == len(direct) == model.n_layers * len(model.to_str_tokens(PROMPTS[2]))
    np.testing.assert_array_equal(rows["value"].to_numpy(), direct["value"].to_numpy())
    np.testing.assert_array_equal(rows["pos"].to_numpy(), direct["pos"].to_numpy())
    assert (rows["pos_from_end"] == rows["pos"] - len(model.to_str_tokens(PROMPTS[2]))).all()


# -- (b) interruption and resumption ------------------------------------------------------------
def test_an_interrupted_sweep_resumes_and_equals_an_uninterrupted_one(tmp_path, reference, calls):
    calls.fail_after = 3  # prompts 0, 1 (chunk 0) and 2 done; the interruption hits prompt 3
    with pytest.raises(KeyboardInterrupt):
        sweep(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["complete"] is False
    assert list(manifest["chunks"]) == ["00-tiny-gpt2/00000"]  # the half-done chunk is not recorded
    with pytest.warns(SweepWarning, match="unfinished"):
        partial = load_results(tmp_path)
    assert sorted(partial["prompt"].unique()) == [0, 1]

    calls.fail_after, calls.count = None, 0
    resumed = sweep(tmp_path)
    assert calls.count == 2 * len(PROMPTS) - 2  # every prompt of both models but the finished chunk's two
    assert resumed.skipped == ["00-tiny-gpt2/00000"] and len(resumed.computed) == N_CHUNKS - 1
    assert_frame_equal(sorted_frame(resumed.frame), sorted_frame(reference[1].frame))
    assert chunk_hashes(tmp_path) == chunk_hashes(reference[0])  # byte-identical chunk files


def test_rerunning_a_finished_sweep_computes_nothing_and_loads_no_model(reference, calls, monkeypatch):
    import anylens.sweep.runner as runner

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished model was loaded again")

    monkeypatch.setattr(runner, "load_source", no_loading)
    again = sweep(reference[0])
    assert calls.count == 0 and again.computed == [] and len(again.skipped) == N_CHUNKS
    assert_frame_equal(again.frame, reference[1].frame)


def test_deleted_chunk_files_are_recomputed_and_only_they(tmp_path, reference, calls):
    out = copy_of(reference, tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    (out / manifest["chunks"]["01-tiny-llama/00001"]["file"]).unlink()  # prompts 2 and 3
    with pytest.warns(SweepWarning, match="missing"):
        repaired = sweep(out)
    assert calls.count == 2
    assert repaired.recomputed == ["01-tiny-llama/00001"] and repaired.computed == ["01-tiny-llama/00001"]
    assert_frame_equal(sorted_frame(repaired.frame), sorted_frame(reference[1].frame))


# -- (c) damaged chunks -------------------------------------------------------------------------
def _flip(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] = ord("7") if data[middle] != ord("7") else ord("3")
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["flipped-byte", "truncated"])
def test_a_damaged_chunk_is_detected_and_recomputed(tmp_path, reference, calls, damage):
    out = copy_of(reference, tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    damage(out / manifest["chunks"]["00-tiny-gpt2/00002"]["file"])  # the last prompt, alone

    with pytest.raises(SweepIntegrityError, match="00002"):
        load_results(out)
    with pytest.warns(SweepWarning, match="damaged"):
        repaired = sweep(out)
    assert calls.count == 1 and repaired.recomputed == ["00-tiny-gpt2/00002"]
    assert_frame_equal(sorted_frame(load_results(out)), sorted_frame(reference[1].frame))
    assert chunk_hashes(out) == chunk_hashes(reference[0])


# -- progress -----------------------------------------------------------------------------------
def test_progress_bars_show_the_sweep_and_each_model_unless_quiet(tmp_path, reference, capsys):
    out = copy_of(reference, tmp_path)
    for chunk in ("00-tiny-gpt2/00002", "01-tiny-llama/00002"):
        (out / "chunks" / f"{chunk}.json").unlink()
    with pytest.warns(SweepWarning):
        sweep(out, quiet=False)
    shown = capsys.readouterr().err
    assert "logit_lens sweep" in shown and "2/2" in shown and "tiny:gpt2" in shown and "tiny:llama" in shown
    sweep(out, quiet=True)
    assert capsys.readouterr().err == ""


# -- (d) a different configuration is refused ------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(chunk_size=3), "chunk_size: 2 on disk, 3 now"),
        (dict(metric=[" Rome"]), "options.metric"),
        (dict(models=["tiny:gpt2"]), "models"),
        (dict(prompts=PROMPTS[:4]), "prompts.count: 5 on disk, 4 now"),
        (dict(role="resid_pre"), "options.role: absent on disk"),
    ],
)
def test_a_different_configuration_into_the_same_directory_is_refused(reference, calls, change, named):
    before = (reference[0] / MANIFEST).read_bytes()
    with pytest.raises(SweepConfigError) as caught:
        sweep(reference[0], **change)
    message = str(caught.value)
    assert named in message and "another out" in message and "delete" in message
    assert isinstance(caught.value, al.AnylensError)
    assert calls.count == 0 and (reference[0] / MANIFEST).read_bytes() == before


def test_a_model_that_changed_under_its_source_is_refused(tmp_path, reference, calls):
    out = copy_of(reference, tmp_path)
    store = Store(out)
    manifest = store.read_manifest()
    manifest["models"]["01-tiny-llama"]["parameters"] += 1  # as if the weights behind the source were replaced
    store.write_manifest(manifest)
    (out / manifest["chunks"]["01-tiny-llama/00000"]["file"]).unlink()  # so that the model must load
    with pytest.warns(SweepWarning), pytest.raises(SweepConfigError, match="parameters"):
        sweep(out)
    assert calls.count == 0


def test_bad_arguments_are_refused_before_any_model_loads(tmp_path, calls):
    with pytest.raises(SweepConfigError, match="does not take 'targts'"):
        al.run("logit_lens", models=MODELS, prompts=PROMPTS, out=tmp_path, targts=[" Paris"])
    with pytest.raises(SweepConfigError, match="no corrupt partner"):
        al.run("patch", models=MODELS, prompts=PROMPTS, out=tmp_path)
    with pytest.raises(SweepConfigError, match="unknown experiment"):
        al.run("lens", models=MODELS, prompts=PROMPTS, out=tmp_path)
    with pytest.raises(SweepConfigError, match="listed twice"):
        al.run("logit_lens", models=["tiny:gpt2", "tiny:gpt2"], prompts=PROMPTS, out=tmp_path)
    with pytest.raises(SweepConfigError, match="answer and distractor"):
        al.run("ablate", models=MODELS, prompts=PROMPTS, out=tmp_path, metric="logit_diff")
    with pytest.raises(SweepConfigError, match="either prompts"):
        al.run("logit_lens", models=MODELS, prompts=PROMPTS, dataset="ioi", out=tmp_path)
    assert calls.count == 0 and not (tmp_path / MANIFEST).exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_directory(tmp_path):
    with Store(tmp_path).locked(), pytest.raises(SweepBusyError, match="another process"):
        sweep(tmp_path)


# -- datasets generated per model ------------------------------------------------------------
def test_a_dataset_sweep_tracks_each_prompts_own_answer(tmp_path, monkeypatch):
    result = al.run("logit_lens", models=MODELS, dataset="factual", n=3, out=tmp_path, chunk_size=2, quiet=True)
    manifest = result.manifest
    assert manifest["config"]["prompts"] == {"kind": "dataset", "dataset": "factual", "n": 3, "options": {}}
    pairs = factual_pairs(tiny("gpt2").tokenizer)[:3]
    for identity in manifest["models"].values():
        assert identity["n_prompts"] == 3 and identity["n_chunks"] == 2 and len(identity["prompts_sha256"]) == 64
    frame = result.frame
    for index, pair in enumerate(pairs):
        rows = frame[(frame["prompt"] == index) & (frame["model"] == "tiny:gpt2")]
        assert dict(zip(rows["target_role"], rows["target"])) == {
            "answer": pair.answer,
            "distractor": pair.corrupt_answer,
        }

    import anylens.sweep.runner as runner

    monkeypatch.setattr(runner, "load_source", lambda *a, **k: pytest.fail("a finished model was loaded again"))
    assert (
        al.run("logit_lens", models=MODELS, dataset="factual", n=3, out=tmp_path, chunk_size=2, quiet=True).computed
        == []
    )


# -- patching over pairs, with the metric built per pair ------------------------------------------
def test_patch_sweep_builds_each_pairs_metric_from_its_answer_and_distractor(tmp_path):
    pairs = [
        ("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
        ("The capital of Italy is", "The capital of France is", " Rome", " Paris"),
    ]
    result = al.run(
        "patch", models=["tiny:gpt2"], prompts=pairs, out=tmp_path, chunk_size=1, quiet=True, metric="logit_diff"
    )
    frame = result.frame
    assert (frame["value"] == frame["normalized"]).all()
    model = tiny("gpt2")
    for index, (clean, corrupt, answer, distractor) in list(enumerate(pairs))[1:]:
        direct = al.patch(model, clean, corrupt, metric=al.metrics.logit_diff(answer, distractor)).frame
        rows = frame[frame["prompt"] == index].reset_index(drop=True)
        np.testing.assert_array_equal(rows["metric"].to_numpy(), direct["metric"].to_numpy())
    with pytest.raises(SweepConfigError, match="answer and distractor"):
        al.run(
            "patch",
            models=["tiny:gpt2"],
            prompts=[p[:2] for p in pairs],
            out=tmp_path / "bare",
            quiet=True,
            metric="logit_diff",
        )


# -- ablation: the reference batch comes from the sweep's prompts ---------------------------------
def test_mean_ablation_takes_its_mean_over_the_sweeps_prompts_of_the_same_length(tmp_path):
    prompts = [
        "The capital of France is",
        "the dog sat on the log",
        "The capital of Italy is",
        "the cat sat on the mat",
    ]
    options = dict(method="mean", role="mlp_out", over=["layer"])
    result = al.run("ablate", models=["tiny:gpt2"], prompts=prompts, out=tmp_path, chunk_size=1, quiet=True, **options)
    frame = result.frame
    model = tiny("gpt2")
    for index, prompt in enumerate(prompts[:2]):  # one prompt of each length
        same_length = [p for p in prompts if len(model.to_str_tokens(p)) == len(model.to_str_tokens(prompt))]
        assert len(same_length) == 2
        direct = al.ablate(model, prompt, reference=same_length, **options).frame
        rows = frame[frame["prompt"] == index]
        np.testing.assert_array_equal(rows["value"].to_numpy(), direct["value"].to_numpy())
        assert (rows["value"] != 0).any()  # a mean over the prompt alone would change nothing

    with pytest.raises(SweepConfigError, match="same token length"):
        al.run("ablate", models=["tiny:gpt2"], prompts=prompts[:3], out=tmp_path / "lone", quiet=True, **options)


# -- (e) aggregates -------------------------------------------------------------------------------
def test_aggregate_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "model": np.repeat(["a", "b"], 12),
            "layer": np.tile(np.repeat([0, 1, 2], 4), 2),
            "prompt": np.tile(range(4), 6),
        }
    )
    frame["value"] = rng.normal(size=len(frame))
    frame.loc[5, "value"] = np.nan  # left out of its group's statistics
    got = aggregate(frame)
    assert list(got.columns) == ["model", "layer", "mean", "std", "count", "ci_low", "ci_high", *STAT_COLUMNS]
    assert len(got) == 6
    for row in got.itertuples():
        values = frame[(frame["model"] == row.model) & (frame["layer"] == row.layer)]["value"].dropna().to_numpy()
        mean, std, n = values.mean(), values.std(ddof=1), len(values)
        assert row.count == n
        assert row.mean == pytest.approx(mean, abs=1e-12)
        assert row.std == pytest.approx(std, abs=1e-12)
        assert row.ci_low == pytest.approx(mean - 1.96 * std / np.sqrt(n), abs=1e-3 * std)
        assert row.ci_high == pytest.approx(mean + 1.96 * std / np.sqrt(n), abs=1e-3 * std)
    assert got.loc[(got["model"] == "a") & (got["layer"] == 1), "count"].item() == 3

    single = aggregate(frame.iloc[:1], by=["model"])
    assert single["count"].item() == 1 and np.isnan(single["std"].item()) and np.isnan(single["ci_low"].item())


def test_aggregate_of_a_sweep_groups_over_prompts(reference):
    frame = reference[1].frame
    got = reference[1].aggregate(by=["model", "layer", "pos_from_end"])
    last = got[got["pos_from_end"] == -1]
    assert (last["count"] == len(PROMPTS)).all() and len(last) == 2 * 3  # 2 models x 3 layers
    row = last.iloc[0]
    values = frame[(frame["model"] == row["model"]) & (frame["layer"] == row["layer"]) & (frame["pos_from_end"] == -1)][
        "value"
    ]
    assert row["mean"] == pytest.approx(values.astype(float).mean())

    per_model = reference[1].results(by=["model", "layer", "pos_from_end"])
    assert list(per_model) == MODELS
    llama = per_model["tiny:llama"]
    mean = got[(got["model"] == "tiny:llama")]["mean"].to_numpy()
    np.testing.assert_array_equal(llama.frame["value"].to_numpy(), mean)
    assert llama.pivot("layer", "pos_from_end").shape == (
        3,
        frame[frame["model"] == "tiny:llama"]["pos_from_end"].nunique(),
    )
    # The per-model results keep the significance of each cell, which the heatmap marks.
    stars = [t for t in llama.plot("layer", "pos_from_end", significant=True).axes[0].texts if t.get_text() == "*"]
    assert len(stars) == int(llama.frame["significant"].sum())


# -- storage ------------------------------------------------------------------------------------
def test_chunk_frames_round_trip_exactly():
    frame = pd.DataFrame(
        {
            "value": np.random.default_rng(1).normal(size=4) / 3,
            "half": np.array([0.1, 1e-30, -2.5, np.nan], dtype="float32"),
            "head": pd.array([1, None, 3, 0], dtype="Int64"),
            "token": ["a", " b", "ü", "\t"],
            "flag": [True, False, True, True],
        }
    )
    back = payload_to_frame(json.loads(json.dumps(frame_to_payload(frame))))
    assert_frame_equal(back, frame)


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "deep" / "file.json"
    write_atomic(target, b"first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


# -- (f) the command line ---------------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser(prog="anylens")
    add_run_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_resumes_a_sweep_and_refuses_a_changed_one(tmp_path, reference, capsys):
    # The same sweep as the reference, given on the command line, resumes the reference's files.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = copy_of(reference, tmp_path)
    for chunk in ("00-tiny-gpt2/00002", "01-tiny-llama/00002"):
        (out / "chunks" / f"{chunk}.json").unlink()
    argv = [
        "run",
        "logit_lens",
        "--models",
        *MODELS,
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--chunk-size",
        "2",
        "--quiet",
    ]
    argv += ["--set", 'metric=[" Paris"]']
    args = _parse(argv)
    assert args.run is run_cli
    with pytest.warns(SweepWarning, match="missing"):
        assert run_cli(args) == 0
    assert f"2 chunks computed, {N_CHUNKS - 2} already done" in capsys.readouterr().out
    assert_frame_equal(load_results(out), reference[1].frame)

    assert run_cli(_parse(argv)) == 0
    assert f"0 chunks computed, {N_CHUNKS} already done" in capsys.readouterr().out

    assert run_cli(_parse([*argv[:-2], "--set", 'metric=[" Rome"]'])) == 2
    error = capsys.readouterr().err
    assert error.startswith("anylens run: error:") and "options.metric" in error


def test_cli_patches_over_a_dataset_and_reports_bad_arguments(tmp_path, capsys):
    out = tmp_path / "patch"
    argv = ["run", "patch", "--models", "tiny:gpt2", "--dataset", "factual", "--n", "2", "--out", str(out), "--quiet"]
    assert run_cli(_parse([*argv, "--metric", "logit_diff", "--role", "resid_pre", "--over", "layer,pos"])) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["config"]["options"] == {"metric": "logit_diff", "role": "resid_pre", "over": ["layer", "pos"]}
    assert manifest["config"]["prompts"] == {"kind": "dataset", "dataset": "factual", "n": 2, "options": {}}
    assert manifest["models"]["00-tiny-gpt2"]["n_prompts"] == 2
    frame = load_results(out)
    pair = factual_pairs(tiny("gpt2").tokenizer)[1]
    direct = al.patch(
        tiny("gpt2"), pair.clean, pair.corrupt, metric=al.metrics.logit_diff(pair.answer, pair.corrupt_answer)
    ).frame
    np.testing.assert_array_equal(frame[frame["prompt"] == 1]["metric"].to_numpy(), direct["metric"].to_numpy())

    assert run_cli(_parse([*argv, "--set", "oops"])) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert run_cli(_parse([*argv, "--set", "directoin=noise"])) == 2
    assert "does not take 'directoin'" in capsys.readouterr().err
    bad_model = [
        "run",
        "logit_lens",
        "--models",
        "tiny:nope",
        "--dataset",
        "factual",
        "--out",
        str(tmp_path / "x"),
        "--quiet",
    ]
    assert run_cli(_parse(bad_model)) == 2
    assert "no tiny model family 'nope'" in capsys.readouterr().err


def test_memory_budget_reaches_the_experiment_but_not_the_configuration(tmp_path, monkeypatch, capsys):
    import anylens.experiments.patching as patching

    budgets = []
    original = patching.patch
    monkeypatch.setattr(patching, "patch", lambda *a, **k: budgets.append(k.get("memory_budget")) or original(*a, **k))
    out = tmp_path / "patch"
    argv = ["run", "patch", "--models", "tiny:gpt2", "--dataset", "factual", "--n", "2", "--out", str(out), "--quiet"]
    assert run_cli(_parse([*argv, "--memory-budget", "64MiB", "--set", "batch_size=3"])) == 0
    assert budgets and set(budgets) == {64 * 2**20}  # a call per token length of the two pairs
    assert "memory_budget" not in json.loads((out / MANIFEST).read_text())["config"]["options"]
    first = load_results(out)
    # A rerun with another budget resumes the same sweep (the results do not depend on it).
    (out / "chunks" / "00-tiny-gpt2" / "00000.json").unlink()
    with pytest.warns(SweepWarning, match="missing"):
        assert run_cli(_parse([*argv, "--memory-budget", "1.5GB"])) == 0
    assert budgets[-1] == 1_500_000_000
    # Equal up to float32 rounding: a different batching sums in a different order. (``normalized``
    # divides by the tiny random model's small clean - corrupt gap, which magnifies that rounding.)
    resumed = load_results(out)
    magnified = ["normalized", "value"]  # value is the normalized score
    assert_frame_equal(
        resumed.drop(columns=magnified), first.drop(columns=magnified), check_exact=False, atol=1e-6, rtol=0
    )

    with pytest.raises(SystemExit):
        _parse([*argv, "--memory-budget", "lots"])
    assert "is not a size" in capsys.readouterr().err
    assert run_cli(_parse(["run", "logit_lens", *argv[2:], "--memory-budget", "1GB"])) == 2
    assert "does not take 'memory_budget'" in capsys.readouterr().err


def test_prompt_files_give_prompts_or_tab_separated_pairs(tmp_path):
    text = tmp_path / "pairs.tsv"
    text.write_text("The capital of France is\tThe capital of Italy is\t Paris\t Rome\n\nThe cat sat on the\n")
    assert read_prompts(text) == [
        ("The capital of France is", "The capital of Italy is", " Paris", " Rome"),
        "The cat sat on the",
    ]
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps([{"clean": "a", "corrupt": "b", "answer": " c"}, "d"]))
    items = as_items(read_prompts(listed))
    assert items[0].corrupt == "b" and items[0].answer == " c" and items[1].clean == "d" and items[1].corrupt is None
