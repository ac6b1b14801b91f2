"""The logit lens: read every layer's residual stream through the model's own final norm and
unembedding, as if the model stopped there."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..core.errors import MetricError, PromptError
from ..core.operations import only_role_operations
from ..core.positions import normalize_positions
from .extraction import read_roles
from .metrics import NAMED, Metric, named
from .pair_positions import named_indices
from .prompts import Prompts, tokenize
from .renamed import renamed
from .results import Result

if TYPE_CHECKING:
    from ..core.model import AnyModel


#: Per-layer roles that live in the residual stream's space, so the final norm applies to them.
RESIDUAL_SHAPED = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mixer_out")


@dataclass(repr=False)
class LogitLensResult(Result):
    """Logit-lens predictions per (layer, pos).

    ``frame`` has one row per (layer, pos, target) with the target's ``prob``, ``log_prob`` and
    ``rank`` (0 = top prediction), plus the top-1 token; without targets, one row per
    (layer, pos) whose ``value`` is the top-1 probability. ``top_k()`` lists the k best tokens.
    """

    top: pd.DataFrame | None = None

    def top_k(self) -> pd.DataFrame:
        """One row per (layer, pos, rank): the k most likely tokens with prob and log_prob."""
        return self.top.copy() if self.top is not None else pd.DataFrame()

    def plot(self, target: str | int | None = None, annotate: bool = True, **kwargs: Any) -> Any:
        """Heatmap over layer x pos of a target's probability (the first target by default), or
        of the top-1 probability without targets; cells are labelled with the top-1 token."""
        frame = self.frame
        label = "top-1 prob"
        if "target" in frame.columns:
            targets = list(dict.fromkeys(frame["target"]))
            chosen = targets[0] if target is None else (target if isinstance(target, str) else str(target))
            if chosen not in targets:
                raise KeyError(f"target {target!r} is not in this result; its targets are {targets}")
            frame = frame[frame["target"] == chosen]
            label = f"p({chosen!r})"
        elif target is not None:
            raise KeyError(
                "this logit lens ran without targets: pass metric=[...target words] to al.logit_lens to plot one"
            )
        meta = dict(self.meta, value_label=label)
        view = Result(self.experiment, frame, meta, self.value)
        kwargs.setdefault("title", f"logit lens · {self.meta.get('model', '')} · {label}")
        fig = view.plot(index="layer", columns="pos", **kwargs)
        if annotate:
            _annotate_top_tokens(fig.axes[0], frame)
        return fig

    # -- persistence: the top-k table travels in the JSON file's meta -----------------------------
    def save(self, path: str | Path) -> Path:
        top = [] if self.top is None else json_records(self.top)
        return Result(self.experiment, self.frame, dict(self.meta, top_k=top), self.value).save(path)

    @classmethod
    def load(cls, path: str | Path) -> LogitLensResult:
        plain = Result.load(path)
        meta = dict(plain.meta)
        top = pd.DataFrame(meta.pop("top_k", []))
        return cls(plain.experiment, plain.frame, meta, plain.value, top)


def json_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    import json

    return json.loads(frame.to_json(orient="records"))


def _annotate_top_tokens(ax: Any, frame: pd.DataFrame, max_cells: int = 400) -> None:
    table = frame.pivot_table(index="layer", columns="pos", values="top_token", aggfunc="first")
    if table.size > max_cells:
        return
    for row, layer in enumerate(table.index):
        for column, pos in enumerate(table.columns):
            text = table.loc[layer, pos]
            if isinstance(text, str):
                ax.text(
                    column, row, text.strip()[:6] or repr(text), ha="center", va="center", fontsize=6, color="white"
                )


@renamed(prompt="prompts", targets="metric")
@only_role_operations("role")
def logit_lens(
    model: AnyModel,
    prompts: Prompts,
    *,
    metric: Metric | str | int | Sequence[str | int] | None = None,
    k: int = 5,
    positions: int | str | slice | Iterable[int | str] | None = None,
    role: str = "resid_post",
) -> LogitLensResult:
    """Apply the model's final norm and unembedding to ``role`` at every layer and position.

    ``metric`` names the target words whose probability, log-probability and rank are reported:
    words (each exactly one token, see ``model.token_id``) or token ids, a metric object whose
    words are taken (``al.metrics.logit_diff(" Paris", " Rome")`` reports both), or a metric by
    name (``"logit_diff"``, ``"prob"``, ...) built from a prompt pair's words. A string that is a
    metric name is read as one, not as a word. ``k`` top tokens are always listed.
    Applied to ``resid_post`` of the last layer, the lens reproduces the model's own logits
    (with any soft-cap). One prompt at a time; ``positions`` restricts the positions read (names
    the prompt defines too: ``positions=["subject_last", "END"]``, rows then carry ``pos_label``).
    """
    if role not in RESIDUAL_SHAPED:
        raise KeyError(
            f"the logit lens reads a per-layer role of shape [batch, pos, d_model] ({', '.join(RESIDUAL_SHAPED)}), not {role!r}"
        )
    targets = _lens_targets(metric, prompts)
    inputs = tokenize(model, prompts)
    if inputs["input_ids"].shape[0] != 1:
        raise PromptError(f"logit_lens takes one prompt; got {inputs['input_ids'].shape[0]}: call it once per prompt")
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    n_pos = inputs["input_ids"].shape[1]
    positions, labels = named_indices(prompts, positions, n_pos)  # names the prompt defines, as indices
    chosen = normalize_positions(positions, n_pos)
    chosen = list(range(n_pos)) if chosen is None else chosen
    model.role(role)  # a clear MissingRoleError before the run
    layers = model.layers()
    values = read_roles(model, inputs, [(role, layer) for layer in layers], chosen)

    tokens = model.to_str_tokens(inputs["input_ids"][0])
    target_ids = _target_ids(model, targets)
    target_labels = [t if isinstance(t, str) else model.decode([int(t)]) for t in _as_list(targets)]
    k = max(1, min(k, model.d_vocab))
    main, top = [], []
    with torch.no_grad():
        for layer in layers:
            logits = model.unembed(model.apply_final_norm(values[(role, layer)]))[0].float()  # [pos, vocab]
            log_probs = logits.log_softmax(-1)
            top_lp, top_ids = log_probs.topk(k, dim=-1)
            top.append(_top_rows(model, layer, chosen, tokens, top_lp, top_ids))
            main.append(
                _main_rows(model, layer, chosen, tokens, logits, log_probs, top_lp, top_ids, target_ids, target_labels)
            )

    frame = pd.concat(main, ignore_index=True)
    frame.insert(0, "model", model.name)
    if labels:  # positions asked for by name: the name, else the token (how sweeps group them)
        frame.insert(frame.columns.get_loc("token") + 1, "pos_label", [labels.get(p, tokens[p]) for p in frame["pos"]])
    top_frame = pd.concat(top, ignore_index=True)
    top_frame.insert(0, "model", model.name)
    meta = {
        "model": model.name,
        "adapter": model.adapter.name,
        "role": role,
        "metric": "prob" if target_ids else "top-1 prob",
        "tokens": tokens,
        "prompt": model.decode(inputs["input_ids"][0]) if not isinstance(prompts, str) else prompts,
        "over": ["layer", "pos"],
        "targets": target_labels,
        "k": k,
    }
    return LogitLensResult("logit_lens", frame, meta, "value", top_frame)


def _lens_targets(metric: Any, prompts: Prompts) -> Any:
    """The target words of ``metric``: words or ids as given, or the words a metric reads."""
    if isinstance(metric, str) and metric in NAMED:
        metric = named(metric, prompts)
    if not isinstance(metric, Metric):
        return metric
    words = [getattr(metric, field) for field in ("answer", "distractor", "target") if hasattr(metric, field)]
    if not words:
        raise MetricError(
            f"the logit lens reports the probability of target words, and the {metric.name!r} metric has none: "
            "pass words (metric=[' Paris', ' Rome']) or a metric built from words, such as al.metrics.prob(' Paris')"
        )
    return [w for word in words for w in ([word] if isinstance(word, (str, int)) else word)]


def _as_list(targets: Any) -> list[Any]:
    if targets is None:
        return []
    return [targets] if isinstance(targets, (str, int)) else list(targets)


def _target_ids(model: AnyModel, targets: Any) -> list[int]:
    return [model.token_id(t) for t in _as_list(targets)]


def _top_rows(
    model: AnyModel, layer: int, positions: list[int], tokens: list[str], top_lp: torch.Tensor, top_ids: torch.Tensor
) -> pd.DataFrame:
    n_pos, k = top_ids.shape
    ids = top_ids.cpu().numpy()
    lp = top_lp.cpu().numpy()
    return pd.DataFrame(
        {
            "layer": layer,
            "pos": np.repeat(positions, k),
            "token": np.repeat([tokens[p] for p in positions], k),
            "rank": np.tile(np.arange(k), n_pos),
            "top_token": [model.decode([int(i)]) for i in ids.reshape(-1)],
            "top_id": ids.reshape(-1),
            "prob": np.exp(lp).reshape(-1),
            "log_prob": lp.reshape(-1),
        }
    )


def _main_rows(
    model: AnyModel,
    layer: int,
    positions: list[int],
    tokens: list[str],
    logits: torch.Tensor,
    log_probs: torch.Tensor,
    top_lp: torch.Tensor,
    top_ids: torch.Tensor,
    target_ids: list[int],
    target_labels: list[str],
) -> pd.DataFrame:
    base = pd.DataFrame(
        {
            "layer": layer,
            "pos": positions,
            "token": [tokens[p] for p in positions],
            "top_token": [model.decode([int(i)]) for i in top_ids[:, 0].cpu()],
            "top_id": top_ids[:, 0].cpu().numpy(),
            "top_prob": top_lp[:, 0].exp().cpu().numpy(),
        }
    )
    if not target_ids:
        return base.assign(value=base["top_prob"])
    parts = []
    for target_id, label in zip(target_ids, target_labels):
        chosen_logit = logits[:, target_id]
        rank = (logits > chosen_logit[:, None]).sum(-1)  # 0 = the top prediction
        lp = log_probs[:, target_id]
        parts.append(
            base.assign(
                target=label,
                target_id=target_id,
                prob=lp.exp().cpu().numpy(),
                log_prob=lp.cpu().numpy(),
                rank=rank.cpu().numpy(),
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    return frame.assign(value=frame["prob"])


__all__ = ["LogitLensResult", "logit_lens"]
