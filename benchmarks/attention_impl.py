"""What eager attention costs: anylens switches attention models to eager so that ``pattern``
can be read and written. Times a plain forward of a GPT-2-small-shaped random model under
sdpa and under eager attention, and prints medians and the ratio eager / sdpa.

Run: python benchmarks/attention_impl.py [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def median_ms(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="a 4-layer model")
    args = parser.parse_args()
    layers = 4 if args.quick else 12
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=768, n_head=12)).eval()
    print(f"GPT-2-small shape, {layers} layers, float32, {torch.get_num_threads()} threads; median of {args.repeats}")
    print("| batch x tokens | sdpa ms | eager ms | eager / sdpa |")
    print("|---|---|---|---|")
    for batch, tokens in ((1, 16), (1, 128), (8, 128), (1, 512)):
        ids = torch.randint(0, 50257, (batch, tokens))
        model.set_attn_implementation("sdpa")
        sdpa = median_ms(model, ids, args.repeats)
        model.set_attn_implementation("eager")
        eager = median_ms(model, ids, args.repeats)
        print(f"| {batch} x {tokens} | {sdpa:.1f} | {eager:.1f} | {eager / sdpa:.2f} |")


if __name__ == "__main__":
    main()
