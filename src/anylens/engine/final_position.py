"""Runs that need the final position only: its logits (only the columns a metric reads), and
the last block's MLP there alone.

Sweeps score final-position logits. A metric that reads a few logits (a logit difference) has
only those columns computed, from the unembedding's input: a row's full logits cost as much as
a few blocks at one position, and reading the unembedding's weights dominates short runs. This
too is checked once per model (the unembedding of its input must give the model's logits).

In the last block, each position's MLP output goes only into that position's residual, which
nothing but that position's own logits reads; so the last MLP may run on the final position
alone. Its input (the norm reading ``resid_mid``, or the MLP itself in a parallel block) is cut
to that position; the one-position output broadcasts over the residual it is added to, which
leaves the final position exact and the others wrong (and never read). Keys and values of every
position are still computed, as the final query needs them. The cut is used only where the role
a run reads or writes comes before it, and only on models that pass a check (a cut run must
reproduce a full run's final logits): a block that does not add its MLP output to the residual
by broadcasting fails it and keeps its MLP whole.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from ..core.access import envoy_at
from .state import engine_state

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Relative tolerance of the check (float32): a broken cut misses by far more than rounding.
CHECK_RTOL = 1e-4


def forward_kwargs(model: AnyModel) -> frozenset[str]:
    """Names of the keyword arguments the model's forward takes (read once: a signature costs a
    quarter of a millisecond, and sweeps ask several times per forward)."""
    state = engine_state(model)
    if state.forward_kwargs is None:
        state.forward_kwargs = frozenset(inspect.signature(model.hf.forward).parameters)
    return state.forward_kwargs


def last_logits_kwargs(model: AnyModel) -> dict[str, Any]:
    """Ask the model for final-position logits only, where its forward supports it."""
    return {"logits_to_keep": 1} if "logits_to_keep" in forward_kwargs(model) else {}


def matches_within(got: torch.Tensor, expected: torch.Tensor, rtol: float) -> bool:
    """Whether ``got`` equals ``expected`` to ``rtol`` of its largest magnitude (at least 1), the
    tolerance scaled up for dtypes coarser than float32. NaN (logits not computed) must be NaN
    in both."""
    expected = expected.to(got.device, got.dtype)
    missing = expected.isnan()
    if not torch.equal(missing, got.isnan()):
        return False
    got, expected = got[~missing], expected[~missing]
    if expected.numel() == 0:
        return True
    coarseness = max(torch.finfo(got.dtype).eps / torch.finfo(torch.float32).eps, 1.0)
    tolerance = rtol * coarseness * max(1.0, float(expected.abs().max()))
    return float((got - expected).abs().max()) <= tolerance


def metric_columns(model: AnyModel, metric: Any) -> torch.Tensor | None:
    """The vocabulary ids ``metric`` reads (sorted), or None when it needs every logit, or when
    the model's logits are not its unembedding of the unembedding's input (a scale applied after
    it, say), which computing columns alone relies on."""
    columns = getattr(metric, "columns", None)
    ids = columns(model) if callable(columns) and not getattr(model, "remote", None) else None
    if ids is None:
        return None
    state = engine_state(model)
    if state.columns_work is None:
        state.columns_work = _unembedding_reproduces_logits(model)
    return torch.tensor(sorted(set(ids)), dtype=torch.long) if state.columns_work else None


def final_logits(model: AnyModel, hidden: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[rows, vocab]`` from the unembedding's input ``hidden`` ``[rows, d_model]``: all
    of them, or only ``columns`` with NaN elsewhere."""
    if columns is None:
        return model.unembed(hidden)
    part = model.unembed_columns(hidden, columns)
    full = part.new_full((hidden.shape[0], model.d_vocab), float("nan"))
    return full.index_copy_(1, columns.to(part.device), part)


def read_last(model: AnyModel, columns: torch.Tensor | None) -> Any:
    """Inside a trace, as its last read: the final-position logits, saved; with ``columns``, the
    unembedding's final-position input instead (the unembedding itself is skipped). Turn either
    into logits with :func:`last_logits` after the trace."""
    return model.logits[:, -1].save() if columns is None else read_unembedding_input(model)


def read_unembedding_input(model: AnyModel) -> Any:
    """Inside a trace, as its last read: the unembedding's final-position input, saved; the
    unembedding itself is skipped (its logits are computed apart, or not at all)."""
    head = envoy_at(model, model.adapter.unembed)
    inputs = head.input
    hidden = inputs[:, -1].clone().save()
    head.skip(inputs.new_zeros(()).expand(*inputs.shape[:-1], model.d_vocab))  # logits nobody reads
    return hidden


def last_logits(model: AnyModel, saved: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """The final-position logits from what :func:`read_last` saved."""
    return saved if columns is None else final_logits(model, saved, columns)


#: Roles a block computes from its MLP's input on: where one is read or written in the last
#: block, the MLP there cannot be cut.
AFTER_MLP_INPUT = ("mlp_post", "mlp_out", "resid_post")


def last_mlp(model: AnyModel, role: str | None, layers: Iterable[int | None]) -> str | None:
    """The module whose input feeds the last block's MLP, if a final-position run that reads or
    writes ``role`` at ``layers`` may cut that input to the final position; else None."""
    if role in AFTER_MLP_INPUT and model.n_layers - 1 in set(layers):
        return None  # the role needs the MLP at every position
    return _mlp_input_module(model)


def cut_to_final_position(model: AnyModel, module_path: str | None) -> None:
    """Inside a trace, after every read and write before it: hand the module at ``module_path``
    (from :func:`last_mlp`) its final position only. Does nothing when ``module_path`` is None."""
    if module_path is None:
        return
    envoy = envoy_at(model, module_path)
    envoy.input = envoy.input[:, -1:]


def _mlp_input_module(model: AnyModel) -> str | None:
    """Where the last MLP sublayer takes its input: the module that reads ``resid_mid`` (its
    norm, in a sequential block) or else the MLP of ``mlp_out`` (a parallel block), when that
    role is a plain module input or output and the model passes the check; None otherwise (no
    MLP, as in SSMs, or one fed flattened tokens)."""
    if model.n_layers < 1:
        return None
    for role, io in (("resid_mid", "input"), ("mlp_out", "output")):
        if role not in model.roles:
            continue
        path = model.role(role).path
        if path.io != io or path.select or path.view is not None or not path.per_layer:
            return None
        module = path.module_at(model.n_layers - 1)
        state = engine_state(model)
        if state.mlp_cut_works is None:
            state.mlp_cut_works = _cut_reproduces_full_run(model, module)
        return module if state.mlp_cut_works else None
    return None


def _check_ids(model: AnyModel) -> torch.Tensor:
    return torch.arange(3, 9, device=model.device)[None] % max(model.d_vocab, 1)


def _unembedding_reproduces_logits(model: AnyModel) -> bool:
    try:
        with torch.no_grad():
            with model.trace(_check_ids(model), **last_logits_kwargs(model)):
                hidden = envoy_at(model, model.adapter.unembed).input[:, -1].save()
                logits = model.logits[:, -1].save()
            return matches_within(model.unembed(hidden), logits, CHECK_RTOL)
    except Exception:
        return False


def _cut_reproduces_full_run(model: AnyModel, path: str) -> bool:
    if getattr(model, "remote", None):
        return False  # no local forward to check against
    ids = _check_ids(model)
    kwargs = last_logits_kwargs(model)
    try:
        with torch.no_grad():
            with model.trace(ids, **kwargs):
                full = model.logits[:, -1].save()
            with model.trace(ids, **kwargs):
                cut_to_final_position(model, path)
                cut = model.logits[:, -1].save()
    except Exception:
        return False
    return cut.shape == full.shape and matches_within(cut, full, CHECK_RTOL)


__all__ = [
    "AFTER_MLP_INPUT",
    "CHECK_RTOL",
    "cut_to_final_position",
    "final_logits",
    "forward_kwargs",
    "last_logits",
    "last_logits_kwargs",
    "last_mlp",
    "matches_within",
    "metric_columns",
    "read_last",
    "read_unembedding_input",
]
