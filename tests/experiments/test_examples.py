"""The example scripts of docs/examples run on tiny models of the four families, and the numbers
they return agree with computations made here with plain Hugging Face forwards."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import matplotlib
import pytest
import torch
from hook_reference import forward_logits

matplotlib.use("Agg")

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
MODELS = ["tiny:gpt2", "tiny:llama", "tiny:mistral", "tiny:mamba"]
ATOL = 1e-5


def script(name: str) -> ModuleType:
    """Import docs/examples/<name>.py as a module (its name starts with a digit)."""
    spec = importlib.util.spec_from_file_location(f"anylens_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def common() -> ModuleType:
    script("01_logit_lens_quickstart")  # puts docs/examples on sys.path
    return sys.modules["_common"]


def run(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp(name)
    results = script(name).main(MODELS, out=str(out))
    assert list(results) == MODELS
    assert (out / f"{name}.txt").read_text().count("== tiny:") == len(MODELS)
    return results, out


def last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """``[batch, vocab]`` logits at the last position from the Hugging Face model itself."""
    with torch.no_grad():
        return forward_logits(model.hf, ids.to(model.device))[:, -1].float()


def ids_of(model, prompts) -> torch.Tensor:
    if isinstance(prompts, torch.Tensor):
        return prompts
    return model.tokenizer(list(prompts), return_tensors="pt")["input_ids"]  # equal lengths: no padding


def logit_diff(logits: torch.Tensor, model, answers, distractors) -> torch.Tensor:
    good = torch.tensor([model.token_id(a) for a in answers])
    bad = torch.tensor([model.token_id(d) for d in distractors])
    rows = torch.arange(len(good))
    return logits[rows, good] - logits[rows, bad]


def assert_png(path: str) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# -- 01 -----------------------------------------------------------------------------------------
def test_logit_lens_quickstart(tmp_path_factory, common):
    results, _ = run("01_logit_lens_quickstart", tmp_path_factory)
    for source, r in results.items():
        model = common.load(source)
        assert len(r["probs"]) == len(r["ranks"]) == model.n_layers
        # The lens at the last layer is the model's own next-token distribution.
        logits = last_logits(model, torch.tensor([r["prompt_ids"]]))[0]
        assert r["probs"][-1] == pytest.approx(float(logits.softmax(-1)[r["answer_id"]]), abs=ATOL)
        assert r["ranks"][-1] == int((logits > logits[r["answer_id"]]).sum())
        top1 = [layer for layer, rank in enumerate(r["ranks"]) if rank == 0]
        assert r["first_top1_layer"] == (top1[0] if top1 else None)
        assert_png(r["heatmap"])


# -- 02 -----------------------------------------------------------------------------------------
def test_extraction(tmp_path_factory, common):
    results, _ = run("02_extraction", tmp_path_factory)
    for source, r in results.items():
        model = common.load(source)
        assert r["max_error"] < 1e-4
        assert len(set(r["n_tokens"])) > 1, "the batch should need padding"
        n_pos = max(r["n_tokens"])
        assert r["shapes"]["resid_post"] == [model.n_layers, r["n_prompts"], n_pos, model.config.hidden_size]
        if "z" in model.roles:
            assert r["shapes"]["z"] == [model.n_layers, r["n_prompts"], n_pos, model.n_heads, model.d_head]
            assert r["per_head"]
            # embeddings (+ positions), every head, every MLP, one row of output-projection biases
            expected = 1 + ("pos_embed" in model.roles) + model.n_layers * (model.n_heads + 1) + 1
        else:
            assert "mixer_out" in r["shapes"] and not r["per_head"]
            expected = 1 + model.n_layers
        assert r["n_components"] == expected == len(r["labels"])


# -- 03 -----------------------------------------------------------------------------------------
def test_head_patching_sweep(tmp_path_factory, common):
    module = script("03_head_patching_sweep")
    results, _ = run("03_head_patching_sweep", tmp_path_factory)
    for source, r in results.items():
        model = common.load(source)
        if "z" in model.roles:
            assert (r["role"], r["over"]) == ("z", ["layer", "head"])
            assert r["n_components"] == model.n_layers * model.n_heads
        else:
            assert (r["role"], r["over"]) == ("mixer_out", ["layer"])
            assert r["n_components"] == model.n_layers
        task = common.ioi_task(model, module.N_PAIRS)
        clean = logit_diff(last_logits(model, ids_of(model, task.clean)), model, task.answers, task.distractors)
        corrupt = logit_diff(last_logits(model, ids_of(model, task.corrupt)), model, task.answers, task.distractors)
        assert r["clean_metric"] == pytest.approx(float(clean.mean()), abs=1e-4)
        assert r["corrupt_metric"] == pytest.approx(float(corrupt.mean()), abs=1e-4)
        frame = r["frame"]
        expected = (frame["metric"] - r["corrupt_metric"]) / (r["clean_metric"] - r["corrupt_metric"])
        assert frame["normalized"].to_numpy() == pytest.approx(expected.to_numpy(), abs=1e-4)
        assert [score for _, score in r["top"]] == sorted(frame["normalized"], reverse=True)[: len(r["top"])]
        assert_png(r["heatmap"])


# -- 04 -----------------------------------------------------------------------------------------
def test_logit_lens_topk(tmp_path_factory, common):
    results, _ = run("04_logit_lens_topk", tmp_path_factory)
    for source, r in results.items():
        model = common.load(source)
        assert len(r["top"]) == model.n_layers and all(len(cells) == 3 for cells in r["top"])
        for cells in r["top"]:
            probs = [p for _, _, p in cells]
            assert probs == sorted(probs, reverse=True)
        probs = last_logits(model, torch.tensor([r["prompt_ids"]]))[0].softmax(-1)
        expected = probs.topk(3)
        assert [i for _, i, _ in r["top"][-1]] == expected.indices.tolist()
        assert [p for _, _, p in r["top"][-1]] == pytest.approx(expected.values.tolist(), abs=ATOL)


# -- 05 -----------------------------------------------------------------------------------------
def test_ablation_study(tmp_path_factory, common):
    module = script("05_ablation_study")
    results, _ = run("05_ablation_study", tmp_path_factory)
    for source, r in results.items():
        model = common.load(source)
        expected_roles = ["attn_out", "mlp_out"] if "z" in model.roles else ["mixer_out"]
        assert r["roles"] == expected_roles
        assert set(r["effects"]) == {f"{role}/{m}" for role in expected_roles for m in ("zero", "mean")}
        assert all(len(values) == model.n_layers for values in r["effects"].values())
        task = common.factual_task(model, module.N_PROMPTS)
        ids = ids_of(model, task.clean)
        baseline = logit_diff(last_logits(model, ids), model, task.answers, task.distractors).mean()
        assert r["baseline"] == pytest.approx(float(baseline), abs=1e-4)
        # Each ablation by hand in a trace of its own: layer 1 of the first role replaced by zeros,
        # or by its mean over the batch at each position.
        role = expected_roles[0]
        with torch.no_grad(), model.trace(ids):
            activation = getattr(model, role)[1].clone().save()
        for method, value in (
            ("zero", torch.zeros_like(activation)),
            ("mean", activation.mean(0, keepdim=True).expand_as(activation)),
        ):
            with torch.no_grad(), model.trace(ids):
                getattr(model, role)[1] = value.clone()
                logits = model.logits[:, -1].save()
            ablated = logit_diff(logits.float(), model, task.answers, task.distractors).mean()
            assert r["effects"][f"{role}/{method}"][1] == pytest.approx(float(ablated - baseline), abs=1e-4)
        assert_png(r["plot"])


# -- 06 -----------------------------------------------------------------------------------------
def block_output(model, prompts, layer: int, add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``layer``'s output at the last token ``[n, d_model]`` and the last-position logits
    ``[n, vocab]`` of plain forwards of each prompt alone (no padding), with ``add`` added to that
    output at every position."""
    from hook_reference import block

    kept = []

    def hook(module, args, output):
        kept.append(output[:, -1].detach())
        return output if add is None else output + add

    handle = block(model.hf, layer).register_forward_hook(hook)
    try:
        ids = [ids_of(model, [p]) if isinstance(p, str) else p[None] for p in prompts]
        logits = torch.cat([last_logits(model, one) for one in ids])
    finally:
        handle.remove()
    return torch.cat(kept), logits


def test_steering_example(tmp_path_factory, common):
    results, _ = run("06_steering", tmp_path_factory)
    for source, r in results.items():
        model = common.load(source)
        task = r["task"]
        target = model.token_id(task["target"])
        assert sorted(r["rates"]) == list(range(model.n_layers))
        _, unsteered = block_output(model, task["negative"], 0)
        assert r["baseline"] == float(unsteered.argmax(-1).eq(target).float().mean())
        # Every rate by hand: the vector from the block's output at the last token, added to that
        # output at every position; success when the target is the top next token.
        for layer, by_scale in r["rates"].items():
            vector = block_output(model, task["positive"], layer)[0].mean(0)
            vector = vector - block_output(model, task["negative"], layer)[0].mean(0)
            for scale, rate in by_scale.items():
                _, logits = block_output(model, task["negative"], layer, add=scale * vector)
                assert rate == pytest.approx(float(logits.argmax(-1).eq(target).float().mean())), (source, layer, scale)
        best_layer, best_scale = r["best"]
        assert r["rates"][best_layer][best_scale] == max(
            v for by_scale in r["rates"].values() for v in by_scale.values()
        )
        assert_png(r["plot"])


# -- 07 -----------------------------------------------------------------------------------------
def test_probing(tmp_path_factory, common):
    import hook_reference as ref

    results, _ = run("07_probing", tmp_path_factory)
    for source, r in results.items():
        model = common.load(source)
        capital, country = r["capital"], r["country"]
        assert sorted(zip(capital["role"], capital["layer"])) == sorted(
            (role, layer) for role in ("resid_pre", "resid_post") for layer in range(model.n_layers)
        )
        assert country["layer"].tolist() == list(range(model.n_layers))
        for frame in (capital, country):
            assert frame["accuracy"].between(0, 1).all() and frame["control"].between(0, 1).all()
        assert (capital["n_train"] + capital["n_test"] == r["n_prompts"]).all()
        # The stored row of the first prompt is what a forward pre-hook on the last block reads
        # when that prompt runs alone (the extraction ran it in a left-padded batch).
        seen = {}

        def keep(module, args, kwargs, seen=seen):
            seen["x"] = args[0] if args else kwargs["hidden_states"]

        handle = ref.block(model.hf, model.n_layers - 1).register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad():
                model.hf(input_ids=torch.tensor([model.tokenizer(r["texts"][0])["input_ids"]]))
        finally:
            handle.remove()
        torch.testing.assert_close(r["first_row"], seen["x"][0, -1], atol=1e-4, rtol=1e-5)
