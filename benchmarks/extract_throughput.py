"""Extraction throughput: ``al.extract`` to disk against a plain torch-hooks loop saving the same tensors.

Both run the same prompts in the same left-padded batches through the same weights and write the
same rows (``resid_post`` of every layer, at each prompt's last token or at every real token) to
safetensors shards of the same memory budget:

* hooks: an unwrapped Hugging Face model, forward hooks on every block, position ids from the
  mask, rows gathered and ``safetensors.torch.save_file`` per shard — nothing else;
* anylens: ``al.extract(model, prompts, ..., out=DIR)`` (an nnsight trace per batch, sha256 and an
  atomic, fsynced write per shard, the manifest rewritten after each).

The stored tensors are checked to be equal. Times are medians over ``--repeats``; the two take
turns within each repeat so that a change in machine load hits both alike.

    python benchmarks/extract_throughput.py               # GPT-2-shaped, 6 layers x 512 wide
    python benchmarks/extract_throughput.py --quick       # a small model, a quick look
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

import anylens as al
from anylens.tiny import tiny_tokenizer

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "the",
    "dog",
    "ran",
    "to",
    "Paris",
    "while",
    "Rome",
    "is",
    "the",
    "capital",
    "of",
    "Italy",
]


def build(width: int, layers: int) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=400, n_positions=128, n_embd=width, n_layer=layers, n_head=8, bos_token_id=2, eos_token_id=3
    )
    return GPT2LMHeadModel(config).eval(), tiny_tokenizer()


def prompts(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 24))) for _ in range(n)]


def hooks_loop(hf, tokenizer, texts, out: Path, positions: str, batch_size: int, budget: int) -> None:
    """The baseline: plain forward hooks on every block, rows gathered, one safetensors file per shard."""
    blocks = hf.transformer.h
    seen: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(
            lambda m, a, output, i=i: seen.__setitem__(i, output[0] if isinstance(output, tuple) else output)
        )
        for i, block in enumerate(blocks)
    ]
    tokenizer.padding_side = "left"
    pending: dict[str, list[torch.Tensor]] = {}
    held, shard = 0, 0
    try:
        for begin in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[begin : begin + batch_size], return_tensors="pt", padding=True)
            mask = encoded["attention_mask"]
            with torch.no_grad():
                hf(input_ids=encoded["input_ids"], attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
            keep = torch.zeros_like(mask, dtype=torch.bool)
            if positions == "last":
                keep[:, -1] = True
            else:
                keep = mask.bool()
            for i in range(len(blocks)):
                rows = seen[i][keep]
                pending.setdefault(f"resid_post.{i}", []).append(rows)
                held += rows.numel() * rows.element_size()
            if held >= budget or begin + batch_size >= len(texts):
                save_file({k: torch.cat(v) for k, v in pending.items()}, str(out / f"{shard:05d}.safetensors"))
                pending, held, shard = {}, 0, shard + 1
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and fewer prompts")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--budget", default="8MiB")
    args = parser.parse_args()
    width, layers, n = (128, 4, 128) if args.quick else (512, 6, 512)
    n = args.prompts or n
    hf, tokenizer = build(width, layers)
    # A copy of the same weights, wrapped; both keep the fused (sdpa) attention kernel.
    model = al.wrap(build(width, layers)[0], tokenizer, attn_implementation="sdpa")
    texts = prompts(n)
    from anylens.experiments.activations import parse_bytes

    budget = parse_bytes(args.budget)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"GPT-2 shape: {layers} layers x {width} wide; {n} prompts of 6-24 words, batches of {args.batch_size}, "
          f"shards of {args.budget}")  # fmt: skip
    for positions in ("last", "all"):
        times: dict[str, list[float]] = {"hooks": [], "anylens": []}
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            with tempfile.TemporaryDirectory() as folder:
                plain, ours = Path(folder) / "hooks", Path(folder) / "anylens"
                plain.mkdir()
                start = time.perf_counter()
                hooks_loop(hf, tokenizer, texts, plain, positions, args.batch_size, budget)
                middle = time.perf_counter()
                acts = al.extract(
                    model, texts, roles="resid_post", positions=positions, out=ours,
                    batch_size=args.batch_size, memory_budget=budget, quiet=True,
                )  # fmt: skip
                end = time.perf_counter()
                if repeat == 0:
                    stored = {
                        k: torch.cat([load_file(str(p))[k] for p in sorted(plain.iterdir())])
                        for k in acts.manifest["tensors"]
                    }
                    for name, tensor in stored.items():
                        role, layer = name.split(".")
                        assert torch.equal(acts[role, int(layer)], tensor), f"{name} differs from the hooks' rows"
                    rows = len(acts)
                    continue
                times["hooks"].append(middle - start)
                times["anylens"].append(end - middle)
        hooks, ours = statistics.median(times["hooks"]), statistics.median(times["anylens"])
        print(
            f"positions={positions!r:6} ({rows} rows): hooks {n / hooks:8.1f} prompts/s, anylens {n / ours:8.1f} "
            f"prompts/s; anylens/hooks throughput {hooks / ours:.2f}x (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
