"""``anylens check``: the invariants every adapter must pass, measured on a real trace.

Each invariant is computed in float32 from role values read through the adapter and compared
with what the model itself computes. A tolerance is absolute, scaled by the magnitude ``M`` of the
reference (its largest absolute value), because residual norms grow with depth, and by the precision
the model computes in::

    tolerance = max(ATOL * max(1, M), EPS_FACTOR * eps(dtype) * M)

A float32 model gets the first term (the second is 200 times smaller). A float16 or bfloat16
model rounds every value it stores by up to half an epsilon of its dtype, so a sum of three stored
values is already off by more than ``ATOL``: the second term, proportional to the values
themselves, takes over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import AnylensError
from ..core.model import AnyModel
from ..core.roles import BRANCH_INPUT_ROLES, BRANCH_OUTPUT, residual_writers

#: Absolute tolerance, relative to the reference magnitude (at least 1), for float32 equalities;
#: the floor of every dtype's tolerance.
ATOL = 1e-4
#: Epsilons of the model's dtype, times the reference magnitude, that an equality may be off by.
#: A correct adapter's error is the rounding of one or two stored sums, at most half an epsilon of
#: each: the zoo and SmolLM2 in float16 and bfloat16 stay within 1.3 epsilons on a CPU (SmolLM2's
#: residual sum in bfloat16 is the worst). 4 leaves three times that, and still catches a forgotten
#: logit soft-cap that bends the tiny Gemma 2's logits by 4.3 bfloat16 epsilons.
EPS_FACTOR = 4
#: A write of zeros must move the logits by more than this to count as having reached the model.
MIN_EFFECT = 1e-6


@dataclass
class CheckRow:
    invariant: str
    layer: int | None
    error: float
    tolerance: float
    passed: bool
    detail: str = ""


@dataclass
class CheckReport:
    """The outcome of ``al.check``: one row per invariant and layer."""

    adapter: str
    model: str
    rows: list[CheckRow] = field(default_factory=list)
    #: The dtype the model computes in, and its machine epsilon.
    dtype: str = "float32"
    eps: float = float(torch.finfo(torch.float32).eps)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(row.passed for row in self.rows)

    @property
    def failures(self) -> list[CheckRow]:
        return [row for row in self.rows if not row.passed]

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame([row.__dict__ for row in self.rows])

    def __str__(self) -> str:
        header = f"anylens check: {self.model} (adapter {self.adapter})"
        rule = (
            f"tolerance: max({ATOL:.0e} x max(1, M), {EPS_FACTOR} x eps x M), M = max |reference|,"
            f" eps = {self.eps:.1e} ({self.dtype})"
        )
        lines = [
            header,
            rule,
            "",
            "| invariant | layer | max abs error | tolerance | result | detail |",
            "|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            layer = "-" if row.layer is None else str(row.layer)
            result = "pass" if row.passed else "FAIL"
            lines.append(
                f"| {row.invariant} | {layer} | {row.error:.2e} | {row.tolerance:.1e} | {result} | {row.detail} |"
            )
        verdict = "all invariants pass" if self.passed else f"{len(self.failures)} of {len(self.rows)} checks FAIL"
        return "\n".join(lines + ["", verdict])


def check(model: AnyModel, inputs: Any = None, *, write_layers: list[int] | None = None) -> CheckReport:
    """Run the invariants of the adapter on ``model``; never raises for a failing adapter."""
    dtype = compute_dtype(model)
    report = CheckReport(
        adapter=model.adapter.name,
        model=model.name,
        dtype=str(dtype).removeprefix("torch."),
        eps=float(torch.finfo(dtype).eps),
    )
    ids = _default_inputs(model) if inputs is None else inputs
    with torch.no_grad():
        values, errors = _read_all(model, ids)
        for role, message in errors.items():
            report.rows.append(CheckRow(f"read {role}", None, float("nan"), 0.0, False, message))
        _structural(model, values, report)
        _writes(model, ids, values, report, write_layers)
        _branch_inputs(model, ids, values, report, write_layers)
    return report


def compute_dtype(model: AnyModel) -> torch.dtype:
    """The coarsest floating-point dtype among the model's parameters: the precision it computes in."""
    dtypes = {parameter.dtype for parameter in model.hf.parameters() if parameter.is_floating_point()}
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps, default=torch.float32)


def tolerance(magnitude: float, eps: float) -> float:
    """How far a value may be from a reference whose largest absolute value is ``magnitude``, for
    a model computing with machine epsilon ``eps``."""
    return max(ATOL * max(1.0, magnitude), EPS_FACTOR * eps * magnitude)


# -- reading --------------------------------------------------------------------------------
def _default_inputs(model: AnyModel) -> torch.Tensor:
    """Two random sequences: batch > 1 exposes roles that silently take batch row 0."""
    generator = torch.Generator().manual_seed(0)
    vocab = min(model.d_vocab, int(getattr(model.config, "vocab_size", model.d_vocab)))
    return torch.randint(4, vocab, (2, 12), generator=generator).to(model.device)


def _read_role(model: AnyModel, ids: torch.Tensor, role: str) -> Any:
    """All layers of one role, in its own trace (so no role order is assumed)."""
    layers = model.layers() if role in _layer_roles(model) else [None]
    saved: list[torch.Tensor] = []
    access = model.role(role)
    with model.trace(ids):
        for layer in layers:
            saved.append(access.read(layer).float().clone().save())
    return saved if layers != [None] else saved[0]


def _read_all(model: AnyModel, ids: torch.Tensor) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for role in model.roles:
        try:
            values[role] = _read_role(model, ids, role)
        except Exception as error:  # a broken mapping is a failed check, not a crash
            errors[role] = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
    return values, errors


def _layer_roles(model: AnyModel) -> set[str]:
    from ..core.roles import LAYER_ROLES

    return {role for role in model.roles if role in LAYER_ROLES}


# -- invariants 1-6 --------------------------------------------------------------------------
def _compare(report: CheckReport, name: str, layer: int | None, got: torch.Tensor, want: torch.Tensor) -> None:
    limit = tolerance(float(want.abs().max()), report.eps)
    if got.shape != want.shape:
        report.rows.append(
            CheckRow(name, layer, float("inf"), limit, False, f"shape {tuple(got.shape)} != {tuple(want.shape)}")
        )
        return
    error = float((got - want).abs().max())
    report.rows.append(CheckRow(name, layer, error, limit, error <= limit))


def _structural(model: AnyModel, v: dict[str, Any], report: CheckReport) -> None:
    n = model.n_layers
    if {"resid_pre", "resid_post"} <= v.keys():
        for i in range(n - 1):
            _compare(report, "1 resid_post[i] == resid_pre[i+1]", i, v["resid_post"][i], v["resid_pre"][i + 1])
    components = [role for role in residual_writers(model.roles) if role in v]
    if {"resid_pre", "resid_post"} <= v.keys() and components:
        label = "2 resid_pre + " + " + ".join(components) + " == resid_post"
        for i in range(n):
            total = v["resid_pre"][i]
            for role in components:
                total = total + v[role][i]
            _compare(report, label, i, total, v["resid_post"][i])
    if {"attn_out", "mixer_out"} <= v.keys():  # attention is the mixer: one tensor, two names
        for i in range(n):
            _compare(report, "2 mixer_out == attn_out", i, v["mixer_out"][i], v["attn_out"][i])
    if {"resid_mid", "resid_pre", "attn_out"} <= v.keys():
        for i in range(n):
            _compare(
                report,
                "3 resid_mid == resid_pre + attn_out",
                i,
                v["resid_mid"][i],
                v["resid_pre"][i] + v["attn_out"][i],
            )
    if {"resid_post", "logits"} <= v.keys() and "final_norm" in model.roles:
        normed = model.apply_final_norm(v["resid_post"][-1].to(model.dtype))
        _compare(
            report, "4 unembed(final_norm(resid_post[-1])) == logits", None, model.unembed(normed).float(), v["logits"]
        )
        if "final_norm" in v:
            _compare(report, "4 final_norm role == final_norm(resid_post[-1])", None, v["final_norm"], normed.float())
    if {"z", "attn_out"} <= v.keys() and model.adapter.z_feeds_residual and model.adapter.out_proj:
        for i in range(n):
            W_O, b_O = model.W_O(i).float(), model.b_O(i).float()
            per_head = torch.einsum("bphd,hdm->bphm", v["z"][i], W_O)
            _compare(report, "5 sum_h z[h] @ W_O[h] + b_O == attn_out", i, per_head.sum(2) + b_O, v["attn_out"][i])
    if "pattern" in v:
        for i in range(n):
            pattern = v["pattern"][i]
            _compare(report, "6 pattern rows sum to 1", i, pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
            future = torch.triu(torch.ones(pattern.shape[-2:], dtype=torch.bool, device=pattern.device), diagonal=1)
            leak = float(pattern[..., future].abs().max()) if future.any() else 0.0
            limit = tolerance(1.0, report.eps)  # probabilities: the reference magnitude is 1
            report.rows.append(CheckRow("6 pattern is causal", i, leak, limit, leak <= limit))
            if {"v", "z"} <= v.keys():
                values = v["v"][i]  # [batch, pos, kv_heads, d_head]
                expanded = values.repeat_interleave(model.n_heads // values.shape[2], dim=2)
                mixed = torch.einsum("bhqk,bkhd->bqhd", pattern, expanded)
                _compare(report, "6 pattern @ v == z", i, mixed, v["z"][i])


# -- invariant 7: writes reach the model ------------------------------------------------------
def _writes(
    model: AnyModel, ids: torch.Tensor, v: dict[str, Any], report: CheckReport, layers: list[int] | None
) -> None:
    if "logits" not in v:
        report.rows.append(CheckRow("7 writes", None, float("nan"), 0.0, False, "adapter has no 'logits' role"))
        return
    base = v["logits"]
    per_layer = _layer_roles(model)
    chosen = sorted({0, model.n_layers // 2, model.n_layers - 1}) if layers is None else model.layers(layers)
    for role in model.roles:
        if role not in v:
            continue
        for layer in chosen if role in per_layer else [None]:
            try:
                same = _logits_after_write(model, ids, role, layer, zero=False)
                zeroed = _logits_after_write(model, ids, role, layer, zero=True)
            except Exception as error:
                message = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
                report.rows.append(CheckRow(f"7 write {role}", layer, float("nan"), 0.0, False, message))
                continue
            _compare(report, f"7 write own value to {role}: logits unchanged", layer, same, base)
            effect = float((zeroed - base).abs().max())
            report.rows.append(
                CheckRow(f"7 write zeros to {role}: logits change", layer, effect, MIN_EFFECT, effect > MIN_EFFECT)
            )


def _logits_after_write(model: AnyModel, ids: torch.Tensor, role: str, layer: int | None, zero: bool) -> torch.Tensor:
    access = model.role(role)
    logits_access = model.role("logits")
    with model.trace(ids):
        current = access.read(layer)
        access.write(layer, torch.zeros_like(current) if zero else current.clone())
        logits = logits_access.read(None).float().clone().save()
    return logits


# -- invariant 8: branch inputs --------------------------------------------------------------
#: Which branch runs first within a sequential block: the token mixer (0), then the MLP (1).
_BRANCH_STAGE = {"attn_in": 0, "mixer_in": 0, "mlp_in": 1, "attn_out": 0, "mixer_out": 0, "mlp_out": 1}


def _branch_reads(model: AnyModel, role: str, v: dict[str, Any], layer: int) -> torch.Tensor | None:
    """What the branch of ``role`` must read at ``layer``: the stream before the block for the
    token mixer and for the MLP of a parallel block, the stream after attention for the MLP of a
    sequential block."""
    if "resid_pre" not in v:
        return None
    if role != "mlp_in" or model.adapter.parallel:
        return v["resid_pre"][layer]
    if "resid_mid" in v:
        return v["resid_mid"][layer]
    mixer = "attn_out" if "attn_out" in v else "mixer_out"
    return v["resid_pre"][layer] + v[mixer][layer] if mixer in v else None


def _shares_input(model: AnyModel, role: str) -> bool:
    """Whether the other branch reads through the same path (GPT-J: one norm feeds both)."""
    path = model.adapter.roles.get(role)
    return any(
        model.adapter.roles.get(other) == path
        for other in BRANCH_INPUT_ROLES
        if _BRANCH_STAGE[other] != _BRANCH_STAGE[role]
    )


def _branch_inputs(
    model: AnyModel, ids: torch.Tensor, v: dict[str, Any], report: CheckReport, layers: list[int] | None
) -> None:
    """8: a branch input reads the stream that branch sees, and writing it reaches that branch
    alone: its output changes, the residual connection keeps the unwritten stream, and a branch
    that does not read this one's output is unchanged."""
    branches = [role for role in BRANCH_INPUT_ROLES if role in v]
    for role in branches:
        for i in range(model.n_layers):
            want = _branch_reads(model, role, v, i)
            if want is not None:
                _compare(report, f"8 {role} == the stream its branch reads", i, v[role][i], want)
    writers = [role for role in residual_writers(model.roles) if role in v]
    if not ({"resid_pre", "resid_post"} <= v.keys() and writers):
        return
    chosen = sorted({0, model.n_layers // 2, model.n_layers - 1}) if layers is None else model.layers(layers)
    written: set[str] = set()
    for role in branches:
        path = model.adapter.roles[role]
        if path in written:  # attn_in and mixer_in are one path on attention models
            continue
        written.add(path)
        for layer in chosen:
            try:
                after = _after_branch_write(model, ids, role, layer, writers)
            except Exception as error:
                message = f"{type(error).__name__}: {error}".replace("\n", " ")[:300]
                report.rows.append(CheckRow(f"8 write {role}", layer, float("nan"), 0.0, False, message))
                continue
            own = BRANCH_OUTPUT[role]
            own = own if own in after else ("attn_out" if own == "mixer_out" and "attn_out" in after else None)
            if own is not None:
                effect = float((after[own] - v[own][layer]).abs().max())
                report.rows.append(
                    CheckRow(f"8 write {role}: {own} changes", layer, effect, MIN_EFFECT, effect > MIN_EFFECT)
                )
            carried = after["resid_post"] - sum(after[w] for w in writers)
            # A difference of stored values: its rounding scales with the largest of them.
            magnitude = max(float(t.abs().max()) for t in after.values())
            error = float((carried - v["resid_pre"][layer]).abs().max())
            limit = tolerance(magnitude, report.eps)
            label = f"8 write {role}: the residual keeps resid_pre"
            report.rows.append(CheckRow(label, layer, error, limit, error <= limit))
            for other in writers:
                if other == own or _shares_input(model, role):
                    continue
                if model.adapter.parallel or _BRANCH_STAGE[other] < _BRANCH_STAGE[role]:
                    _compare(report, f"8 write {role}: {other} unchanged", layer, after[other], v[other][layer])


def _after_branch_write(
    model: AnyModel, ids: torch.Tensor, role: str, layer: int, writers: list[str]
) -> dict[str, torch.Tensor]:
    """The layer's outputs after its branch input is replaced by the stream of reversed positions
    (a different stream of the same scale: norms ignore a rescaling, so scaling would show nothing).
    Outputs of an earlier branch are read before the write, to keep the reads in forward order."""
    access = model.role(role)
    before = [w for w in writers if _BRANCH_STAGE[w] < _BRANCH_STAGE[role]]
    out: dict[str, torch.Tensor] = {}
    with model.trace(ids):
        for name in before:
            out[name] = model.role(name).read(layer).float().clone().save()
        current = access.read(layer)
        access.write(layer, current.flip(1).clone())
        for name in [w for w in writers if w not in before] + ["resid_post"]:
            out[name] = model.role(name).read(layer).float().clone().save()
    return out


__all__ = [
    "ATOL",
    "EPS_FACTOR",
    "AnylensError",
    "CheckReport",
    "CheckRow",
    "check",
    "compute_dtype",
    "tolerance",
]
