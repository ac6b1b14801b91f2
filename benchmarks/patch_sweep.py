"""Patching sweeps on a GPT-2-small-shaped random model: how fast, how much memory.

Three ways to run the same sweep, checked to agree:

* (a) naive: one nnsight trace per patch, written here with plain nnsight;
* (b) anylens: ``al.patch`` (batched, reusing unpatched work); (b0) is ``reuse=False``;
* (c) hooks: hand-written plain torch hooks with the same batching as (b0), final-position
  logits only — a strong baseline that reuses nothing.

The baselines run on copies of the same weights without anylens's wrapping: (a) on an nnsight wrap
of its own copy, (c) on an unwrapped Hugging Face model (:class:`Plain`).

Sweeps: (i) ``resid_pre`` over layer x position (192 patches), (ii) ``z`` over layer x head
(144 patches), (iii) attribution patching (``al.attribute`` vs hooks + autograd vs the patching
loop it approximates), (iv) peak memory of each, and of anylens over many prompt pairs under a
``memory_budget``, (v) sweeps over ``--pairs N`` prompt pairs of one length (``resid_pre``
layer x position and ``z`` layer x head): ``al.run`` (a sweep on disk), ``al.patch`` on the list,
a TransformerLens-style batched loop with plain torch hooks (one forward per component over all
corrupt prompts, every position's logits, as ``get_act_patch_*`` runs) and the naive loop (one
forward per component per pair), with per-pair cost and peak memory. Times are medians over
``--repeats`` after a warm-up; the variants take turns within each repeat so that a change in
machine load hits them alike.

Peak memory is the rise of the resident set (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``; psutil sampling where that is not allowed) over the resident set
just before the variant runs, each variant in a fresh subprocess after one unpatched forward.

    python benchmarks/patch_sweep.py                     # GPT-2-small shape (takes many minutes)
    python benchmarks/patch_sweep.py --quick --repeats 2 # a small model, for a quick look
    python benchmarks/patch_sweep.py --shape host-bound  # tiny widths: overhead-bound, as on a GPU
    python benchmarks/patch_sweep.py --device cuda       # on a GPU (memory: its allocated peak)
    python benchmarks/patch_sweep.py --pairs-only --pairs 1 16 64 --repeats 1  # only (v)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nnsight
import torch

import anylens as al
from anylens.engine import rows_for_budget, steady_budget
from anylens.tiny import tiny_tokenizer

LENGTH = 16
DIFFERENT = (3, 8, 12)  # positions where the corrupt prompt differs from the clean one
ANSWER, DISTRACTOR = 100, 200
METRIC = al.metrics.logit_diff(ANSWER, DISTRACTOR)
DEVICE = torch.device("cpu")  # --device


# -- the model and prompts --------------------------------------------------------------------
#: Model shapes: GPT-2 small (124M parameters, the default); ``quick``, a small model for a
#: quick look; ``host-bound``, GPT-2 small's 12 layers and 12 heads at tiny widths, so that every
#: variant is paced by Python and dispatch rather than arithmetic, as on a GPU.
SHAPES = {
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "quick": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=64),
    "host-bound": dict(n_layer=12, n_embd=48, n_head=12, vocab_size=512, n_positions=64),
}


def build_model(shape_name: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**SHAPES[shape_name])).float().eval().to(DEVICE)
    return al.wrap(hf, tiny_tokenizer())


@dataclass
class Plain:
    """The same weights as a researcher without anylens has them, so that anylens's wrapping
    (nnsight on every module, operation hooks on attention) costs the baselines nothing: an
    nnsight wrap of one copy for the naive loop (``nn``) and an unwrapped copy for the hooks
    (``hf``). Same attention implementation as the anylens model."""

    nn: Any
    hf: Any


def plain_copies(model) -> Plain:
    from nnsight.modeling.transformers import TransformersModel

    def copy():
        hf = type(model.hf)(model.hf.config)
        hf.load_state_dict(model.hf.state_dict())
        hf.set_attn_implementation(model.attn_implementation)
        return hf.float().eval().to(DEVICE)

    return Plain(nn=TransformersModel(copy(), tokenizer=model.tokenizer), hf=copy())


def prompt_pairs(vocab: int, n_pairs: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n_pairs, LENGTH), generator=generator)
    corrupt = clean.clone()
    for pos in DIFFERENT:
        corrupt[:, pos] = (clean[:, pos] + 1 + torch.randint(0, vocab - 1, (n_pairs,), generator=generator)) % vocab
    return clean.to(DEVICE), corrupt.to(DEVICE)


def logit_diff(last: torch.Tensor) -> torch.Tensor:
    return last[:, ANSWER] - last[:, DISTRACTOR]


def shape(model) -> tuple[int, int, int]:
    config = model.hf.config
    return config.n_layer, config.n_head, config.n_embd // config.n_head


def even_batches(n: int, cap: int) -> list[range]:
    """The batching anylens uses without reuse: as few forwards as the cap allows, even sizes."""
    forwards = -(-n // cap)
    size = -(-n // forwards)
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


# -- (a) naive: one nnsight trace per patch ---------------------------------------------------
def naive_resid(model, clean, corrupt, layers=None) -> torch.Tensor:
    lm = model.nn
    blocks = lm.transformer.h
    n_layers, _, _ = shape(model)
    layers = range(n_layers) if layers is None else layers
    out = torch.full((n_layers, LENGTH), float("nan"))
    with torch.no_grad():
        with lm.trace(clean):
            acts = nnsight.save([blocks[layer].input.clone() for layer in range(n_layers)])
            lm.output.logits[:, -1].save()
        with lm.trace(corrupt):
            lm.output.logits[:, -1].save()
        for layer in layers:
            for pos in range(LENGTH):
                with lm.trace(corrupt):
                    blocks[layer].input[:, pos] = acts[layer][:, pos]
                    last = lm.output.logits[:, -1].save()
                out[layer, pos] = logit_diff(last)[0]
    return out


def naive_z(model, clean, corrupt, layers=None) -> torch.Tensor:
    lm = model.nn
    blocks = lm.transformer.h
    n_layers, n_heads, d_head = shape(model)
    layers = range(n_layers) if layers is None else layers
    out = torch.full((n_layers, n_heads), float("nan"))
    with torch.no_grad():
        with lm.trace(clean):
            acts = nnsight.save([blocks[layer].attn.c_proj.input.clone() for layer in range(n_layers)])
            lm.output.logits[:, -1].save()
        with lm.trace(corrupt):
            lm.output.logits[:, -1].save()
        for layer in layers:
            for head in range(n_heads):
                with lm.trace(corrupt):
                    z = blocks[layer].attn.c_proj.input.view(1, LENGTH, n_heads, d_head)
                    z[:, :, head] = acts[layer].view(1, LENGTH, n_heads, d_head)[:, :, head]
                    last = lm.output.logits[:, -1].save()
                out[layer, head] = logit_diff(last)[0]
    return out


# -- (b) anylens ------------------------------------------------------------------------------
# Each returns its result with a function that lays it out as the others' [layer, x] tensor;
# the timing calls that function after stopping the clock (the other variants return tensors).
def grid(result, columns: str, value: str) -> Callable[[], torch.Tensor]:
    """[layer, columns] of one value column of a sweep's frame, laid out when called."""

    def lay_out() -> torch.Tensor:
        table = result.to_frame().pivot_table(index="layer", columns=columns, values=value)
        return torch.tensor(table.to_numpy(), dtype=torch.float32)

    return lay_out


def anylens_resid(model, clean, corrupt, reuse: bool = True) -> Callable[[], torch.Tensor]:
    result = al.patch(model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=METRIC, reuse=reuse)
    return grid(result, "pos", "metric")


def anylens_z(model, clean, corrupt, reuse: bool = True) -> Callable[[], torch.Tensor]:
    result = al.patch(model, clean, corrupt, role="z", over=("layer", "head"), metric=METRIC, reuse=reuse)
    return grid(result, "head", "metric")


def anylens_attribution(model, clean, corrupt) -> Callable[[], torch.Tensor]:
    result = al.attribute(model, clean, corrupt, role="z", over=("layer", "head"), metric=METRIC)
    return grid(result, "head", "estimate")


# -- (c) hand-written batched hooks -----------------------------------------------------------
def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def record_inputs(hf, modules, ids) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each module's first input (one forward, no grad) and the final-position logits."""
    store: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(module, args, kwargs):
            store[index] = _hidden(args, kwargs).clone()

        return hook

    handles = [module.register_forward_pre_hook(keep(i), with_kwargs=True) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            last = hf(input_ids=ids, logits_to_keep=1).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return [store[i] for i in range(len(modules))], last


def hooks_sweep(hf, modules, clean, corrupt, patches, write, cap: int) -> torch.Tensor:
    """One patched row per patch, ``cap`` rows per forward; ``write(value, rows, patch, clean)``."""
    acts, _ = record_inputs(hf, modules, clean)
    record_inputs(hf, [], corrupt)
    out = torch.empty(len(patches))
    for batch in even_batches(len(patches), cap):
        by_module: dict[int, list[tuple[int, tuple]]] = {}
        for row, index in enumerate(batch):
            layer, *where = patches[index]
            by_module.setdefault(layer, []).append((row, tuple(where)))

        def edit(rows, source):
            def hook(module, args, kwargs):
                value = _hidden(args, kwargs).clone()
                write(value, rows, source)
                return _replace(args, kwargs, value)

            return hook

        handles = [
            modules[layer].register_forward_pre_hook(edit(rows, acts[layer]), with_kwargs=True)
            for layer, rows in by_module.items()
        ]
        try:
            with torch.no_grad():
                last = hf(input_ids=corrupt.expand(len(batch), -1), logits_to_keep=1).logits[:, -1]
        finally:
            for handle in handles:
                handle.remove()
        out[list(batch)] = logit_diff(last).cpu()
    return out


def hooks_resid(model, clean, corrupt, cap: int) -> torch.Tensor:
    hf = model.hf
    n_layers, _, _ = shape(model)
    patches = [(layer, pos) for layer in range(n_layers) for pos in range(LENGTH)]

    def write(value, rows, source):
        index = torch.tensor([r for r, _ in rows])
        pos = torch.tensor([w[0] for _, w in rows])
        value[index, pos] = source[0, pos]

    out = hooks_sweep(hf, list(hf.transformer.h), clean, corrupt, patches, write, cap)
    return out.view(n_layers, LENGTH)


def hooks_z(model, clean, corrupt, cap: int) -> torch.Tensor:
    hf = model.hf
    n_layers, n_heads, d_head = shape(model)
    patches = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]

    def write(value, rows, source):
        index = torch.tensor([r for r, _ in rows])
        heads = torch.tensor([w[0] for _, w in rows])
        target = value.view(value.shape[0], LENGTH, n_heads, d_head)
        target[index, :, heads] = source.view(1, LENGTH, n_heads, d_head)[0, :, heads].transpose(0, 1)

    modules = [block.attn.c_proj for block in hf.transformer.h]
    out = hooks_sweep(hf, modules, clean, corrupt, patches, write, cap)
    return out.view(n_layers, n_heads)


def hooks_attribution(model, clean, corrupt) -> torch.Tensor:
    """Gradient x (clean - corrupt) per head, from one backward pass through hooked inputs."""
    hf = model.hf
    n_layers, n_heads, d_head = shape(model)
    modules = [block.attn.c_proj for block in hf.transformer.h]
    clean_z, _ = record_inputs(hf, modules, clean)
    store: dict[int, torch.Tensor] = {}

    def keep(index):
        def hook(module, args, kwargs):
            store[index] = _hidden(args, kwargs)

        return hook

    handles = [module.register_forward_pre_hook(keep(i), with_kwargs=True) for i, module in enumerate(modules)]
    try:
        with torch.enable_grad():
            last = hf(input_ids=corrupt, logits_to_keep=1).logits[:, -1]
            corrupt_z = [store[i] for i in range(n_layers)]
            grads = torch.autograd.grad(logit_diff(last).sum(), corrupt_z)
    finally:
        for handle in handles:
            handle.remove()
    out = torch.empty(n_layers, n_heads)
    for layer in range(n_layers):
        terms = (clean_z[layer] - corrupt_z[layer].detach()) * grads[layer]
        out[layer] = terms.view(-1, LENGTH, n_heads, d_head).sum((0, 1, 3)).cpu()
    return out


# -- timing -----------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> tuple[float, torch.Tensor]:
    """Seconds ``fn`` takes, and its value as a tensor (laid out after the clock stops)."""
    gc.collect()
    start = time.perf_counter()
    value = fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, value() if callable(value) else value


def time_variants(variants: dict[str, Callable[[], torch.Tensor]], repeats: int, log) -> dict[str, dict]:
    """Medians over ``repeats``, variants taking turns; the values of the last repeat."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    values: dict[str, torch.Tensor] = {}
    for repeat in range(repeats):
        for name, fn in variants.items():
            seconds, values[name] = timed(fn)
            times[name].append(seconds)
            log(f"    repeat {repeat + 1}/{repeats} {name}: {secs(seconds)} s")
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t), "times": t, "value": values[name]}
        for name, t in times.items()
    }


def secs(seconds: float) -> str:
    """Seconds to two decimals, or three below one second (a GPU's sweeps take tens of ms)."""
    return f"{seconds:.2f}" if seconds >= 1 else f"{seconds:.3f}"


def sweep_table(
    title: str, results: dict[str, dict], agree: list[tuple[str, str]], labels: dict[str, str]
) -> list[str]:
    b = results["b"]["median"]
    lines = [title, "", "| variant | median s | min-max s | time / (b) |", "|---|---|---|---|"]
    for name, label in labels.items():
        if name in results:
            r = results[name]
            spread = f"{secs(r['min'])}-{secs(r['max'])}"
            lines.append(f"| {label} | {secs(r['median'])} | {spread} | {r['median'] / b:.2f} |")
    lines.append("")
    for x, y in agree:
        diff = (results[x]["value"] - results[y]["value"]).abs().max().item()
        lines.append(f"max abs difference ({x}) vs ({y}): {diff:.2e}")
    ratios = [f"{x}/b = {results[x]['median'] / b:.1f}x" for x in ("a", "c", "b0") if x in results]
    lines.append("ratios of medians: " + ", ".join(ratios))
    return lines + [""]


SWEEP_LABELS = {
    "a": "(a) naive: one nnsight trace per patch",
    "b": "(b) anylens al.patch (reuse on, default)",
    "b0": "(b0) anylens al.patch(reuse=False)",
    "c": "(c) batched plain hooks, same batching as (b0)",
}
ATTRIBUTION_LABELS = {
    "a": "(a) naive patching loop of (ii), which attribution approximates",
    "b": "(b) anylens al.attribute",
    "c": "(c) hooks + autograd",
}


# -- memory -----------------------------------------------------------------------------------
def _status(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024


def peak_rise(fn: Callable[[], object]) -> tuple[int, int, str]:
    """(bytes the resident set rose to above its level before ``fn``, that level, how measured);
    on a GPU, the rise of its allocated memory instead."""
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - allocated, allocated, "torch.cuda.max_memory_allocated"
    before = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        return _sampled_peak(fn, before)
    fn()
    return _status("VmHWM") - before, before, "VmHWM after clear_refs"


def _sampled_peak(fn: Callable[[], object], before: int) -> tuple[int, int, str]:
    import psutil

    process, peak, done = psutil.Process(), [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return peak[0] - before, before, "psutil RSS sampled every 2 ms"


#: glibc keeps freed blocks below its (adaptive) mmap threshold for reuse, so the resident set
#: also holds memory nothing uses any more; with a fixed low threshold, freed tensors go back to
#: the system and the resident set follows what is live.
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_in_child(name: str, shape_name: str, budget: int, threads: int, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--measure", name, "--budget-mb", str(budget // 2**20)]
    command += ["--threads", str(threads), "--device", str(DEVICE), "--shape", shape_name]
    environment = {**os.environ, **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    for line in done.stdout.splitlines():
        if line.startswith("MEASURE "):
            return json.loads(line[len("MEASURE ") :])
    raise RuntimeError(f"measuring {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def run_measurement(name: str, shape_name: str, budget: int) -> dict:
    model = build_model(shape_name)
    clean, corrupt = prompt_pairs(model.hf.config.vocab_size)
    with torch.no_grad():
        model.hf(input_ids=corrupt)  # one unpatched forward: allocator and kernels warmed up
    cap = rows_for_budget(model, LENGTH)
    plain = plain_copies(model) if not name.startswith(("pairs", "anylens")) else None
    extra: dict = {}
    if name.startswith("pairs"):
        n_pairs = int(name[len("pairs") :])
        clean, corrupt = prompt_pairs(model.hf.config.vocab_size, n_pairs=n_pairs, seed=1)

        def fn():
            start = time.perf_counter()
            result = al.patch(
                model, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=METRIC, memory_budget=budget
            )
            extra.update(
                seconds=time.perf_counter() - start,
                forwards=result.meta["forwards"],
                patches=result.meta["patches"],
                unchanged=result.meta["unchanged"],
            )
    else:
        fn = {
            "naive_resid": lambda: naive_resid(plain, clean, corrupt),
            "anylens_resid": lambda: anylens_resid(model, clean, corrupt),
            "hooks_resid": lambda: hooks_resid(plain, clean, corrupt, cap),
            "naive_z": lambda: naive_z(plain, clean, corrupt),
            "anylens_z": lambda: anylens_z(model, clean, corrupt),
            "hooks_z": lambda: hooks_z(plain, clean, corrupt, cap),
            "anylens_attr": lambda: anylens_attribution(model, clean, corrupt),
            "hooks_attr": lambda: hooks_attribution(plain, clean, corrupt),
        }[name]
    rise, before, how = peak_rise(fn)
    return {"name": name, "rise": rise, "before": before, "how": how, **extra}


def timing_sections(model, clean, corrupt, cap: int, repeats: int, log) -> list[str]:
    """(i)-(iii): medians of every variant, their ratios and their agreement."""
    n_layers, n_heads, _ = shape(model)
    plain = plain_copies(model)
    lines: list[str] = []
    log("warm-up")
    naive_resid(plain, clean, corrupt, layers=[0])
    naive_z(plain, clean, corrupt, layers=[0])
    for fn in (anylens_resid, anylens_z, anylens_attribution):
        fn(model, clean, corrupt)
    hooks_resid(plain, clean, corrupt, cap)
    hooks_z(plain, clean, corrupt, cap)
    hooks_attribution(plain, clean, corrupt)

    def exact_sweep(title: str, naive, anylens, hooks) -> dict[str, dict]:
        """Time (a), (b), (b0) and (c) of one patching sweep and add its table."""
        log(title)
        results = time_variants(
            {
                "a": lambda: naive(plain, clean, corrupt),
                "b": lambda: anylens(model, clean, corrupt),
                "b0": lambda: anylens(model, clean, corrupt, reuse=False),
                "c": lambda: hooks(plain, clean, corrupt, cap),
            },
            repeats,
            log,
        )
        lines.extend(sweep_table(f"### {title}", results, [("a", "b"), ("c", "b"), ("b0", "b")], SWEEP_LABELS))
        return results

    exact_sweep(
        f"(i) resid_pre, layer x position: {n_layers * LENGTH} patches", naive_resid, anylens_resid, hooks_resid
    )
    heads = exact_sweep(f"(ii) z, layer x head: {n_layers * n_heads} patches", naive_z, anylens_z, hooks_z)

    log("(iii) attribution patching")
    attribution = time_variants(
        {
            "b": lambda: anylens_attribution(model, clean, corrupt),
            "c": lambda: hooks_attribution(plain, clean, corrupt),
        },
        repeats,
        log,
    )
    attribution["a"] = heads["a"]  # the exact patching loop attribution approximates
    title = "### (iii) attribution patching of z over layer x head"
    lines += sweep_table(title, attribution, [("c", "b")], ATTRIBUTION_LABELS)
    with torch.no_grad():
        corrupt_metric = logit_diff(model.hf(input_ids=corrupt, logits_to_keep=1).logits[:, -1])
    effect = (heads["b"]["value"] - corrupt_metric.cpu()).flatten()
    estimate = attribution["b"]["value"].flatten()
    correlation = torch.corrcoef(torch.stack([effect, estimate]))[0, 1].item()
    lines.append(f"correlation of the attribution estimate with the exact patching effect: {correlation:.3f}")
    lines.append("")

    return lines


def memory_section(args, budget: int, log) -> list[str]:
    """(iv): peak memory of every variant, and of anylens over many prompt pairs under a budget."""
    lines: list[str] = []
    log("(iv) memory")
    memory = "GPU memory allocated" if DEVICE.type == "cuda" else "the resident set"
    lines += [f"### (iv) peak memory: rise of {memory} above its level before the run", ""]
    lines += [
        "| run | peak rise MiB | peak rise MiB, freed memory returned | before MiB |",
        "|---|---|---|---|",
    ]
    how = ""
    names = ("naive_resid", "anylens_resid", "hooks_resid", "naive_z", "anylens_z", "hooks_z")
    for name in names + ("anylens_attr", "hooks_attr"):
        log(f"    {name}")
        measured = measure_in_child(name, args.shape, budget, args.threads)
        returned = (
            measured
            if DEVICE.type == "cuda"
            else measure_in_child(name, args.shape, budget, args.threads, RETURN_FREED)
        )
        how = measured["how"]
        lines.append(
            f"| {name} | {measured['rise'] / 2**20:.0f} | {returned['rise'] / 2**20:.0f} | "
            f"{measured['before'] / 2**20:.0f} |"
        )
    returning = " ".join(f"{k}={v}" for k, v in RETURN_FREED.items())
    returned_how = "the same run (nothing to return on a GPU)" if DEVICE.type == "cuda" else f"runs with {returning}"
    lines += ["", f"measured as: {how}, each run in a fresh subprocess; 'freed memory returned': {returned_how}", ""]
    lines += [
        f"anylens resid_pre sweep over many prompt pairs with memory_budget={args.budget_mb} MiB:",
        "",
        "| prompt pairs | patched rows | forwards | seconds | peak rise MiB | peak rise MiB, freed memory returned "
        "| budget MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for n_pairs in args.pairs:
        log(f"    {n_pairs} prompt pairs")
        measured = measure_in_child(f"pairs{n_pairs}", args.shape, budget, args.threads)
        returned = (
            measured
            if DEVICE.type == "cuda"
            else measure_in_child(f"pairs{n_pairs}", args.shape, budget, args.threads, RETURN_FREED)
        )
        lines.append(
            f"| {n_pairs} | {measured['patches']} | {measured['forwards']} | {measured['seconds']:.1f} | "
            f"{measured['rise'] / 2**20:.0f} | {returned['rise'] / 2**20:.0f} | {args.budget_mb} |"
        )
    lines.append("")

    return lines


# -- (v) sweeps over many prompt pairs ----------------------------------------------------------
#: Words that are one token each for the tiny tokenizer: prompts of them tokenize word by word,
#: so every prompt of ``LENGTH`` words has ``LENGTH`` tokens (``al.run`` takes prompts as text).
WORDS = [
    *("Colosseum", "Eiffel", "France", "Italy", "John", "Mary", "Paris", "Rome", "The", "Tower", "a", "and"),
    *("capital", "cat", "dog", "drink", "gave", "in", "is", "log", "mat", "of", "on", "sat", "store", "the"),
    *("to", "went"),
]


def text_pairs(n_pairs: int, seed: int = 2, different: tuple[int, ...] = DIFFERENT) -> list[tuple[str, str]]:
    """``n_pairs`` (clean, corrupt) texts of ``LENGTH`` one-token words, differing at ``different``."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n_pairs):
        clean = [WORDS[i] for i in torch.randint(0, len(WORDS), (LENGTH,), generator=generator)]
        corrupt = list(clean)
        for pos in different:
            corrupt[pos] = WORDS[
                (WORDS.index(clean[pos]) + 1 + int(torch.randint(0, len(WORDS) - 1, (1,), generator=generator)))
                % len(WORDS)
            ]
        pairs.append(("".join(" " + w for w in clean), "".join(" " + w for w in corrupt)))
    return pairs


def tokens_of(model, texts: list[str]) -> torch.Tensor:
    ids = torch.stack([model.tokenizer(text, return_tensors="pt")["input_ids"][0] for text in texts])
    assert ids.shape[1] == LENGTH, f"a prompt is not {LENGTH} tokens"
    return ids.to(DEVICE)


class Sweeping:
    """``al.run`` on the benchmark's own model object: the sweep's loader hands it over instead of
    loading a source (so the model is built once), and each run writes a fresh directory."""

    def __init__(self, model, budget: int):
        import tempfile

        import anylens.sweep.runner as runner

        self.model, self.budget, self.runner = model, budget, runner
        self.root = Path(tempfile.mkdtemp(prefix="patch_sweep_"))
        self.count = 0
        runner.load_source = lambda source, dtype=None, device=None: self.model
        runner._release = lambda model: None  # the benchmark keeps its model

    def __call__(self, pairs, role: str, over: tuple[str, ...], chunk_size: int) -> Callable[[], torch.Tensor]:
        self.count += 1
        out = self.root / f"run{self.count}"
        result = al.run(
            "patch",
            models=["benchmark-model"],
            prompts=pairs,
            out=out,
            chunk_size=chunk_size,
            quiet=True,
            role=role,
            over=over,
            metric=METRIC,
            memory_budget=self.budget,
        )
        self.chunk_seconds = sum(entry["seconds"] for entry in result.manifest["chunks"].values())
        columns = over[1]

        def lay_out() -> torch.Tensor:  # [layer, x, pair], as the other variants give it
            table = result.frame.pivot_table(index=["layer", columns], columns="prompt", values="metric")
            n_layers = table.index.get_level_values(0).nunique()
            return torch.tensor(table.to_numpy(), dtype=torch.float32).view(n_layers, -1, len(pairs))

        return lay_out


def listed_patch(model, clean, corrupt, role: str, over: tuple[str, ...], budget: int) -> Callable[[], torch.Tensor]:
    result = al.patch(model, clean, corrupt, role=role, over=over, metric=METRIC, per_prompt=True, memory_budget=budget)

    def lay_out() -> torch.Tensor:
        table = result.to_frame().pivot_table(index=["layer", over[1]], columns="prompt", values="metric")
        n_layers = table.index.get_level_values(0).nunique()
        return torch.tensor(table.to_numpy(), dtype=torch.float32).view(n_layers, -1, clean.shape[0])

    return lay_out


def tl_style(model, clean, corrupt, role: str) -> torch.Tensor:
    """What TransformerLens's ``get_act_patch_resid_pre`` / ``get_act_patch_attn_head_out_all_pos``
    do, with plain torch hooks: the clean run's activations cached, then for every component one
    forward over all corrupt prompts, each row patched from its own clean prompt, every position's
    logits computed. ``[layer, x, pair]``."""
    hf = model.hf
    n_layers, n_heads, d_head = shape(model)
    n_pairs = clean.shape[0]
    if role == "resid_pre":
        modules, columns = list(hf.transformer.h), LENGTH
    else:
        modules, columns = [block.attn.c_proj for block in hf.transformer.h], n_heads
    acts, _ = record_inputs(hf, modules, clean)
    out = torch.empty(n_layers, columns, n_pairs)
    for layer in range(n_layers):
        for column in range(columns):

            def hook(module, args, kwargs, source=acts[layer], column=column):
                value = _hidden(args, kwargs).clone()
                if role == "resid_pre":
                    value[:, column] = source[:, column]
                else:
                    heads = value.view(n_pairs, LENGTH, n_heads, d_head)
                    heads[:, :, column] = source.view(n_pairs, LENGTH, n_heads, d_head)[:, :, column]
                return _replace(args, kwargs, value)

            handle = modules[layer].register_forward_pre_hook(hook, with_kwargs=True)
            try:
                with torch.no_grad():
                    logits = hf(input_ids=corrupt).logits
            finally:
                handle.remove()
            out[layer, column] = logit_diff(logits[:, -1]).cpu()
    return out


def naive_pairs(plain, clean, corrupt, role: str) -> torch.Tensor:
    """The naive loop of (a), pair by pair: one nnsight trace per component per pair."""
    loop = naive_resid if role == "resid_pre" else naive_z
    return torch.stack([loop(plain, clean[i : i + 1], corrupt[i : i + 1]) for i in range(clean.shape[0])], -1)


PAIR_LABELS = {
    "run": "al.run (sweep on disk)",
    "patch": "al.patch on the list",
    "tl": "TransformerLens-style batched hooks",
    "naive": "naive loop",
}


def pairs_section(model, args, budget: int, log) -> list[str]:
    """(v): every variant over ``--pairs N`` prompt pairs, for resid_pre and z."""
    from anylens.sweep.fingerprint import weights_fingerprint

    plain = plain_copies(model)
    sweeping = Sweeping(model, budget)
    n_layers, n_heads, _ = shape(model)
    start = time.perf_counter()
    weights_fingerprint(model)
    fingerprint = time.perf_counter() - start
    try:
        import transformer_lens  # noqa: F401

        library = "transformer_lens is installed, but its models are not this model: its get_act_patch_* is not timed"
    except ImportError:
        library = "transformer_lens is not installed here: its own get_act_patch_* is not timed"
    lines = [
        f"### (v) sweeps over many prompt pairs of {LENGTH} tokens; al.run and al.patch with a sweep's default "
        f"memory_budget, {budget // 2**20} MiB",
        "",
        "CPU s: the process's CPU time (time.process_time), which other tenants of a shared machine disturb far "
        "less than the wall clock; al.run's includes the weights fingerprint, hashed on a thread of its own.",
        "",
        f"al.run's fixed cost per model, whatever the pairs: the weights fingerprint, {secs(fingerprint)} s here. "
        f"{library}.",
        "",
    ]
    sweeps = (("resid_pre", ("layer", "pos"), n_layers * LENGTH), ("z", ("layer", "head"), n_layers * n_heads))
    lines += [f"corrupt prompts differ at positions {list(args.differ)}", ""]
    for n_pairs in args.pairs:
        pairs = text_pairs(n_pairs, different=tuple(args.differ))
        for role, over, n_components in sweeps:
            title = f"{role}, {' x '.join(over)}: {n_components} components x {n_pairs} pairs"
            log(f"(v) {title}")
            lines += [f"#### {title}", ""]
            lines += pair_sweep(model, plain, sweeping, pairs, role, over, args, budget, log)
    return lines


def pair_sweep(model, plain, sweeping, pairs, role, over, args, budget: int, log) -> list[str]:
    """One table of (v): the variants on ``pairs``, timed, with their peak memory."""
    n_pairs = len(pairs)
    clean = tokens_of(model, [c for c, _ in pairs])
    corrupt = tokens_of(model, [c for _, c in pairs])
    variants: dict[str, Callable[[], object]] = {
        "run": lambda: sweeping(pairs, role, over, chunk_size=n_pairs),  # one chunk: its calls are the engine's
        "patch": lambda: listed_patch(model, clean, corrupt, role, over, budget),
    }
    if args.tl_pairs is None or n_pairs <= args.tl_pairs:
        variants["tl"] = lambda: tl_style(plain, clean, corrupt, role)
    if n_pairs <= args.naive_pairs:
        variants["naive"] = lambda: naive_pairs(plain, clean, corrupt, role)
    for name in ("run", "patch"):  # warm-up; the loops of plain hooks have nothing to warm up
        variants[name]()()
    peaks: dict[str, list[int]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    chunk_seconds: list[float] = []

    def measured(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            holder: dict[str, object] = {}
            start = time.process_time()
            rise, _, _ = peak_rise(lambda: holder.setdefault("value", fn()))
            cpu[name].append(time.process_time() - start)
            peaks[name].append(rise)
            if name == "run":
                chunk_seconds.append(sweeping.chunk_seconds)
            return holder["value"]

        return run

    results = time_variants({n: measured(n, f) for n, f in variants.items()}, args.repeats, log)
    base = results["patch"]["median"]
    cpu_base = statistics.median(cpu["patch"])
    lines = [
        "| variant | median s | min-max s | time / al.patch | CPU s | CPU per pair s | CPU / al.patch "
        "| peak rise MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in PAIR_LABELS.items():
        if name in results:
            r, used = results[name], statistics.median(cpu[name])
            lines.append(
                f"| {label} | {secs(r['median'])} | {secs(r['min'])}-{secs(r['max'])} | {r['median'] / base:.2f} | "
                f"{secs(used)} | {secs(used / n_pairs)} | {used / cpu_base:.2f} | {max(peaks[name]) / 2**20:.0f} |"
            )
    chunks = statistics.median(chunk_seconds)
    lines += [
        "",
        f"al.run: {secs(chunks)} s in its chunk (median), the rest opening the sweep, fingerprinting the weights "
        f"and writing; chunk / al.patch = {chunks / base:.2f}",
    ]
    for other in ("run", "tl", "naive"):
        if other in results:
            diff = (results[other]["value"] - results["patch"]["value"]).abs().max().item()
            lines.append(f"max abs difference, {PAIR_LABELS[other]} vs al.patch: {diff:.2e}")
    return lines + [""]


# -- main -------------------------------------------------------------------------------------
def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f"{torch.cuda.get_device_name(DEVICE)}; " if DEVICE.type == "cuda" else ""
    return (
        f"{gpu}{cpu}; {os.cpu_count()} logical CPUs; load average {load}; torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s)); nnsight {nnsight.__version__}; Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="gpt2-small", help="the model (default gpt2-small)")
    parser.add_argument("--quick", action="store_const", const="quick", dest="shape", help="--shape quick")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--budget-mb", type=int, default=256, help="memory_budget of the many-pair sweeps, MiB")
    parser.add_argument(
        "--pairs", type=int, nargs="*", default=[1, 16, 64], help="prompt pairs of the sweeps of (iv) and (v)"
    )
    parser.add_argument(
        "--naive-pairs", type=int, default=1, help="run the naive loop of (v) up to this many pairs (default 1)"
    )
    parser.add_argument(
        "--tl-pairs", type=int, help="run the TransformerLens-style loop of (v) up to this many pairs (default: all)"
    )
    parser.add_argument(
        "--differ",
        type=int,
        nargs="+",
        default=list(DIFFERENT),
        help=f"positions where the corrupt prompts of (v) differ (default {' '.join(map(str, DIFFERENT))}; "
        "IOI-style pairs differ late, e.g. 12)",
    )
    parser.add_argument("--pairs-only", action="store_true", help="only the sweeps over many pairs (v)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements (iv)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory measurements (iv)")
    parser.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (default cpu)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    budget = args.budget_mb * 2**20
    if args.measure:
        print("MEASURE " + json.dumps(run_measurement(args.measure, args.shape, budget)), flush=True)
        return

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    start = time.perf_counter()
    lines = [f"machine at start: {machine()}", ""]
    model = build_model(args.shape)
    n_layers, n_heads, _ = shape(model)
    n_params = sum(p.numel() for p in model.hf.parameters())
    clean, corrupt = prompt_pairs(model.hf.config.vocab_size)
    cap = rows_for_budget(model, LENGTH)
    lines.append(
        f"model: GPT-2 shape, {n_layers} layers, d_model {model.hf.config.n_embd}, {n_heads} heads, "
        f"vocab {model.hf.config.vocab_size}, {n_params / 1e6:.1f}M parameters, float32, eval; "
        f"prompts: {LENGTH} random tokens, corrupt differs at positions {list(DIFFERENT)}; "
        f"metric: logit difference at the last position; hooks batch {cap} rows per forward"
    )
    lines.append("")

    if not args.memory_only and not args.pairs_only:
        lines += timing_sections(model, clean, corrupt, cap, args.repeats, log)
    if not args.no_memory and not args.pairs_only:
        lines += memory_section(args, budget, log)
    if not args.memory_only:
        lines += pairs_section(model, args, steady_budget(model), log)  # what a sweep uses by default
    lines.append(f"machine at end: {machine()}")
    lines.append(f"whole benchmark: {time.perf_counter() - start:.0f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
