"""Runs that need the final position only: the last MLP cut to that position, and only the
logits a metric reads. Both checked against plain forwards of the unmodified model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PlainLM, model_cache, plain_lm_adapter

import anylens as al
from anylens.core.spec import AdapterSpec
from anylens.engine.final_position import (
    cut_to_final_position,
    final_logits,
    last_mlp,
    matches_within,
    metric_columns,
)
from anylens.testing import tiny_tokenizer

TOL = 1e-5
model_of = model_cache()


def _ids(model, n: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(4, min(model.d_vocab, 400), (n, length), generator=torch.Generator().manual_seed(3))


def test_cut_last_mlp_keeps_the_final_logits(family):
    model = model_of(family)
    path = last_mlp(model, "resid_pre", model.layers())
    mlp_out = model.role("mlp_out").path if "mlp_out" in model.roles else None
    if mlp_out is None or mlp_out.view is not None:
        assert path is None  # no MLP (an SSM block), or one fed flattened tokens (OPT)
        return
    assert path is not None, f"{family}: the cut failed its check on a model it fits"
    ids = _ids(model)
    shapes = []
    mlp = model.module(mlp_out.module_at(model.n_layers - 1))
    handle = mlp.register_forward_hook(lambda m, args, out: shapes.append(tuple(_first(out).shape)))
    try:
        with torch.no_grad():
            expected = model.hf(input_ids=ids).logits[:, -1]
            with model.trace(ids):
                cut_to_final_position(model, path)
                got = model.logits[:, -1].save()
    finally:
        handle.remove()
    assert shapes[-1][:2] == (2, 1)  # the MLP sublayer ran on one position
    assert (got - expected).abs().max() <= TOL


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def has_plain_mlp(spec: AdapterSpec) -> bool:
    """An MLP the final-position run can cut: ``mlp_out`` not fed flattened tokens (as OPT's is)."""
    return "mlp_out" in spec.roles and spec.role_path("mlp_out").view is None


@pytest.mark.needs_roles(where=has_plain_mlp)
def test_no_cut_where_the_role_comes_after_the_last_mlp_input(family):
    model = model_of(family)
    assert last_mlp(model, "resid_pre", model.layers()) is not None
    last = model.n_layers - 1
    for role in ("mlp_out", "mlp_post", "resid_post"):
        if role in model.roles:
            assert last_mlp(model, role, [last]) is None, role
            assert last_mlp(model, role, range(last)) is not None, role
    for role in ("resid_pre", "attn_out", "z", "resid_mid"):
        if role in model.roles:
            assert last_mlp(model, role, [last]) is not None, role


class _Block(torch.nn.Module):
    def __init__(self, width: int, flatten: bool):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width)
        )
        self.flatten = flatten

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.flatten:  # tokens flattened before the MLP, as some routed MLPs do
            return hidden + self.mlp(self.norm(hidden).flatten(0, 1)).view_as(hidden)
        return hidden + self.mlp(self.norm(hidden))


_ADAPTER = plain_lm_adapter("plain-mlp-lm", mlp_out="layers.{i}.mlp.output")


@pytest.mark.parametrize("flatten", [False, True])
def test_cut_is_used_only_where_it_reproduces_a_full_run(flatten):
    """A block that flattens tokens before its MLP cannot be cut: the check says so, and runs
    keep the MLP whole instead of failing or going wrong."""
    torch.manual_seed(0)
    model = al.wrap(PlainLM([_Block(8, flatten) for _ in range(2)], vocab=40, width=8).eval(), adapter=_ADAPTER)
    path = last_mlp(model, "resid_pre", model.layers())
    assert (path is None) == flatten
    assert path in (None, "layers.1.mlp")  # no resid_mid here: the MLP itself is cut


def test_metric_columns():
    model = model_of("gpt2")
    paris, rome = model.token_id(" Paris"), model.token_id(" Rome")
    columns = metric_columns(model, al.metrics.logit_diff([" Rome", " Paris"], [" Paris", " Paris"]))
    assert columns.tolist() == sorted({paris, rome})
    assert metric_columns(model, al.metrics.logit_diff(7, 3)).tolist() == [3, 7]
    for metric in (
        al.metrics.kl(),
        al.metrics.prob(" Paris"),
        al.metrics.rank(" Paris"),
        lambda logits, m, ref: logits[:, 0],
    ):
        assert metric_columns(model, metric) is None


class _ScaledLM(PlainLM):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(input_ids)  # a scale after the unembedding, unknown to the adapter


@pytest.mark.parametrize("scaled", [False, True])
def test_columns_only_where_the_unembedding_gives_the_logits(scaled):
    """Logits computed apart from the unembedding's input must be the model's: a model that
    rescales them after its unembedding gets every logit from its own forward instead."""
    torch.manual_seed(0)
    lm = (_ScaledLM if scaled else PlainLM)([_Block(8, False) for _ in range(2)], vocab=40, width=8).eval()
    model = al.wrap(lm, tiny_tokenizer(), adapter=_ADAPTER)
    metric = al.metrics.logit_diff(5, 6)
    assert (metric_columns(model, metric) is None) == scaled
    # Positions do not interact in this model: a patch restores the clean metric exactly where it
    # writes the final position, and changes nothing elsewhere.
    clean, corrupt = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[1, 2, 3, 4, 9]])
    kwargs = dict(role="resid_pre", over=("layer", "pos"), metric=metric, normalize=False)
    if scaled:  # the reuse guard also sees the unembedding miss the logits, and runs rows in full
        with pytest.warns(UserWarning, match="reuse of unpatched work is off"):
            result = al.patch(model, clean, corrupt, **kwargs)
    else:
        result = al.patch(model, clean, corrupt, **kwargs)
    with torch.no_grad():
        clean_metric, corrupt_metric = (float(metric(lm(ids)[:, -1], model)) for ids in (clean, corrupt))
    assert abs(clean_metric - corrupt_metric) > 1e-3
    frame = result.to_frame()
    final = frame.pos == 4
    assert (frame.metric[final] - clean_metric).abs().max() <= TOL
    assert (frame.metric[~final] - corrupt_metric).abs().max() <= TOL


def test_final_logits_of_columns_equal_the_model_logits_there(family):
    """Only the asked columns are computed (with the model's soft-cap); the rest are NaN."""
    model = model_of(family)
    ids = _ids(model)
    seen = []
    head = model.module(model.adapter.unembed)
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, -1].clone()))
    try:
        with torch.no_grad():
            expected = model.hf(input_ids=ids).logits[:, -1]
    finally:
        handle.remove()
    columns = torch.tensor([3, 11, model.d_vocab - 1])
    with torch.no_grad():
        got = final_logits(model, seen[0], columns)
    assert got.shape == expected.shape
    assert (got[:, columns] - expected[:, columns]).abs().max() <= TOL
    others = torch.ones(model.d_vocab, dtype=torch.bool)
    others[columns] = False
    assert got[:, others].isnan().all()
    assert matches_within(got, got.clone(), 1e-4)
    assert not matches_within(got, expected, 1e-4)  # computed where the other is NaN: no match


@pytest.mark.parametrize("experiment", ["patch", "ablate"])
def test_sweeps_with_reuse_compute_only_the_columns_a_metric_reads(experiment, monkeypatch):
    model = model_of("gpt2")
    ids = _ids(model, n=2, length=6)
    metric = al.metrics.logit_diff(7, 3)
    kwargs = dict(role="resid_pre", over=("layer",), metric=metric)

    def sweep(reuse: bool):
        if experiment == "patch":
            return al.patch(model, ids, ids.flip(0), reuse=reuse, normalize=False, **kwargs)
        return al.ablate(model, ids, reuse=reuse, **kwargs)

    full = sweep(reuse=False)  # every logit, from the model's own forward
    asked = []
    original = model.unembed_columns
    monkeypatch.setattr(
        model, "unembed_columns", lambda hidden, columns: asked.append(columns.tolist()) or original(hidden, columns)
    )
    reused = sweep(reuse=True)
    assert asked and all(columns == [3, 7] for columns in asked)
    got, expected = (torch.tensor(r.to_frame()["metric"].to_numpy()) for r in (reused, full))
    assert (got - expected).abs().max() <= TOL
