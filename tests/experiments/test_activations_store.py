"""Activations on disk: al.extract's shards hold what plain torch hooks read, positions count real
tokens, shards are checksummed, bounded by the budget, resumable byte for byte after SIGKILL, and a
directory holding another configuration is refused without losing anything."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import hook_reference as ref
import pytest
import torch

import anylens as al

#: float32: a left-padded batch against each prompt alone (residuals reach ~50 in the zoo)
ATOL, RTOL = 1e-4, 1e-5
PROMPTS = [
    "The capital of France is",
    "You can visit the Eiffel Tower in",
    "The capital city of Italy is",
    "The Colosseum is in",
    "The capital of Japan is",
]
ZOO = ["gpt2", "llama", "mistral", "mamba"]


@functools.cache
def zoo(family: str) -> al.AnyModel:
    return al.load(f"zoo:{family}")


def hooked_block_io(hf: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """``resid_pre``/``resid_post`` of every block, ``[batch, pos, d_model]``, read with plain forward hooks."""
    seen = {}
    handles = []
    for layer in range(ref.n_layers(hf)):
        block = ref.block(hf, layer)

        def before(module, args, kwargs, layer=layer):
            seen[("resid_pre", layer)] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        def after(module, args, output, layer=layer):
            seen[("resid_post", layer)] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after))
    extra = {}
    if mask is not None and "position_ids" in inspect.signature(hf.forward).parameters:
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)  # a left-padded row counts from its first token
    try:
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=mask, **extra)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def left_padded(model: al.AnyModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = model.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return encoded["input_ids"], encoded["attention_mask"]


def ids_of(model: al.AnyModel, prompt: str) -> list[int]:
    return model.tokenizer(prompt)["input_ids"]


# -- values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ZOO)
def test_stored_rows_are_what_plain_hooks_read(family: str, tmp_path: Path) -> None:
    model = zoo(family)
    lengths = [len(ids_of(model, p)) for p in PROMPTS]
    assert len(set(lengths)) > 1, "the prompts must differ in length to exercise padding"
    acts = al.extract(
        model, PROMPTS, roles=["resid_pre", "resid_post"], out=tmp_path, batch_size=2, memory_budget=1, quiet=True
    )
    loaded = al.load_activations(tmp_path)
    assert len(loaded.manifest["shards"]) == 3  # a budget of one byte: one shard per batch
    assert len(loaded) == sum(lengths), "every real token once, no padding"
    prompt, position, token = loaded.prompt, loaded.position, loaded.token
    for start in range(0, len(PROMPTS), 2):
        # The same left-padded batch of two through the plain model: the same numbers exactly.
        ids, mask = left_padded(model, PROMPTS[start : start + 2])
        batch = hooked_block_io(model.hf, ids, mask)
        for row, index in enumerate(range(start, min(start + 2, len(PROMPTS)))):
            n = len(ids_of(model, PROMPTS[index]))
            rows = (prompt == index).nonzero().flatten()
            assert position[rows].tolist() == list(range(n))
            assert token[rows].tolist() == ids_of(model, PROMPTS[index]) == ids[row, -n:].tolist()
            # Each prompt alone, unpadded: equal up to float32 rounding (padding changes the sums).
            alone = hooked_block_io(model.hf, ids[row : row + 1, -n:])
            for layer in range(model.n_layers):
                for role in ("resid_pre", "resid_post"):
                    stored = loaded[role, layer][rows]
                    assert torch.equal(stored, batch[(role, layer)][row, -n:]), (role, layer, index)
                    torch.testing.assert_close(stored, alone[(role, layer)][0], atol=ATOL, rtol=RTOL)
    assert torch.equal(acts["resid_post", -1], loaded["resid_post", model.n_layers - 1])


def test_position_forms_count_real_tokens() -> None:
    model = zoo("gpt2")
    lengths = [len(ids_of(model, p)) for p in PROMPTS]
    every = al.extract(model, PROMPTS, roles="resid_post", layers=1, quiet=True)
    by_prompt_position = {(int(p), int(q)): i for i, (p, q) in enumerate(zip(every.prompt, every.position))}

    def rows(spec) -> list[tuple[int, int]]:
        acts = al.extract(model, PROMPTS, roles="resid_post", layers=1, positions=spec, quiet=True, batch_size=3)
        pairs = list(zip(acts.prompt.tolist(), acts.position.tolist()))
        # Each row equals the row of the same (prompt, position) among all positions.
        for row, pair in enumerate(pairs):
            assert torch.equal(acts["resid_post", 1][row], every["resid_post", 1][by_prompt_position[pair]])
        return pairs

    assert rows("last") == [(i, n - 1) for i, n in enumerate(lengths)]
    assert rows(0) == [(i, 0) for i in range(len(PROMPTS))]
    assert rows([1, -1]) == [pair for i, n in enumerate(lengths) for pair in ((i, 1), (i, n - 1))]
    per_prompt = [[i % 2] for i in range(len(PROMPTS))]
    assert rows(per_prompt) == [(i, i % 2) for i in range(len(PROMPTS))]
    assert rows("all") == rows(None) == [(i, q) for i, n in enumerate(lengths) for q in range(n)]


def test_the_stored_dtype_is_the_one_asked_for() -> None:
    model = zoo("llama")
    full = al.extract(model, PROMPTS, roles="resid_post", positions="last", quiet=True)
    half = al.extract(model, PROMPTS, roles="resid_post", positions="last", dtype="bfloat16", quiet=True)
    assert half["resid_post", 0].dtype == torch.bfloat16
    assert torch.equal(half["resid_post", 0], full["resid_post", 0].to(torch.bfloat16))


# -- the directory --------------------------------------------------------------------------------
def test_shards_are_checksummed_bounded_and_lazily_mapped(tmp_path: Path) -> None:
    model = zoo("gpt2")
    budget = 4000
    al.extract(model, PROMPTS * 4, roles=["resid_post"], out=tmp_path, batch_size=2, memory_budget=budget, quiet=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) > 1
    row_bytes = model.n_layers * model.d_model * 4  # float32 rows of every layer
    starts = []
    for entry in manifest["shards"]:
        data = (tmp_path / entry["file"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        # A shard closes after the batch that reaches the budget: at most one batch over it.
        most_rows_per_batch = 2 * max(len(ids_of(model, p)) for p in PROMPTS)
        assert entry["rows"] * row_bytes < budget + most_rows_per_batch * row_bytes
        starts.append(entry["prompts"])
    assert [s for s, _ in starts] == [0] + [e for _, e in starts[:-1]] and starts[-1][1] == len(PROMPTS) * 4
    # The model's identity includes the sha256 of its weights (every tensor of the state dict:
    # name, dtype, shape, bytes), as the sweeps record it.
    digest = hashlib.sha256()
    state = model.hf.state_dict()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert manifest["model"]["weights"] == {
        "method": "sha256",
        "sha256": digest.hexdigest(),
        "bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }

    acts = al.load_activations(tmp_path)
    piece = acts.shards("resid_post", 2)[0]
    if Path("/proc/self/maps").exists():
        # Backed by a memory map of the shard file, not by a copy.
        address = piece.data_ptr()
        maps = Path("/proc/self/maps").read_text().splitlines()
        shard = str((tmp_path / manifest["shards"][0]["file"]).resolve())
        mapped = [line for line in maps if line.endswith(shard)]
        assert any(int(a, 16) <= address < int(b, 16) for a, b in (line.split()[0].split("-") for line in mapped))


def test_dataset_items_carry_prompt_position_and_label(tmp_path: Path) -> None:
    model = zoo("mamba")
    labels = ["capital", "landmark", "capital", "landmark", "capital"]
    al.extract(model, PROMPTS, roles="mixer_out", layers=[0, 2], out=tmp_path, labels=labels, quiet=True)
    acts = al.load_activations(tmp_path)
    dataset = acts.dataset("mixer_out", 2)
    assert len(dataset) == len(acts)
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        item = dataset[index]
        assert torch.equal(item["activation"], acts["mixer_out", 2][index])
        assert item["prompt"] == int(acts.prompt[index]) and item["position"] == int(acts.position[index])
        assert item["label"] == labels[item["prompt"]]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["activation"].shape == (4, model.d_model) and list(batch["label"]) == [labels[0]] * 4


def test_cache_save_and_load_round_trip(tmp_path: Path) -> None:
    model = zoo("gpt2")
    cache = al.cache(
        model, PROMPTS[:3], roles=["resid_post", "pos_embed", "attn_out"], layers=[0, 2], positions=[-2, -1]
    )
    path = cache.save(tmp_path / "cache.safetensors")
    for loaded in (al.ActivationCache.load(path, model), al.ActivationCache.load(path)):
        assert loaded.keys() == cache.keys() and loaded.layers == cache.layers and loaded.positions == cache.positions
        assert torch.equal(loaded.tokens, cache.tokens) and torch.equal(loaded.attention_mask, cache.attention_mask)
        for key in cache:
            assert torch.equal(loaded[key], cache[key])
        assert torch.equal(loaded["resid_post", -2], cache["resid_post", 2])  # negative layers of 4
    assert al.ActivationCache.load(path, model).str_tokens == cache.str_tokens
    # nnsight's save() inside a trace is untouched.
    with torch.no_grad(), model.trace(PROMPTS[0]):
        kept = model.resid_post[0].save()
    assert isinstance(kept, torch.Tensor)


def test_another_configuration_is_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    model = zoo("gpt2")
    al.extract(model, PROMPTS, roles="resid_post", layers=[0], out=tmp_path, batch_size=2, memory_budget=1, quiet=True)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(al.ActivationsConfigError, match=r"layers: \[0\] on disk, \[1\] now.*new out.*fresh=True"):
        al.extract(model, PROMPTS, roles="resid_post", layers=[1], out=tmp_path, quiet=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # The same configuration again: nothing to compute, nothing rewritten.
    shard = tmp_path / "shards" / "00002.safetensors"
    os.utime(shard, ns=(0, 0))
    again = al.extract(model, PROMPTS, roles="resid_post", layers=[0], out=tmp_path, batch_size=2, memory_budget=1)
    assert len(again) == len(al.load_activations(tmp_path))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert shard.stat().st_mtime_ns == 0
    # fresh=True asks to start over, the same configuration too: every shard is written anew.
    al.extract(model, PROMPTS, roles="resid_post", layers=[0], out=tmp_path, batch_size=2, memory_budget=1, fresh=True)
    assert shard.stat().st_mtime_ns != 0 and shard.read_bytes() == before[shard]
    fresh = al.extract(model, PROMPTS, roles="resid_post", layers=[1], out=tmp_path, fresh=True, quiet=True)
    assert fresh.layers == [1] and len(fresh.manifest["shards"]) == 1
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.safetensors"]


def test_a_damaged_shard_is_refused_on_load_and_recomputed_on_rerun(tmp_path: Path) -> None:
    model = zoo("llama")
    options = dict(roles="resid_post", out=tmp_path, batch_size=2, memory_budget=1, quiet=True)
    al.extract(model, PROMPTS, **options)
    shard = tmp_path / "shards" / "00001.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-8] + bytes(8))
    with pytest.raises(al.ActivationsIntegrityError, match=r"shards/00001.safetensors.*sha256"):
        al.load_activations(tmp_path)
    with pytest.warns(al.ActivationsWarning, match="damaged"):
        al.extract(model, PROMPTS, **options)
    assert shard.read_bytes() == good


# -- resuming after SIGKILL -----------------------------------------------------------------------
CHILD = """
import random, sys, time, torch
torch.set_num_threads(1)
import anylens as al
from anylens.testing import tiny
seed, out = int(sys.argv[1]), sys.argv[2]
model = tiny("gpt2")
rng = random.Random(seed)
# Seeded random delays in every forward, so that kills land at varying points.
model.hf.register_forward_hook(lambda *args: time.sleep(rng.uniform(0, 0.03)))
al.extract(model, PROMPTS, roles=["resid_post", "mlp_out"], out=out, batch_size=3, memory_budget=MEMORY, quiet=True)
"""


def resume_prompts() -> list[str]:
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "and",
        "dog",
        "ran",
        "to",
        "Paris",
        "Rome",
        "capital",
        "of",
        "France",
        "is",
    ]
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(60)]


@pytest.mark.slow
def test_resume_after_sigkill_writes_the_same_bytes(tmp_path: Path) -> None:
    from anylens.testing import tiny

    prompts, memory = resume_prompts(), 20_000
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("PROMPTS", repr(prompts)).replace("MEMORY", str(memory)))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(al.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    out = tmp_path / "killed"
    rng = random.Random(1)
    kills = 0
    for attempt in range(3):
        child = subprocess.Popen([sys.executable, str(script), str(attempt), str(out)], env=env)
        target = 2 + 3 * attempt + rng.randint(0, 2)  # finished shards to wait for, then a random delay
        deadline = time.monotonic() + 120  # a busy machine may take long to start Python
        while time.monotonic() < deadline and child.poll() is None:
            try:
                done = len(json.loads((out / "manifest.json").read_text())["shards"])
            except (FileNotFoundError, ValueError):
                done = 0
            if done >= target:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.1))
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            kills += 1
        child.wait()
    assert kills >= 2, "the extraction finished before it could be killed: slow the child down"
    killed = json.loads((out / "manifest.json").read_text())
    assert not killed["complete"] and len(killed["shards"]) >= 2, "the kills came before any progress"

    # Resume here (the same library and thread count), and run the same extraction uninterrupted.
    torch.set_num_threads(1)
    options = dict(roles=["resid_post", "mlp_out"], batch_size=3, memory_budget=memory, quiet=True)
    al.extract(tiny("gpt2"), prompts, out=out, **options)
    reference = tmp_path / "uninterrupted"
    al.extract(tiny("gpt2"), prompts, out=reference, **options)
    want = json.loads((reference / "manifest.json").read_text())
    got = json.loads((out / "manifest.json").read_text())
    assert got["complete"] and got["shards"] == want["shards"] and len(want["shards"]) > 5
    for entry in want["shards"]:
        assert (out / entry["file"]).read_bytes() == (reference / entry["file"]).read_bytes()
    assert not list(out.rglob("*.tmp")), "temporary files of killed writers are cleaned up"
