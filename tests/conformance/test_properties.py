"""Properties over drawn inputs: every tiny shape keeps the adapter invariants, and any selection
of layers, positions and components patches exactly like a one-patch-per-forward hook reference.
"""

from __future__ import annotations

import importlib.util

import hook_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import model_cache, random_prompt_pairs

import anylens as al
from anylens.testing import GROUPED_FAMILIES, TINY_BUILDERS, TinyShape, tiny

# Examples are drawn afresh on each run; a failure prints the drawn values. No example database:
# nothing is written into the working tree.
FEW = settings(max_examples=5, deadline=None, database=None)


def _family_params() -> list:
    native_mamba_here = importlib.util.find_spec("mamba_ssm") is not None and torch.cuda.is_available()
    skip = pytest.mark.skipif(not native_mamba_here, reason="mamba-ssm runs only where it is built for CUDA")
    return [pytest.param(f, marks=skip) if f == "mamba_ssm" else f for f in TINY_BUILDERS]


# -- (1) random tiny shapes keep every invariant -------------------------------------------------


@st.composite
def shapes(draw, family: str) -> TinyShape:
    """1-3 layers, 1-4 heads (key/value heads dividing them where the family groups them), an even
    head width of 4-16 (rotary embeddings turn pairs of dimensions), and a small vocabulary."""
    n_heads = draw(st.integers(1, 4))
    n_kv_heads = n_heads
    if family in GROUPED_FAMILIES:
        n_kv_heads = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
    return TinyShape(
        n_layers=draw(st.integers(1, 3)),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_head=draw(st.sampled_from(range(4, 17, 2))),
        d_vocab=draw(st.integers(16, 64)),
    )


@pytest.mark.parametrize("family", _family_params())
@FEW
@given(data=st.data())
def test_check_passes_on_random_tiny_shapes(family, data):
    shape = data.draw(shapes(family), label="shape")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = tiny(family, seed=seed, shape=shape)
    assert model.n_layers == shape.n_layers and model.d_vocab == shape.d_vocab
    if "z" in model.roles:  # the drawn heads are the model's
        assert (model.n_heads, model.n_kv_heads, model.d_head) == (shape.n_heads, shape.n_kv_heads, shape.d_head)
    report = al.check(model)
    assert report.dtype == "float32"
    assert report.passed, f"{shape}\n{report}"


# -- (2) any selection patches like the hook reference -------------------------------------------

TOL = 1e-5  # float32: the same patched forwards, run batched by anylens and one by one here
ANSWER, DISTRACTOR = 300, 301
METRIC = al.metrics.logit_diff(ANSWER, DISTRACTOR)
PATCH_FAMILIES = ["gpt2", "llama", "gpt_neox", "mamba"]  # learned / rotary / parallel blocks / SSM
#: Roles the hook reference can patch.
PATCH_ROLES = ("resid_pre", "z", "resid_mid", "mlp_out")
LENGTH = 6

model_of = model_cache()


def _subset(n: int) -> st.SearchStrategy:
    """None (all n) or a non-empty list of distinct indices below n, in any order, some counted from the end."""
    indices = st.lists(st.integers(-n, n - 1), min_size=1, max_size=n, unique_by=lambda i: i % n)
    return st.none() | indices


@st.composite
def selections(draw, model: al.AnyModel) -> dict:
    role = draw(st.sampled_from([r for r in PATCH_ROLES if r in model.roles]))
    overs = [("layer",), ("layer", "pos")]
    if role == "z":
        overs += [("layer", "head"), ("layer", "head", "pos")]
    return {
        "role": role,
        "over": draw(st.sampled_from(overs)),
        "layers": draw(_subset(model.n_layers)),
        "positions": draw(_subset(LENGTH)),
        "direction": draw(st.sampled_from(["denoise", "noise"])),
    }


def reference_cells(hf, clean, corrupt, role, over, layers, positions, direction) -> dict[tuple, float]:
    """{(layer, head?, pos?): metric}: one hooked forward per cell, the source activation written in
    at the cell's positions (each one alone when sweeping 'pos', all of them together otherwise)."""
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    n = ref.n_layers(hf)
    layer_list = range(n) if layers is None else [i % n for i in layers]
    pos_list = range(LENGTH) if positions is None else [p % LENGTH for p in positions]
    heads = range(ref.n_heads(hf)) if "head" in over else [None]
    groups = [[p] for p in pos_list] if "pos" in over else [list(pos_list)]
    cells = {}
    with torch.no_grad():
        source_acts, _ = ref.capture(hf, role, source)
        for layer in layer_list:
            for head in heads:
                for group in groups:

                    def edit(value, layer=layer, head=head, group=group):
                        for pos in group:
                            value = ref.replace(value, source_acts[layer], role, hf, pos, head)
                        return value

                    logits = ref.run(hf, target, {(role, layer): edit})
                    key = (layer,) + ((head,) if "head" in over else ()) + ((group[0],) if "pos" in over else ())
                    cells[key] = ref.logit_diff(logits, ANSWER, DISTRACTOR).mean().item()
    return cells


@pytest.mark.parametrize("family", PATCH_FAMILIES)
@settings(max_examples=10, deadline=None, database=None)
@given(data=st.data())
def test_patch_selection_matches_hook_reference(family, data):
    model = model_of(family)
    chosen = data.draw(selections(model), label="selection")
    clean, corrupt = random_prompt_pairs(seed=data.draw(st.integers(0, 99), label="prompt seed"), length=LENGTH)
    result = al.patch(model, clean, corrupt, metric=METRIC, **chosen)
    expected = reference_cells(model.hf, clean, corrupt, **chosen)

    columns = [d for d in ("layer", "head", "pos") if d in chosen["over"]]
    frame = result.to_frame()
    got = {tuple(int(v) for v in row[columns]): float(row["metric"]) for _, row in frame.iterrows()}
    assert set(got) == set(expected), f"cells {sorted(got)} != reference cells {sorted(expected)}"
    worst = max(abs(got[key] - value) for key, value in expected.items())
    assert worst <= TOL, f"max abs error {worst:.2e} over {len(expected)} cells"
