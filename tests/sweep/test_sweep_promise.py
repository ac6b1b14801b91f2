"""Sweeps keep their promise: a resumed sweep equals an uninterrupted one bit for bit, a model whose
weights changed is refused, a lost manifest is rebuilt from the chunks, files honour the umask.

The fast tests use the tiny random models (``tiny:FAMILY``); the slow one kills ``al.run`` in a
subprocess at random points on a zoo model, where the batching of patched runs is what decides
the last bits of a result.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pandas.testing import assert_frame_equal
from test_sweep import PROMPTS, _flip, calls, chunk_hashes, copy_of, reference, sorted_frame, sweep  # noqa: F401

import anylens as al
from anylens.engine.memory import FIXED_BUDGET_BYTES
from anylens.sweep import SweepConfigError, SweepWarning, SweepWeightsChangedError, load_results
from anylens.sweep.fingerprint import weights_fingerprint
from anylens.sweep.store import MANIFEST, Store, write_atomic
from anylens.testing import tiny


# -- file permissions -----------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_permissions_the_umask_gives_new_files(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_atomic(tmp_path / "manifest.json", b"{}")
        entry = Store(tmp_path).write_chunk("00-x/00000", {"frame": {}})
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what open() gives a new file under this umask
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert plain.stat().st_mode & 0o777 == expected
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == expected
    assert (tmp_path / entry["file"]).stat().st_mode & 0o777 == expected


# -- the weights' fingerprint -----------------------------------------------------------------------
@pytest.mark.parametrize("sampled", [False, True], ids=["whole", "sampled"])
def test_the_weights_fingerprint_changes_with_the_weights_only(sampled):
    limit = 0 if sampled else 1 << 30  # 0: every model counts as large and is sampled
    first, second = tiny("gpt2"), tiny("gpt2")
    assert weights_fingerprint(first, limit) == weights_fingerprint(second, limit)
    assert weights_fingerprint(first, limit)["method"] == ("sampled-sha256" if sampled else "sha256")
    with torch.no_grad():
        weight = next(p for p in second.hf.parameters() if p.numel() > 4096)
        weight.view(-1)[0] += 1e-3  # the first element is always among the samples
    assert weights_fingerprint(first, limit)["sha256"] != weights_fingerprint(second, limit)["sha256"]


def test_the_whole_fingerprint_is_the_sha256_of_names_dtypes_shapes_and_bytes():
    """Computed here from copies of every tensor's bytes: a fingerprint recorded by an earlier
    anylens must still match, whatever way the bytes reach the hash."""
    import hashlib

    model = tiny("gpt2")
    digest = hashlib.sha256()
    for name, tensor in sorted(model.hf.state_dict().items()):
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    assert weights_fingerprint(model)["sha256"] == digest.hexdigest()


def _local_model(directory: Path, seed: int) -> str:
    """A tiny model saved as a local directory (what a user's fine-tuned checkpoint looks like)."""
    model = tiny("llama", seed=seed)
    model.hf.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    return str(directory)


def test_a_new_models_fingerprint_taken_while_it_computes_is_recorded_before_its_chunks(tmp_path, calls):  # noqa: F811
    source = _local_model(tmp_path / "model", seed=0)
    expected = weights_fingerprint(al.load(source))
    out = tmp_path / "sweep"
    calls.fail_after = 1  # interrupted in its first chunk: nothing written but the model's entry
    with pytest.raises(KeyboardInterrupt):
        sweep(out, models=[source])
    (entry,) = json.loads((out / MANIFEST).read_text())["models"].values()
    assert "weights" not in entry and not list(out.glob("chunks/*/*.json"))
    calls.fail_after = None
    sweep(out, models=[source])
    (entry,) = json.loads((out / MANIFEST).read_text())["models"].values()
    assert entry["weights"] == expected
    chunks = [json.loads(path.read_text()) for path in out.glob("chunks/*/*.json")]
    assert chunks and all(chunk["identity"]["weights"] == expected for chunk in chunks)


def test_a_resume_on_changed_weights_is_refused_and_fresh_starts_over(tmp_path, calls):  # noqa: F811
    source = _local_model(tmp_path / "model", seed=0)
    out = tmp_path / "sweep"
    calls.fail_after = 3  # chunk 0 (prompts 0, 1) finished, then interrupted
    with pytest.raises(KeyboardInterrupt):
        sweep(out, models=[source])
    _local_model(tmp_path / "model", seed=1)  # retrained in place between the kill and the resume
    calls.fail_after, calls.count = None, 0
    with pytest.raises(SweepWeightsChangedError) as caught:
        sweep(out, models=[source])
    assert isinstance(caught.value, SweepConfigError) and isinstance(caught.value, al.AnylensError)
    message = str(caught.value)
    assert source in message and "fresh=True" in message and "--fresh" in message and "another out" in message
    assert calls.count == 0

    with pytest.warns(SweepWarning, match="discarding"):
        fresh = sweep(out, models=[source], fresh=True)
    assert calls.count == len(PROMPTS) and fresh.skipped == [] and len(fresh.computed) == 3
    # Every row comes from the new weights, computed independently here.
    direct = al.logit_lens(al.load(source), PROMPTS[0], metric=[" Paris"]).frame
    rows = fresh.frame[fresh.frame["prompt"] == 0].reset_index(drop=True)
    np.testing.assert_array_equal(rows["value"].to_numpy(), direct["value"].to_numpy())


def test_fresh_on_the_command_line_discards_another_sweep_and_recomputes_it(tmp_path, reference, capsys):  # noqa: F811
    from test_sweep import MODELS, N_CHUNKS, _parse

    from anylens.sweep.cli import run_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = copy_of(reference, tmp_path)
    argv = ["run", "logit_lens", "--models", *MODELS, "--prompts", str(prompts), "--out", str(out), "--quiet"]
    argv += ["--chunk-size", "2", "--set", 'metric=[" Rome"]']
    assert run_cli(_parse(argv)) == 2  # another configuration: refused, and kept
    assert "--fresh" in capsys.readouterr().err
    with pytest.warns(SweepWarning, match=f"discarding the sweep in {out} \\({N_CHUNKS} chunk files\\)"):
        assert run_cli(_parse([*argv, "--fresh"])) == 0
    assert f"{N_CHUNKS} chunks computed, 0 already done" in capsys.readouterr().out
    assert set(load_results(out)["target"]) == {" Rome"}


# -- a lost or damaged manifest ----------------------------------------------------------------------
def _delete(path):
    path.unlink()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_delete, _truncate], ids=["deleted", "truncated"])
def test_a_lost_or_damaged_manifest_is_rebuilt_from_the_chunks(tmp_path, reference, calls, damage):  # noqa: F811
    out = copy_of(reference, tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    damage(out / MANIFEST)
    _flip(out / manifest["chunks"]["01-tiny-llama/00001"]["file"])  # prompts 2 and 3: recomputed
    with pytest.raises(SweepConfigError, match="rebuild"):
        load_results(out)
    with pytest.warns(SweepWarning, match="rebuilt it from the 5 chunk files") as caught:
        repaired = sweep(out)
    assert any("recomputing 1" in str(w.message) and "00001.json" in str(w.message) for w in caught)
    assert calls.count == 2 and repaired.computed == ["01-tiny-llama/00001"] and len(repaired.skipped) == 5
    assert_frame_equal(sorted_frame(load_results(out)), sorted_frame(reference[1].frame))
    assert chunk_hashes(out) == chunk_hashes(reference[0])
    rebuilt = json.loads((out / MANIFEST).read_text())
    assert rebuilt["models"] == manifest["models"] and rebuilt["complete"] is True


def test_chunks_of_another_configuration_are_not_adopted(tmp_path, reference, calls):  # noqa: F811
    out = copy_of(reference, tmp_path)
    (out / MANIFEST).unlink()
    with pytest.raises(SweepConfigError, match="not this sweep's") as caught:
        sweep(out, metric=[" Rome"])
    assert "another configuration" in str(caught.value) and "fresh=True" in str(caught.value)
    assert calls.count == 0 and not (out / MANIFEST).exists()


# -- batching that does not depend on the moment -------------------------------------------------------
def test_a_patch_sweep_batches_from_a_fixed_budget_not_from_free_memory(tmp_path, monkeypatch):
    import psutil

    import anylens.experiments.patching as patching

    def unmeasurable():
        raise AssertionError("a sweep read the free memory")

    monkeypatch.setattr(psutil, "virtual_memory", unmeasurable)
    budgets = []
    original = patching.patch

    @functools.wraps(original)  # the sweep reads the experiment's signature
    def recording(*args, **kwargs):
        budgets.append(kwargs.get("memory_budget"))
        return original(*args, **kwargs)

    monkeypatch.setattr(patching, "patch", recording)
    result = al.run(
        "patch", models=["tiny:gpt2"], dataset="factual", n=2, out=tmp_path, quiet=True, metric="logit_diff"
    )
    assert budgets and set(budgets) == {FIXED_BUDGET_BYTES} == {2 * 2**30}  # every call, one per token length
    execution = result.manifest["models"]["00-tiny-gpt2"]["execution"]
    assert execution == {"memory_budget": 2 * 2**30, "batch_size": None}


# -- killed at random points ------------------------------------------------------------------------
PATCH_SWEEP = dict(
    models=["zoo:llama"],
    dataset="ioi",
    n=8,
    chunk_size=1,
    quiet=True,
    role="resid_pre",
    over=("layer", "pos"),
    metric="logit_diff",
)
CHILD = f"""
import sys
import torch
import anylens as al

torch.set_num_threads({torch.get_num_threads()})  # as here: threads split sums, changing last bits
al.run("patch", out=sys.argv[1], **{PATCH_SWEEP!r})
"""


def _chunks_written(out: Path) -> int:
    return len(list(out.glob("chunks/*/*.json")))


@pytest.mark.slow
def test_a_sweep_killed_at_random_points_resumes_to_the_uninterrupted_results(tmp_path):
    """SIGKILLed three times at random points, resumed each time: the same results to the bit
    and the same chunk files as an uninterrupted run (here, in this process). Each process's
    first patch is its first use of reuse's shortcuts, which once changed the last bits."""
    uninterrupted = al.run("patch", out=tmp_path / "reference", **PATCH_SWEEP)
    out = tmp_path / "killed"
    source = str(Path(al.__file__).parents[1])
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")])))
    delays = random.Random(20261206)
    # Kill delays in units of a chunk's time on this machine (the reference's, past its first).
    seconds = sorted(entry["seconds"] for entry in uninterrupted.manifest["chunks"].values())[1:]
    chunk_seconds = seconds[len(seconds) // 2]
    for _ in range(3):
        before = _chunks_written(out)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stderr=subprocess.DEVNULL, env=environment)
        deadline = time.monotonic() + 120
        # Timed from a new chunk file, so that every kill lands after some progress, at a random
        # point of the chunks that follow (computing one, writing its file, or the manifest).
        while _chunks_written(out) <= before and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delays.uniform(0.0, 2.0) * chunk_seconds)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    subprocess.run(
        [sys.executable, "-c", CHILD, str(out)], env=environment, check=True, capture_output=True, timeout=120
    )

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is True
    assert len({entry["run"] for entry in manifest["chunks"].values()}) >= 2  # really computed in pieces
    assert_frame_equal(load_results(out), uninterrupted.frame, check_exact=True)
    assert chunk_hashes(out) == chunk_hashes(tmp_path / "reference")

    # The manifest damaged after the fact: rebuilt from the chunks, nothing recomputed.
    (out / MANIFEST).write_bytes((out / MANIFEST).read_bytes()[:100])
    with pytest.warns(SweepWarning, match="rebuilt"):
        again = al.run("patch", out=out, **PATCH_SWEEP)
    assert again.computed == [] and len(again.skipped) == PATCH_SWEEP["n"]
    assert_frame_equal(again.frame, uninterrupted.frame, check_exact=True)
