"""Attention heads: the output projection (``z``), the q/k/v projections, their layouts.

Projections are linears identified by their widths against the config's head counts; which
projection is q, k or v comes from their own names where those say so, and otherwise every order
is a candidate that the attention pattern decides (``pattern @ v == z``, invariant 6).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from .probe import Recording
from .structure import (
    HEAD_COUNT_ATTRS,
    HEAD_SIZE_ATTRS,
    KV_HEAD_COUNT_ATTRS,
    Anatomy,
    Heads,
    Piece,
    close,
    config_int,
    config_value,
    depth,
    linear_widths,
    linears_in,
    relative,
    same_linear,
)


def _head_counts(config: Any, width: int) -> Heads | None:
    """Config head counts whose product with a head size gives the projection ``width``."""
    found = config_int(config, HEAD_COUNT_ATTRS)
    if found is None:
        return None
    n_attr, n_heads = found
    kv = config_int(config, KV_HEAD_COUNT_ATTRS)
    kv_attr, n_kv = kv if kv else ("num_key_value_heads", n_heads)
    for attr in HEAD_SIZE_ATTRS:
        value = config_value(config, attr)
        if isinstance(value, int) and value > 0 and n_heads * value == width:
            return Heads(n_attr, n_heads, kv_attr, n_kv, attr, value)
    fallback = int(config_value(config, "hidden_size") or 0) // n_heads
    if n_heads * fallback == width and not config_value(config, "head_dim"):
        return Heads(n_attr, n_heads, kv_attr, n_kv, "head_dim", fallback)  # absent: d_model // n_heads
    return None


def _hint(path: str) -> str | None:
    """q, k or v from a projection's own attribute name, where the name says so."""
    name = path.rsplit(".", 1)[-1].lower()
    hints = [
        r
        for r, words in (("q", ("q", "query")), ("k", ("k", "key")), ("v", ("v", "value")))
        if name.startswith(words[0]) or words[1] in name
    ]
    return hints[0] if len(hints) == 1 else None


def find_heads(model: torch.nn.Module, rec: Recording, anatomy: Anatomy) -> None:
    """Output projection (``z``) and q/k/v projections of the attention module, by widths.

    The attention module is the attention component's sublayer where the residual decomposition
    placed one; otherwise (a norm after the residual add, say) the smallest module of layer 0 that
    holds both an output projection and the projections reading the residual width.
    """
    block0 = f"{anatomy.layers}.0"
    if anatomy.attention is None and "attn" not in anatomy.components:
        anatomy.attention = _attention_by_structure(model, rec, anatomy, block0)
    if anatomy.attention is None:
        if config_int(model.config, HEAD_COUNT_ATTRS):
            anatomy.notes.append("z/q/k/v/pattern: no attention module was placed in every layer")
        return
    d_model = anatomy.d_model
    attention = f"{block0}.{anatomy.attention}"
    linears = linears_in(model, rec, attention)
    attn_value = rec.get(attention).output
    outs = _output_projections(linears, d_model)
    if not outs:
        anatomy.notes.append("z: the attention module has no linear output projection to d_model")
        return
    # the projection whose output is the attention output, else the last one to run
    out = next((lin for lin in outs if close(lin[3].output, attn_value)), outs[-1])
    heads = _head_counts(model.config, out[1])
    if heads is None:
        anatomy.notes.append(
            f"z: the output projection reads {out[1]} channels, which no head count x head size in the config gives"
        )
        return
    anatomy.heads = heads
    if out[3].input is None or out[3].input.dim() != 3:
        anatomy.notes.append("z: the output projection does not read [batch, pos, heads*d_head]")
        return
    if not all(same_linear(model, anatomy, out[0], i) for i in range(anatomy.n_layers)):
        anatomy.notes.append("z: the output projection differs between layers")
        return
    anatomy.out_proj = relative(out[0], block0)
    # z @ W_O is what attention adds only if the projection's output is the attn_out component
    # (no post-norm, gate or scale after it)
    component = rec.get(f"{block0}.{anatomy.components['attn'].module}") if "attn" in anatomy.components else None
    anatomy.z_feeds_residual = component is not None and close(out[3].output, component.output)
    anatomy.qkv_options = _qkv_options(model, anatomy, linears, out[0], block0)
    # layer-0 values for screening q/k/v layouts against the pattern (see infer.py)
    anatomy.samples = {"z": out[3].input.unflatten(-1, (heads.n_heads, heads.d_head))}
    for option in anatomy.qkv_options:
        anatomy.samples[option["v"].module] = rec.get(f"{block0}.{option['v'].module}").output


def _output_projections(linears: list, d_model: int) -> list:
    """Linears to d_model that read something of their own: q/k/v projections share one input."""
    return [
        lin
        for lin in linears
        if lin[2] == d_model and not any(other is not lin and close(other[3].input, lin[3].input) for other in linears)
    ]


def _attention_by_structure(model: torch.nn.Module, rec: Recording, anatomy: Anatomy, block0: str) -> str | None:
    """The smallest module in layer 0 with an output projection to d_model and >= 1 reader of d_model."""
    d_model = anatomy.d_model
    found = None
    for call in rec.inside(block0):
        module = model.get_submodule(call.path)
        if linear_widths(module) is not None:
            continue
        linears = linears_in(model, rec, call.path)
        readers = [lin for lin in linears if lin[1] == d_model]
        outs = [lin for lin in _output_projections(linears, d_model) if _head_counts(model.config, lin[1])]
        own_readers = [lin for lin in readers if all(lin[0] != out[0] for out in outs)]
        if outs and own_readers and (found is None or depth(call.path) > depth(found)):
            if not all(same_linear(model, anatomy, outs[-1][0], i) for i in range(anatomy.n_layers)):
                continue
            found = call.path
    return relative(found, block0) if found else None


def _qkv_options(model: torch.nn.Module, anatomy: Anatomy, linears: list, out_path: str, block0: str) -> list:
    heads = anatomy.heads
    d_model = anatomy.d_model
    q_width, kv_width = heads.n_heads * heads.d_head, heads.n_kv * heads.d_head
    readers = [
        lin
        for lin in linears
        if lin[0] != out_path
        and lin[1] == d_model
        and lin[3].input is not None
        and lin[3].input.dim() == 3
        and all(same_linear(model, anatomy, lin[0], i) for i in range(anatomy.n_layers))
    ]
    fused = [lin for lin in readers if lin[2] == q_width + 2 * kv_width]
    if len(fused) == 1:
        rel = relative(fused[0][0], block0)
        options = [{r: Piece(rel, view=f"qkv_fused:{r}") for r in "qkv"}]
        if heads.n_kv == heads.n_heads:
            options.append({r: Piece(rel, view=f"qkv_interleaved:{r}") for r in "qkv"})
        return options
    sized = [lin for lin in readers if lin[2] in (q_width, kv_width)]
    if q_width != kv_width:
        qs = [lin for lin in sized if lin[2] == q_width]
        kvs = [lin for lin in sized if lin[2] == kv_width]
        if len(qs) != 1 or len(kvs) != 2:
            return []
        hinted = {_hint(lin[0]): lin for lin in kvs}
        orders = (
            [{"q": qs[0], **hinted}]
            if set(hinted) == {"k", "v"}
            else [{"q": qs[0], "k": kvs[0], "v": kvs[1]}, {"q": qs[0], "k": kvs[1], "v": kvs[0]}]
        )
    else:
        if len(sized) != 3:
            return []
        hinted = {_hint(lin[0]): lin for lin in sized}
        # without names, the call order q, k, v first; the pattern then tells which one is v
        orders = (
            [hinted]
            if set(hinted) == {"q", "k", "v"}
            else [dict(zip("qkv", perm)) for perm in itertools.permutations(sized)]
        )
    return [
        {r: Piece(relative(o[r][0], block0), view="heads" if r == "q" else "kv_heads") for r in "qkv"} for o in orders
    ]


def head_view(value: torch.Tensor, view: str | None, heads: Heads) -> torch.Tensor | None:
    """The per-head view a q/k/v role path names (the same layouts ``anylens.core.access`` reads)."""
    try:
        if view == "heads":
            return value.unflatten(-1, (heads.n_heads, heads.d_head))
        if view == "kv_heads":
            return value.unflatten(-1, (heads.n_kv, heads.d_head))
        which = view.split(":")[1]
        if view.startswith("qkv_fused:"):
            q, kv = heads.n_heads * heads.d_head, heads.n_kv * heads.d_head
            start, width = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[which]
            count = heads.n_heads if which == "q" else heads.n_kv
            return value[..., start : start + width].unflatten(-1, (count, heads.d_head))
        d = heads.d_head
        index = "qkv".index(which)
        return value.unflatten(-1, (heads.n_heads, 3 * d))[..., index * d : (index + 1) * d]
    except (RuntimeError, AttributeError, KeyError, IndexError):
        return None


def screen_qkv(anatomy: Anatomy, pattern: torch.Tensor) -> None:
    """Keep the q/k/v layouts whose ``pattern @ v`` gives ``z`` on layer 0 (invariant 6, ahead of the check)."""
    z = anatomy.samples.get("z")
    if z is None or anatomy.heads is None:
        return
    kept = []
    for option in anatomy.qkv_options:
        raw = anatomy.samples.get(option["v"].module)
        v = head_view(raw, option["v"].view, anatomy.heads) if raw is not None else None
        if v is None or v.dim() != 4 or anatomy.heads.n_heads % v.shape[2]:
            continue
        expanded = v.float().repeat_interleave(anatomy.heads.n_heads // v.shape[2], dim=2)
        if close(torch.einsum("bhqk,bkhd->bqhd", pattern.float(), expanded), z):
            kept.append(option)
    if anatomy.qkv_options and not kept:
        anatomy.notes.append("q/k/v: no layout of the projections gives pattern @ v == z")
    anatomy.qkv_options = kept
