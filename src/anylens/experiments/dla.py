"""Direct logit attribution: how much each component writes towards a logit (difference).

The residual stream before the final norm is a sum of components (``decompose_resid``). The
final norm is not linear, but with its per-position scale frozen at the value the real run
measured it is, and then each component's share of a logit is exact arithmetic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.errors import LinearisationError, PromptError
from ..core.model import linear_weight
from ..core.operations import only_role_operations
from ..core.positions import one_position
from ..core.roles import residual_writers
from .extraction import cache, decompose_resid
from .metrics import LogitDiff, Metric, named, target_ids
from .prompts import Prompts
from .renamed import renamed
from .results import Result, figure_and_axes

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Probe magnitude: large enough that a norm's epsilon is negligible (eps / M**2), small
#: enough that squares stay finite in float16.
_PROBE = 100.0


@dataclass(frozen=True)
class FrozenNorm:
    """The final norm at the real run, as a linear map plus a bias.

    ``norm(x) == (x - centre * mean(x)) * gain / scale + bias`` at the measured inputs, with
    ``scale`` ``[..., 1]`` one number per position (frozen) and ``gain``/``bias`` ``[d_model]``.
    """

    centre: bool
    gain: torch.Tensor
    bias: torch.Tensor
    scale: torch.Tensor

    def linear(self, component: torch.Tensor) -> torch.Tensor:
        """The frozen-scale norm of one component, without the bias: linear in ``component``."""
        if self.centre:
            component = component - component.mean(-1, keepdim=True)
        return component * self.gain / self.scale


def freeze_final_norm(model: AnyModel, resid: torch.Tensor, tolerance: float = 1e-4) -> FrozenNorm:
    """Linearise ``model.apply_final_norm`` around ``resid`` ``[..., d_model]``, naming no norm.

    The norm is treated as ``y = (x - c * mean(x)) * gain / scale(x) + bias``, which covers
    LayerNorm (c = 1, scale = std), RMSNorm (c = 0, scale = rms), Gemma's ``(1 + w)`` RMSNorm and
    an identity. Its pieces are measured on the module itself:

    * ``bias = norm(0)``;
    * ``c``: whether adding a constant to every coordinate leaves the output unchanged;
    * ``gain``: from a zero-mean probe ``M * u`` (u = +-1), whose scale is ``M * rms(u)`` for
      both kinds (up to ``eps / M**2``), so ``gain = (norm(M u) - bias) * rms(u) / u``;
    * ``scale``, one number per position: the least-squares ratio between the real centred
      input times ``gain`` and the real output minus ``bias``.

    The fit is then checked on the real input; a norm of another form raises
    :class:`LinearisationError`.
    """
    d = resid.shape[-1]
    with torch.no_grad():
        x = resid.detach()
        probe = _zero_mean_probe(d, x)
        out = model.apply_final_norm(torch.stack([torch.zeros_like(probe), _PROBE * probe, _PROBE * (probe + 1)])[None])
        out = out[0].float()
        bias, probed, shifted = out[0], out[1], out[2]
        centre = bool((probed - shifted).abs().max() <= 1e-3 * max(1.0, float(probed.abs().max())))
        gain = (probed - bias) * probe.float().pow(2).mean().sqrt() / probe.float()
        y = model.apply_final_norm(x).float()
        xf = x.float()
        centred = xf - xf.mean(-1, keepdim=True) if centre else xf
        predicted = centred * gain
        target = y - bias
        scale = (predicted * predicted).sum(-1, keepdim=True) / (predicted * target).sum(-1, keepdim=True)
        frozen = FrozenNorm(centre, gain, bias, scale)
        error = float((frozen.linear(xf) + bias - y).abs().max())
    bound = tolerance * max(1.0, float(y.abs().max()))
    if not error <= bound:
        raise LinearisationError(
            f"the final norm of {model.name!r} is not (x - c*mean(x)) * gain / scale + bias (fit error {error:.2e}); "
            "direct logit attribution needs a norm with one scale per position"
        )
    return frozen


def _zero_mean_probe(d: int, like: torch.Tensor) -> torch.Tensor:
    """+1 -1 +1 -1 ... with mean 0 and no zero entry (an odd width ends with 1, 1, -2)."""
    values = torch.ones(d, dtype=like.dtype, device=like.device)
    values[1::2] = -1
    if d % 2:
        values[-3:] = torch.tensor([1.0, 1.0, -2.0], dtype=like.dtype, device=like.device)
    return values


@dataclass(repr=False)
class DLAResult(Result):
    """One row per (prompt, component): its direct contribution to the metric.

    Components sum, with the ``"bias"`` row (the final norm's and the unembedding's biases), to
    ``meta["logit_diff"]``: the model's logit (difference) before any soft-cap.
    """

    def heads(self) -> pd.DataFrame:
        """Head contributions as a layer x head table (mean over prompts)."""
        frame = self.frame[self.frame["kind"] == "head"]
        return frame.pivot_table(index="layer", columns="head", values="value", aggfunc="mean")

    def plot(self, ax: Any = None, title: str | None = None, **_: Any) -> Any:
        """A horizontal bar per component (mean over prompts), in forward order."""
        means = self.frame.groupby("component", sort=False)["value"].mean()
        fig, ax = figure_and_axes(ax, (6, min(14, 1.5 + 0.22 * len(means))))
        colours = ["tab:red" if v < 0 else "tab:blue" for v in means.to_numpy()]
        ax.barh(range(len(means)), means.to_numpy(), color=colours)
        ax.set_yticks(range(len(means)))
        ax.set_yticklabels(list(means.index), fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlabel(self.meta.get("metric", "contribution"))
        ax.set_title(title or self.title)
        fig.tight_layout()
        return fig


@renamed(prompt="prompts", metric_or_targets="metric", position="positions")
@only_role_operations()
def direct_logit_attribution(
    model: AnyModel,
    prompts: Prompts,
    *,
    metric: Metric | str | int | Sequence[Any],
    per_head: bool = True,
    positions: int | Sequence[int] = -1,
) -> DLAResult:
    """Each component's direct contribution to a logit or logit difference at one position,
    ``positions`` (an index into the left-padded batch: the default -1 is every prompt's last
    token; a list of one index is accepted too).

    ``metric`` is a target word or token id (its logit), a pair ``(answer, distractor)`` or
    ``al.metrics.logit_diff(answer, distractor)`` (their logit difference), or ``"logit_diff"``
    with prompt pairs that carry both words; words must be
    single tokens and may be given per prompt. Components are those
    of ``decompose_resid`` on the last layer: embeddings, each layer's attention (each head with
    ``per_head``, where attention output is a linear function of ``z``, plus an ``"attn bias"``
    row), MLP and SSM mixer.

    The approximation, precisely: the final norm is replaced by its linearisation at the real
    run (:func:`freeze_final_norm`): each component ``v`` contributes
    ``((v - c*mean(v)) * gain / scale) . (W_U[:, answer] - W_U[:, distractor])``, where ``scale``
    is the real run's per-position norm scale (std for LayerNorm, rms for RMSNorm), frozen;
    centring (LayerNorm) is linear and is applied to each component. Nothing else is
    approximated: the final norm's bias and the unembedding's bias form the ``"bias"`` row, and
    all rows sum to the real logit difference before any logit soft-cap (``meta["logit_diff"]``;
    the model's capped value is ``meta["model_logit_diff"]``).
    """
    if isinstance(metric, str) and metric == "logit_diff":  # by name: from the prompt pairs' words
        metric = named("logit_diff", prompts)
    answer, distractor, label = _targets(metric)
    position = one_position(
        positions, PromptError, "direct logit attribution reads one position: call it once per position"
    )
    model.role("final_norm")  # a clear MissingRoleError: DLA goes through the final norm
    roles = [
        r
        for r in ("embed", "pos_embed", "resid_pre", *residual_writers(model.roles), "z", "resid_post", "logits")
        if r in model.roles
    ]
    if not per_head and "z" in roles:
        roles.remove("z")
    run = cache(model, prompts, roles=roles, positions=[position])
    components, labels = decompose_resid(run, layer=-1, per_head=per_head)
    batch = run.tokens.shape[0]

    with torch.no_grad():
        resid = run["resid_post", -1]  # [batch, 1, d]: the final norm's real input
        frozen = freeze_final_norm(model, resid)
        W_U, b_U = _unembedding(model)
        good = target_ids(model, answer, batch).to(W_U.device)
        bad = None if distractor is None else target_ids(model, distractor, batch).to(W_U.device)
        direction = _signed_sum(W_U.T, good, bad)  # [batch, d]
        offset = _signed_sum(b_U, good, bad) if b_U is not None else torch.zeros(batch, device=W_U.device)
        contributions = torch.einsum("nbpd,bd->nb", frozen.linear(components.float()), direction)
        bias_row = torch.einsum("d,bd->b", frozen.bias, direction) + offset
        pre_cap_logits = model.apply_final_norm(resid)[:, 0].float() @ W_U.float()
        if b_U is not None:
            pre_cap_logits = pre_cap_logits + b_U.float()
        pre_cap = _metric_of(pre_cap_logits, good, bad)
        model_value = _metric_of(run["logits"][:, 0].float(), good, bad) if "logits" in run.roles else None

    frame = _frame(model, labels, contributions, bias_row)
    tokens = model.to_str_tokens(run.tokens[0])
    meta = {
        "model": model.name,
        "adapter": model.adapter.name,
        "metric": label,
        "tokens": tokens,
        "prompt": prompts if isinstance(prompts, str) else [model.decode(row) for row in run.tokens],
        "position": position,
        "over": ["component"],
        "per_head": any(lab.startswith("head ") for lab in labels),
        "logit_diff": pre_cap.tolist(),
        "model_logit_diff": None if model_value is None else model_value.tolist(),
        "bias": bias_row.tolist(),
        "norm_centres": frozen.centre,
        "norm_scale": frozen.scale.reshape(-1).tolist(),
    }
    return DLAResult("direct_logit_attribution", frame, meta, "value")


def _signed_sum(rows: torch.Tensor, good: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """``rows[good] - rows[bad]`` (or ``rows[good]``) in float32: one vector per prompt."""
    value = rows[good].float()
    return value - rows[bad].float() if bad is not None else value


def _metric_of(logits: torch.Tensor, good: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    value = logits[rows, good.to(logits.device)]
    return value - logits[rows, bad.to(logits.device)] if bad is not None else value


def _targets(metric: Any) -> tuple[Any, Any, str]:
    if isinstance(metric, LogitDiff):
        a, b = metric.answer, metric.distractor
        return a, b, f"logit_diff({a!r}, {b!r})"
    if isinstance(metric, Metric):
        raise TypeError(
            f"direct logit attribution splits a logit or a logit difference, which are linear in the residual "
            f"stream; the {metric.name!r} metric is not. Pass a target word, a pair (answer, distractor) "
            "or al.metrics.logit_diff(answer, distractor)"
        )
    if isinstance(metric, (str, int)):
        return metric, None, f"logit({metric!r})"
    pair = list(metric)
    if len(pair) != 2:
        raise TypeError(f"give one target or a pair (answer, distractor), not {len(pair)} items: {pair!r}")
    return pair[0], pair[1], f"logit_diff({pair[0]!r}, {pair[1]!r})"


def _unembedding(model: AnyModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    module = model.module(model.adapter.unembed)
    bias = getattr(module, "bias", None)
    return linear_weight(module).detach(), None if bias is None else bias.detach()


_LABEL = re.compile(r"^(?P<kind>attn|mlp|mixer|head) (?P<layer>\d+)(?:\.(?P<head>\d+))?$")


def _frame(model: AnyModel, labels: list[str], contributions: torch.Tensor, bias_row: torch.Tensor) -> pd.DataFrame:
    rows = []
    values = contributions.cpu()
    for prompt in range(values.shape[1]):
        for index, label in enumerate(labels + ["bias"]):
            match = _LABEL.match(label)
            kind = match["kind"] if match else label.replace(" ", "_")
            rows.append(
                {
                    "model": model.name,
                    "prompt": prompt,
                    "component": label,
                    "kind": kind,
                    "layer": int(match["layer"]) if match else None,
                    "head": int(match["head"]) if match and match["head"] else None,
                    "value": float(values[index, prompt]) if index < len(labels) else float(bias_row[prompt]),
                }
            )
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["head"] = frame["head"].astype("Int64")
    return frame


__all__ = ["DLAResult", "FrozenNorm", "LinearisationError", "direct_logit_attribution", "freeze_final_norm"]
