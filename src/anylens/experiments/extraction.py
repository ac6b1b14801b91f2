"""Activation extraction: many roles of a batch of prompts in one trace, and what to do with them.

``cache(model, prompts)`` runs the model once and returns an :class:`ActivationCache` holding
every requested role at every requested layer. The cache stacks a role over layers and
decomposes the residual stream into the components that wrote it (embeddings, each layer's
attention or each head, MLP, SSM mixer), which sum back to ``resid_post``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core.errors import LayerIndexError, MissingRoleError
from ..core.operations import only_role_operations
from ..core.positions import normalize_positions
from ..core.roles import (
    LAYER_ROLE_ORDER,
    LAYER_ROLES,
    MODEL_ROLES_AFTER_LAYERS,
    MODEL_ROLES_BEFORE_LAYERS,
    residual_writers,
)
from .prompts import Prompts, tokenize
from .renamed import renamed

if TYPE_CHECKING:
    import pandas as pd

    from ..core.model import AnyModel

Key = tuple[str, int | None]

#: Roles whose position axis is not dim 1: the attention pattern is [batch, heads, query, key].
_QUERY_AXIS = {"pattern": 2}


def pos_axis(role: str) -> int:
    """The axis that indexes (query) positions in a tensor of ``role``."""
    return _QUERY_AXIS.get(role, 1)


def forward_order(role: str, layer: int | None) -> tuple[int, int, int]:
    """A sort key that puts (role, layer) reads in the order a forward pass produces them."""
    if role in MODEL_ROLES_BEFORE_LAYERS:
        return (0, 0, MODEL_ROLES_BEFORE_LAYERS.index(role))
    if role in MODEL_ROLES_AFTER_LAYERS:
        return (2, 0, MODEL_ROLES_AFTER_LAYERS.index(role))
    return (1, int(layer), LAYER_ROLE_ORDER.index(role))


def read_roles(
    model: AnyModel,
    inputs: dict[str, torch.Tensor],
    keys: Sequence[Key],
    positions: list[int] | None = None,
) -> dict[Key, torch.Tensor]:
    """Read (role, layer) pairs in one no-grad trace, in forward order; detached copies.

    nnsight refuses reads that come after the model has run past them, so the reads are sorted
    by :func:`forward_order`. Should an adapter's modules fire in another order than the role
    order, each role is read in a trace of its own instead (slower, same values).
    """
    from nnsight.intervention.interleaver import OutOfOrderError

    ordered = sorted(keys, key=lambda key: forward_order(*key))
    try:
        return _read_in_one_trace(model, inputs, ordered, positions)
    except OutOfOrderError:
        values: dict[Key, torch.Tensor] = {}
        for role in dict.fromkeys(role for role, _ in ordered):
            # Within one role, earlier layers always run first.
            group = sorted((key for key in ordered if key[0] == role), key=lambda key: -1 if key[1] is None else key[1])
            values.update(_read_in_one_trace(model, inputs, group, positions))
        return values


def _read_in_one_trace(
    model: AnyModel, inputs: dict[str, torch.Tensor], keys: Sequence[Key], positions: list[int] | None
) -> dict[Key, torch.Tensor]:
    access = {role: model.role(role) for role, _ in keys}
    index = None if positions is None else torch.tensor(positions)
    values: dict[Key, torch.Tensor] = {}  # created outside the trace: only saved objects survive it
    with torch.no_grad(), model.trace(dict(inputs)):
        for role, layer in keys:
            value = access[role].read(layer)
            if index is not None:
                value = value.index_select(pos_axis(role), index.to(value.device))
            # A copy: a later in-place operation of the model must not change what was read.
            values[(role, layer)] = value.detach().clone().save()
    return values


@renamed()
@only_role_operations("roles")
def cache(
    model: AnyModel,
    prompts: Prompts,
    *,
    roles: Iterable[str] | None = None,
    layers: Iterable[int] | int | None = None,
    positions: int | slice | Iterable[int] | None = None,
) -> ActivationCache:
    """Run ``model`` once on ``prompts`` and keep the activations of many roles.

    * ``roles``: role names; None means every role this model has (roles it lacks, or cannot
      provide in its current configuration, such as ``pattern`` under sdpa attention, are
      skipped). Naming a role the model lacks raises :class:`MissingRoleError`. An item that is
      a list (``roles=[["z", "mixer_out"], "resid_post"]``) means the first of its roles the
      model has.
    * ``layers``: layer indices for per-layer roles (all when None).
    * ``positions``: token positions to keep (an int, a slice or a list; all when None). The
      pattern role keeps all key positions and selects query positions.

    Padding: a batch of prompts of different lengths is LEFT-padded, the attention mask is
    passed to the model, and position ids follow the mask (nnsight supplies them), so every
    prompt's real tokens sit at the end and the last real token is always at position -1.
    Activations at padded positions are meaningless; ``cache.attention_mask`` says which they
    are and ``cache.tokens`` holds the padded ids.

    Everything runs under ``torch.no_grad()`` in a single trace.
    """
    inputs = tokenize(model, prompts)
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    chosen_layers = model.layers([layers] if isinstance(layers, int) else layers)
    names = _available_roles(model) if roles is None else _requested_roles(model, roles)
    keys: list[Key] = []
    for role in names:
        keys += [(role, layer) for layer in chosen_layers] if role in LAYER_ROLES else [(role, None)]
    n_pos = inputs["input_ids"].shape[1]
    chosen_positions = normalize_positions(positions, n_pos)
    values = read_roles(model, inputs, keys, chosen_positions)
    return ActivationCache(
        model, values, inputs["input_ids"], inputs["attention_mask"], chosen_layers, chosen_positions
    )


def _available_roles(model: AnyModel) -> list[str]:
    names = []
    for role in model.roles:
        try:
            model.role(role)  # some roles exist only in some configurations (pattern needs eager)
        except MissingRoleError:
            continue
        names.append(role)
    return names


def _requested_roles(model: AnyModel, roles: Iterable[str | Sequence[str]]) -> list[str]:
    # An item that is itself a list of roles stands for the first of them the model has.
    names = [roles] if isinstance(roles, str) else [model.first_role(role) for role in roles]
    for role in names:
        model.role(role)  # raises MissingRoleError naming the roles the adapter has
    return list(dict.fromkeys(names))


class ActivationCache:
    """Activations of one run, indexed ``cache["resid_post", 3]`` or ``cache["embed"]``.

    Tensors keep the shapes of their roles (``[batch, pos, ...]``; ``pattern`` is
    ``[batch, heads, query, key]``), restricted to the cached positions.
    """

    def __init__(
        self,
        model: AnyModel,
        values: dict[Key, torch.Tensor],
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: list[int],
        positions: list[int] | None,
    ):
        self.model = model
        self.tokens = tokens
        self.attention_mask = attention_mask
        self.layers = layers
        self.positions = positions
        self._values = values

    # -- access ------------------------------------------------------------------------------
    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(role for role, _ in self._values))

    def _key(self, key: str | tuple[str, int]) -> Key:
        role, layer = (key, None) if isinstance(key, str) else key
        if role in LAYER_ROLES:
            if layer is None:
                raise KeyError(f"{role!r} is per layer: index it with a layer, cache[{role!r}, 0]")
            try:
                layer = self.model.layer_index(layer)
            except LayerIndexError as error:
                raise KeyError(str(error)) from None
        elif layer is not None:
            raise KeyError(f"{role!r} is a model-wide role: index it without a layer, cache[{role!r}]")
        if (role, layer) not in self._values:
            where = f" at layer {layer}" if layer is not None else ""
            raise KeyError(
                f"{role!r}{where} is not in this cache (roles {list(self.roles)}, layers {self.layers}); "
                "pass roles=/layers= to al.cache to collect it"
            )
        return role, layer

    def __getitem__(self, key: str | tuple[str, int]) -> torch.Tensor:
        return self._values[self._key(key)]

    def __contains__(self, key: object) -> bool:
        try:
            self._key(key)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def keys(self) -> list[Key]:
        return list(self._values)

    def items(self) -> list[tuple[Key, torch.Tensor]]:
        return list(self._values.items())

    def __iter__(self) -> Iterator[Key]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    @property
    def str_tokens(self) -> list[list[str]]:
        """The (padded) tokens of each prompt as strings; padding shows as the pad token."""
        return [self.model.to_str_tokens(row) for row in self.tokens]

    def __repr__(self) -> str:
        shape = tuple(self.tokens.shape)
        return f"<ActivationCache {self.model.name!r} tokens={shape} roles={list(self.roles)} layers={self.layers}>"

    # -- persistence -------------------------------------------------------------------------
    # A plain method with a required path: it shadows the ``save()`` nnsight gives every object
    # (which marks a value inside a trace), so ``cache.save(path)`` writes the file.
    def save(self, path: str | os.PathLike) -> Path:
        """Write every tensor, the tokens and the mask to one safetensors file; see :meth:`load`."""
        from .activation_store import save_cache

        return save_cache(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: AnyModel | None = None) -> ActivationCache:
        """A cache written by :meth:`save`; pass ``model`` for token strings and decompositions."""
        from .activation_store import load_cache

        return load_cache(path, model)

    # -- analysis ----------------------------------------------------------------------------
    def stack(self, role: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """``role`` at every cached layer (or at ``layers``): ``[layers, batch, pos, ...]``."""
        if role not in LAYER_ROLES:
            raise KeyError(f"{role!r} is not a per-layer role; read it as cache[{role!r}]")
        chosen = self.layers if layers is None else self.model.layers(layers)
        return torch.stack([self[role, layer] for layer in chosen])

    def decompose_resid(self, layer: int = -1, per_head: bool = False) -> Decomposition:
        """The residual stream after ``layer`` split into the components that wrote it.

        Returns ``(components, labels)`` with ``components`` of shape
        ``[n_components, batch, pos, d_model]`` summing to ``cache["resid_post", layer]``:

        * ``"embed"``: everything entering the first block except the position embedding, i.e.
          ``resid_pre[0] - pos_embed`` (this includes any scaling or norm the model applies to
          token embeddings before its first block);
        * ``"pos_embed"``: learned absolute positions, where the model has them;
        * per layer, in forward order: ``"attn i"`` (or, with ``per_head``, ``"head i.h"`` =
          ``z[i][..., h, :] @ W_O[h]``), ``"mlp i"``, ``"mixer i"`` (SSM blocks);
        * with ``per_head``, one ``"attn bias"`` row: the output-projection biases of all
          decomposed layers.

        Per-head rows need ``z`` in the cache and an attention output that is exactly the output
        projection of ``z`` (``model.adapter.z_feeds_residual``); otherwise attention stays one
        row per layer.
        """
        return decompose_resid(self, layer, per_head)

    def to_frame(self) -> pd.DataFrame:
        """Norms of every cached activation: one row per (role, layer, prompt, pos)."""
        import pandas as pd

        rows = []
        positions = self.positions if self.positions is not None else list(range(self.tokens.shape[1]))
        tokens = self.str_tokens
        for (role, layer), value in self._values.items():
            axis = pos_axis(role)
            moved = value.float().movedim(axis, 1).flatten(2)  # [batch, pos, everything else]
            norms = moved.norm(dim=-1).cpu()
            for prompt in range(norms.shape[0]):
                for column, pos in enumerate(positions):
                    rows.append(
                        {
                            "model": self.model.name,
                            "role": role,
                            "layer": layer,
                            "prompt": prompt,
                            "pos": pos,
                            "token": tokens[prompt][pos],
                            "norm": float(norms[prompt, column]),
                        }
                    )
        return pd.DataFrame(rows)


class Decomposition(tuple):
    """``(components, labels)`` from :func:`decompose_resid`, unpackable as a pair.

    ``components`` is ``[n_components, batch, pos, d_model]``; ``labels`` names each row.
    """

    components: torch.Tensor
    labels: list[str]

    def __new__(cls, components: torch.Tensor, labels: list[str], cache: ActivationCache | None = None):
        self = super().__new__(cls, (components, labels))
        self.components = components
        self.labels = labels
        self._cache = cache
        return self

    def total(self) -> torch.Tensor:
        """The sum of all components: the residual stream they decompose."""
        return self.components.sum(0)

    def to_frame(self) -> pd.DataFrame:
        """Norms of each component: one row per (component, prompt, pos)."""
        import pandas as pd

        norms = self.components.float().norm(dim=-1).cpu()  # [n, batch, pos]
        cache = self._cache
        n_pos = norms.shape[2]
        positions = cache.positions if cache is not None and cache.positions is not None else list(range(n_pos))
        tokens = cache.str_tokens if cache is not None else None
        rows = []
        for index, label in enumerate(self.labels):
            for prompt in range(norms.shape[1]):
                for column, pos in enumerate(positions):
                    rows.append(
                        {
                            "model": cache.model.name if cache is not None else "",
                            "component": label,
                            "prompt": prompt,
                            "pos": pos,
                            "token": tokens[prompt][pos] if tokens is not None else "",
                            "norm": float(norms[index, prompt, column]),
                        }
                    )
        return pd.DataFrame(rows)


def stack(cache: ActivationCache, role: str, layers: Iterable[int] | None = None) -> torch.Tensor:
    """``role`` stacked over the cache's layers: ``[layers, batch, pos, ...]``."""
    return cache.stack(role, layers)


def decompose_resid(cache: ActivationCache, layer: int = -1, per_head: bool = False) -> Decomposition:
    """The residual stream after ``layer`` as a sum of components; see
    :meth:`ActivationCache.decompose_resid`."""
    model = cache.model
    last = model.layer_index(layer)
    _require(cache, [("resid_pre", 0)] if "resid_pre" in model.roles else [("embed", None)])
    components: list[torch.Tensor] = []
    labels: list[str] = []

    pos = None
    if "pos_embed" in model.roles:
        _require(cache, [("pos_embed", None)])
        pos = cache["pos_embed"]
    first = cache["resid_pre", 0] if ("resid_pre", 0) in cache._values else cache["embed"]
    components.append(first - pos if pos is not None else first)
    labels.append("embed")
    if pos is not None:
        components.append(pos)
        labels.append("pos_embed")

    writers = list(residual_writers(model.roles))
    if not writers:
        raise MissingRoleError(
            f"adapter {model.adapter.name!r} has none of attn_out, mlp_out, mixer_out: "
            "the residual stream cannot be decomposed into components"
        )
    heads = per_head and _has_heads(model)
    if heads:
        _require(cache, [("z", i) for i in range(last + 1)])
    _require(cache, [(role, i) for role in writers for i in range(last + 1) if not (heads and role == "attn_out")])

    bias = None
    for i in range(last + 1):
        for role in writers:
            if role == "attn_out" and heads:
                z = cache["z", i]
                W_O = model.W_O(i).detach().to(z.device, z.dtype)
                b_O = model.b_O(i).detach().to(z.device, z.dtype)
                per_head_out = torch.einsum("bphd,hdm->hbpm", z, W_O)
                components.extend(per_head_out)
                labels.extend(f"head {i}.{h}" for h in range(per_head_out.shape[0]))
                bias = b_O if bias is None else bias + b_O
                continue
            components.append(cache[role, i])
            labels.append(f"{role.removesuffix('_out')} {i}")
    if bias is not None:
        components.append(bias)
        labels.append("attn bias")
    # Some roles are computed once for the whole batch (GPT-2's position embedding of an unpadded
    # batch is [1, pos, d]) and broadcast by the model; broadcast them here too.
    shape = cache["resid_post", last].shape if ("resid_post", last) in cache._values else first.shape
    return Decomposition(torch.stack([c.to(first.device).expand(shape) for c in components]), labels, cache)


def _has_heads(model: AnyModel) -> bool:
    """Whether attention output splits exactly into per-head terms ``z @ W_O``."""
    return "z" in model.roles and model.adapter.z_feeds_residual and model.adapter.out_proj is not None


def _require(cache: ActivationCache, keys: Sequence[Key]) -> None:
    missing = [key for key in keys if key not in cache._values]
    if missing:
        shown = ", ".join(f"{role}[{layer}]" if layer is not None else role for role, layer in missing[:6])
        roles = sorted({role for role, _ in missing})
        raise KeyError(
            f"this decomposition needs {shown}{' ...' if len(missing) > 6 else ''}, which the cache lacks; "
            f"collect them with al.cache(model, prompts, roles=[..., {', '.join(map(repr, roles))}]) over all layers"
        )


__all__ = ["ActivationCache", "Decomposition", "cache", "decompose_resid", "read_roles", "stack"]
