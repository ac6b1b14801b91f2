"""Linear probes: which layers hold a label linearly, against a shuffled-label control.

``probe(activations | model, labels, ...)`` fits one multinomial logistic regression per stored
(role, layer) on a training split of the prompts and reports held-out accuracy. The split is by
prompt (all rows of a prompt fall on one side) and stratified by label, so each class keeps at
least one training prompt. The control is the same probe fitted to labels shuffled across
prompts with the same split: what a probe reaches by memorising rather than decoding.

Fitting is full-batch L-BFGS on standardised features (mean and spread of the training rows),
from zero weights, in float64: deterministic for a given seed and data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..core.errors import LabelError, LayerIndexError, MissingRoleError, ProbeOptionError
from .activation_store import Activations
from .results import Result, figure_and_axes

if TYPE_CHECKING:
    from ..core.model import AnyModel


@dataclass
class LinearProbe:
    """A fitted probe: ``predict(x)`` gives class indices into ``classes`` for rows ``x``."""

    weight: torch.Tensor  # [features, classes], on standardised features
    bias: torch.Tensor  # [classes]
    mean: torch.Tensor  # [features]
    scale: torch.Tensor  # [features]
    classes: list[Any]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.flatten(1).double() - self.mean) / self.scale
        return x @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(-1)


@dataclass
class ProbeResult(Result):
    """Held-out accuracy per (role, layer), with the control; ``probes`` holds the fitted probes."""

    probes: dict[tuple[str, int | None], LinearProbe] = field(default_factory=dict, repr=False)

    def plot(self, ax: Any = None, title: str | None = None, **_: Any) -> Any:
        """Accuracy by layer, one line per role, the shuffled-label control dashed, the majority
        class dotted."""
        fig, ax = figure_and_axes(ax, (6.5, 3.6))
        frame = self.frame[self.frame["layer"].notna()]
        for role, rows in frame.groupby("role", sort=False):
            rows = rows.sort_values("layer")
            (line,) = ax.plot(rows["layer"], rows["accuracy"], marker="o", label=f"{role}: held-out accuracy")
            ax.plot(rows["layer"], rows["control"], linestyle="--", color=line.get_color(), label=f"{role}: control")
        if len(frame):
            ax.axhline(float(frame["majority"].max()), color="gray", linestyle=":", label="majority class")
        ax.set_xlabel("layer")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        ax.set_title(title or self.title)
        fig.tight_layout()
        return fig


def probe(
    source: Activations | AnyModel,
    labels: Sequence[Any],
    *,
    roles: Iterable[str] | str | None = None,
    layers: Iterable[int] | int | None = None,
    positions: Any = None,
    prompts: Any = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float = 1e-3,
    max_iter: int = 100,
) -> ProbeResult:
    """Fit a linear probe for ``labels`` (one per prompt) at each role and layer.

    * ``source``: activations from :func:`anylens.extract` / :func:`anylens.load_activations`
      (every stored row is used; ``positions`` must be None), or a model, which is then run on
      ``prompts`` (at ``positions``, ``"last"`` by default; ``roles`` ``("resid_post",)`` by default).
    * ``roles`` / ``layers``: which stored tensors to probe (all when None).
    * ``test_fraction``: share of each class's prompts held out; ``seed`` fixes split and shuffle.
    * ``l2``: weight of the squared-norm penalty on standardised features.

    Returns a :class:`ProbeResult`: one row per (role, layer) with ``accuracy`` (held out),
    ``control`` (the same probe on shuffled labels), ``train_accuracy``, ``majority`` (the share
    of the most common class among the held-out rows), ``n_train``, ``n_test``, ``n_classes``.
    """
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    if not 0 < test_fraction < 1:
        raise ProbeOptionError(f"test_fraction={test_fraction!r}: give a share between 0 and 1, such as 0.25")
    if isinstance(source, Activations):
        if prompts is not None or positions is not None:
            raise ProbeOptionError(
                "prompts= and positions= were fixed when these activations were extracted; "
                "pass a model to probe(...) to choose them here"
            )
        acts = source
    else:
        if prompts is None:
            raise ProbeOptionError("probe(model, labels) needs prompts=[...]: the prompts the labels describe")
        from .activations import collect
        from .prompts import as_batch

        n_prompts = len(as_batch(prompts))
        if len(labels) != n_prompts:
            raise LabelError(f"{len(labels)} labels for {n_prompts} prompts: give exactly one label per prompt")
        acts = collect(
            source,
            prompts,
            roles=("resid_post",) if roles is None else roles,
            layers=layers,
            positions="last" if positions is None else positions,
            dtype="float32",
            quiet=True,
        )
    if len(labels) != acts.n_prompts:
        raise LabelError(f"{len(labels)} labels for {acts.n_prompts} prompts: give exactly one label per prompt")
    keys = _keys(acts, roles, layers)
    classes = sorted(set(labels), key=lambda v: (str(type(v)), v))
    if len(classes) < 2:
        raise LabelError(f"every label is {classes[0]!r}: a probe needs at least two classes")
    y_prompt = torch.tensor([classes.index(v) for v in labels])
    train_prompts = _split(y_prompt, test_fraction, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    shuffled = y_prompt[torch.randperm(len(y_prompt), generator=generator)]

    prompt_of_row = acts.prompt.long()
    train = train_prompts[prompt_of_row]
    rows = []
    fitted = {}
    for role, layer in keys:
        x = acts[role, layer].flatten(1).double()
        for name, y_all in (("accuracy", y_prompt), ("control", shuffled)):
            y = y_all[prompt_of_row]
            model = fit(x[train], y[train], len(classes), l2, max_iter)
            held_out = float((model.predict(x[~train]) == y[~train]).double().mean())
            if name == "accuracy":
                row = {
                    "model": acts.model_name,
                    "role": role,
                    "layer": layer,
                    "accuracy": held_out,
                    "train_accuracy": float((model.predict(x[train]) == y[train]).double().mean()),
                }
                model.classes = classes
                fitted[(role, layer)] = model
            else:
                row["control"] = held_out
        test_labels = y_prompt[prompt_of_row][~train]
        row.update(
            majority=float(test_labels.bincount().max()) / len(test_labels),
            n_train=int(train.sum()),
            n_test=int((~train).sum()),
            n_classes=len(classes),
        )
        rows.append(row)
    frame = pd.DataFrame(rows)
    meta = {
        "model": acts.model_name,
        "positions": acts.manifest["config"]["positions"],
        "test_fraction": test_fraction,
        "seed": seed,
        "l2": l2,
        "test_prompts": (~train_prompts).nonzero().flatten().tolist(),
        "classes": classes,
        "over": ["layer"],
        "value_label": "held-out accuracy",
    }
    return ProbeResult("probe", frame, meta, "accuracy", fitted)


def _keys(acts: Activations, roles: Iterable[str] | str | None, layers: Iterable[int] | int | None) -> list:
    stored = acts.keys()
    names = list(dict.fromkeys(role for role, _ in stored)) if roles is None else _listed(roles)
    for role in names:
        if role not in acts.roles:
            raise MissingRoleError(
                f"role {role!r} is not in these activations (roles {list(acts.roles)}); "
                f"extract it with al.extract(model, prompts, roles=[{role!r}], out=<a new directory>)"
            )
    n_layers = int(acts.manifest["model"]["n_layers"])
    chosen = None
    if layers is not None:
        chosen = []
        for layer in [layers] if isinstance(layers, int) else layers:
            if not -n_layers <= layer < n_layers:
                raise LayerIndexError(
                    f"layer {layer} is out of range for {n_layers} layers (valid: 0..{n_layers - 1} or -{n_layers}..-1)"
                )
            if layer % n_layers not in acts.layers:
                raise LayerIndexError(
                    f"layer {layer} was not extracted (layers {acts.layers}); extract it into a new out"
                )
            chosen.append(layer % n_layers)
    keys = []
    for role, layer in stored:
        if role in names and (layer is None or chosen is None or layer in chosen):
            keys.append((role, layer))
    return sorted(keys, key=lambda key: (names.index(key[0]), -1 if key[1] is None else key[1]))


def _listed(roles: Iterable[str] | str) -> list[str]:
    return [roles] if isinstance(roles, str) else list(roles)


def _split(y: torch.Tensor, test_fraction: float, seed: int) -> torch.Tensor:
    """``[prompts]`` bool, True for training prompts: per class, a seeded share held out, never
    the class's last prompt."""
    generator = torch.Generator().manual_seed(seed)
    train = torch.ones(len(y), dtype=torch.bool)
    for label in range(int(y.max()) + 1):
        members = (y == label).nonzero().flatten()
        if len(members) < 2:
            continue
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = min(len(members) - 1, max(1, int(len(members) * test_fraction + 0.5)))
        train[members[:n_test]] = False
    if train.all():
        raise LabelError("no class has two prompts, so none can be held out: give several prompts per label")
    return train


def fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, max_iter: int = 200) -> LinearProbe:
    """Multinomial logistic regression with an L2 penalty, by full-batch L-BFGS from zeros."""
    mean = x.mean(0)
    scale = x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / scale
    weight = torch.zeros(z.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, scale, [])


__all__ = ["LinearProbe", "ProbeResult", "fit", "probe"]
