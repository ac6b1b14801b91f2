"""The vocabulary of inference: what was found (:class:`Anatomy`) and the helpers every finder uses.

Value comparisons use the scale ``anylens check`` uses: an absolute tolerance relative to the
magnitude of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import AnatomyError  # noqa: F401  (defined here before; importable from here still)
from .probe import Call, Recording

#: Relative tolerance of value comparisons (the same scale ``anylens check`` uses).
TOL = 1e-4

HEAD_COUNT_ATTRS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv")
HEAD_SIZE_ATTRS = ("head_dim", "v_head_dim", "kv_channels", "attention_head_dim", "d_head", "head_size")
MAX_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")


# -- values ----------------------------------------------------------------------------------
def close(got: torch.Tensor | None, want: torch.Tensor | None, tol: float = TOL) -> bool:
    if got is None or want is None or got.shape != want.shape:
        return False
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).abs().max()) <= tol * max(1.0, float(want.abs().max()))


def as_positions(value: torch.Tensor | None, batch: int, pos: int) -> tuple[torch.Tensor | None, str | None]:
    """``[batch, pos, ...]`` as is, or ``[batch * pos, ...]`` unflattened (the ``tokens`` view)."""
    if value is None or value.dim() < 2:
        return None, None
    if tuple(value.shape[:2]) == (batch, pos):
        return value, None
    if value.shape[0] == batch * pos and value.dim() >= 2:
        return value.unflatten(0, (batch, pos)), "tokens"
    return None, None


# -- structure ---------------------------------------------------------------------------------
def linear_widths(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a linear map: ``nn.Linear`` or a transformers-style ``Conv1D`` (weight [in, out])."""
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def is_thin(module: torch.nn.Module) -> bool:
    """No matrix-shaped parameters: a norm, a scale, a dropout or an activation."""
    return all(p.dim() <= 1 for p in module.parameters())


def has_conv(module: torch.nn.Module) -> bool:
    return any(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) for m in module.modules())


def config_value(config: Any, name: str) -> Any:
    """A config attribute, or None (some configs refuse per-layer attributes at the top level)."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def config_int(config: Any, names: tuple[str, ...]) -> tuple[str, int] | None:
    """The first of ``names`` the config holds as a positive int, with its value."""
    for name in names:
        value = config_value(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def relative(path: str, prefix: str) -> str:
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else path


def depth(path: str) -> int:
    return path.count(".")


def linears_in(model: torch.nn.Module, rec: Recording, prefix: str) -> list[tuple[str, int, int, Call]]:
    """Linear maps called once below ``prefix``: (path, in, out, call), in call order."""
    out = []
    for call in rec.inside(prefix):
        widths = linear_widths(model.get_submodule(call.path))
        if widths is not None and call.calls == 1:
            out.append((call.path, widths[0], widths[1], call))
    return out


def same_linear(model: torch.nn.Module, anatomy: Anatomy, path0: str, layer: int) -> bool:
    rel = relative(path0, f"{anatomy.layers}.0")
    try:
        other = model.get_submodule(f"{anatomy.layers}.{layer}.{rel}")
    except AttributeError:
        return False
    return linear_widths(other) == linear_widths(model.get_submodule(path0))


def sample_ids(model: torch.nn.Module, batch: int = 2, pos: int = 12) -> torch.Tensor:
    """The token ids ``anylens check`` uses by default (same seed, same range)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    out = model.get_output_embeddings()
    if out is not None and getattr(out, "weight", None) is not None:
        vocab = min(vocab or out.weight.shape[0], out.weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(4, max(vocab, 5), (batch, pos), generator=generator).to(device)


# -- the result -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A tensor inside a layer: ``<relative module path>.<input|output>[|view]``."""

    module: str
    io: str = "output"
    view: str | None = None

    def path(self, layer_prefix: str) -> str:
        text = f"{layer_prefix}.{self.module}.{self.io}" if self.module else f"{layer_prefix}.{self.io}"
        return f"{text}|{self.view}" if self.view else text


@dataclass
class Heads:
    """Head counts from the config (attribute names for the adapter, and their values)."""

    n_heads_attr: str
    n_heads: int
    n_kv_attr: str
    n_kv: int
    d_head_attr: str
    d_head: int


@dataclass
class Anatomy:
    """What inference found: model-level paths, a per-layer template, and why roles are missing."""

    class_name: str
    layers: str
    n_layers: int
    d_model: int = 0  # width of the residual stream, as recorded
    embed: str | None = None
    pos_embed: str | None = None
    unembed: str = "lm_head"
    final_norm: str | None = None
    logit_softcap: str | None = None
    heads: Heads | None = None
    components: dict[str, Piece] = field(default_factory=dict)  # kind (attn|mlp|mixer) -> piece
    resid_mid: Piece | None = None
    branch_inputs: dict[str, Piece] = field(default_factory=dict)  # attn_in / mlp_in / mixer_in
    cores: dict[str, str] = field(default_factory=dict)  # kind -> relative path of the computing module
    attention: str | None = None  # relative path of the attention module
    out_proj: str | None = None  # relative path of its output projection
    z_feeds_residual: bool = True
    qkv_options: list[dict[str, Piece]] = field(default_factory=list)
    mlp_post: Piece | None = None
    pattern_options: list[str] = field(default_factory=list)  # op paths below the attention module
    samples: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # layer-0 values
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"layers={self.layers} ({self.n_layers})", f"embed={self.embed}", f"unembed={self.unembed}"]
        parts.append(f"final_norm={self.final_norm}")
        parts += [f"{kind}={piece.module or '<layer>'}" for kind, piece in self.components.items()]
        if self.attention:
            parts.append(f"attention={self.attention} out_proj={self.out_proj}")
        if self.heads:
            h = self.heads
            parts.append(f"heads={h.n_heads} kv_heads={h.n_kv} d_head={h.d_head}")
        return ", ".join(parts)
