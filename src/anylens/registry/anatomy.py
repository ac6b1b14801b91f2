"""Finding the pieces of a decoder from its module structure, its config and recorded forwards.

Nothing here knows an architecture by name. Pieces are found by:

* structure: the embedding and unembedding the model itself reports, the longest list of blocks,
  linear layers identified by their widths (heads x head_dim -> d_model is an attention output
  projection, d_model -> heads x head_dim a query projection, ...);
* config: head counts, head size, soft-cap, maximum positions, read through their standard names;
* values: one forward pass recorded with plain hooks (:mod:`.probe`). What a layer adds to its
  residual stream is found by searching the module outputs inside the layer for a set that sums to
  ``output - input``; a second pass that changes only position 0 of each such module's input tells
  token mixers (attention, SSMs) from position-wise modules (MLPs, norms).

The result is an :class:`Anatomy`: per-layer relative paths that hold for every layer, and notes
saying why a role could not be placed. :mod:`.infer` turns it into candidate adapters and lets
``anylens check`` choose.
"""

from __future__ import annotations

import builtins
import inspect
import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .probe import Call, Recording, record

#: Relative tolerance of value comparisons (the same scale ``anylens check`` uses).
TOL = 1e-4

HEAD_COUNT_ATTRS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv")
HEAD_SIZE_ATTRS = ("head_dim", "v_head_dim", "kv_channels", "attention_head_dim", "d_head", "head_size")
MAX_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
LAYER_COUNT_ATTRS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")


class AnatomyError(Exception):
    """A piece every adapter needs (embedding, unembedding, layer list, residual stream) is missing."""


# -- value helpers ----------------------------------------------------------------------------
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


def _relative(path: str, prefix: str) -> str:
    return path[len(prefix) + 1 :] if path.startswith(prefix + ".") else path


def _depth(path: str) -> int:
    return path.count(".")


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
    parallel: bool = False
    resid_mid: Piece | None = None
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


# -- reading a model ----------------------------------------------------------------------------
def sample_ids(model: torch.nn.Module, batch: int = 2, pos: int = 12) -> torch.Tensor:
    """The token ids ``anylens check`` uses by default (same seed, same range)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    out = model.get_output_embeddings()
    if out is not None and getattr(out, "weight", None) is not None:
        vocab = min(vocab or out.weight.shape[0], out.weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return torch.randint(4, max(vocab, 5), (batch, pos), generator=generator).to(device)


def read_anatomy(model: torch.nn.Module) -> Anatomy:
    """Find every piece that structure, config and one recorded forward reveal."""
    ids = sample_ids(model)
    rec = record(model, ids)
    names = {module: name for name, module in model.named_modules()}
    layers = find_layers(model, rec)
    blocks = model.get_submodule(layers)
    anatomy = Anatomy(type(model).__name__, layers, len(blocks))
    _residual_stream(rec, anatomy, ids.shape)
    _model_ends(model, names, rec, anatomy)
    _components(model, rec, anatomy, ids.shape)
    _heads(model, rec, anatomy)
    _mlp_post(model, rec, anatomy)
    _final_norm(model, names, rec, anatomy)
    return anatomy


def find_layers(model: torch.nn.Module, rec: Recording) -> str:
    """The list of blocks: the longest ModuleList whose blocks each run once, in order."""
    wanted = config_int(model.config, LAYER_COUNT_ATTRS)
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 1:
            continue
        calls = [rec.get(f"{path}.{i}") for i in range(len(module))]
        if any(c is None or c.calls != 1 for c in calls):
            continue
        if any(a.start >= b.start for a, b in itertools.pairwise(calls)):
            continue
        homogeneous = len({type(block) for block in module}) == 1
        found.append((len(module) == (wanted[1] if wanted else -1), len(module), homogeneous, -_depth(path), path))
    if not found:
        raise AnatomyError("no list of blocks (a ModuleList whose blocks each run once, in order) was found")
    return max(found)[-1]


def _model_ends(model: torch.nn.Module, names: dict, rec: Recording, anatomy: Anatomy) -> None:
    embedding = model.get_input_embeddings()
    unembedding = model.get_output_embeddings()
    if unembedding is None or unembedding not in names:
        raise AnatomyError("the model reports no output embedding (get_output_embeddings() is None)")
    anatomy.unembed = names[unembedding]
    if embedding is not None and embedding in names:
        call = rec.get(names[embedding])
        if call is not None and call.calls == 1:
            anatomy.embed = names[embedding]
        else:
            anatomy.notes.append("embed: the token embedding runs more than once (or never) per forward")
    anatomy.pos_embed = _position_embedding(model, names, rec, anatomy)


def _position_embedding(model: torch.nn.Module, names: dict, rec: Recording, anatomy: Anatomy) -> str | None:
    """A learned absolute position table: an embedding (outside the layers) sized like the context."""
    d_model = anatomy.d_model
    limits = [v for a in MAX_POSITION_ATTRS if isinstance(v := config_value(model.config, a), int)]
    for module, path in names.items():
        if not isinstance(module, torch.nn.Embedding) or path in (anatomy.embed, anatomy.unembed):
            continue
        if path.startswith(anatomy.layers + "."):
            continue
        call = rec.get(path)
        if call is None or call.calls != 1 or call.output is None or call.output.shape[-1] != d_model:
            continue
        if any(limit <= module.num_embeddings <= limit + 8 for limit in limits):
            return path
    return None


def _residual_stream(rec: Recording, anatomy: Anatomy, shape: torch.Size) -> None:
    """Block outputs must be the next block's inputs, all tensors or all tuples."""
    calls = [rec.get(f"{anatomy.layers}.{i}") for i in range(anatomy.n_layers)]
    for i, call in enumerate(calls):
        value, view = as_positions(call.output, *shape)
        if value is None or view is not None or call.input is None or call.input.shape != call.output.shape:
            raise AnatomyError(
                f"layer {i} does not map [batch, pos, d_model] to the same shape (input "
                f"{None if call.input is None else tuple(call.input.shape)}, output "
                f"{None if call.output is None else tuple(call.output.shape)})"
            )
    if len({call.tuple_output for call in calls}) > 1:
        raise AnatomyError("some layers return tuples and others bare tensors")
    anatomy.d_model = int(calls[0].output.shape[-1])
    for i, (a, b) in enumerate(itertools.pairwise(calls)):
        if not close(a.output, b.input):
            raise AnatomyError(f"the output of layer {i} is not the input of layer {i + 1} (invariant 1)")


# -- what each layer adds to the residual stream --------------------------------------------------
def _candidate_groups(model: torch.nn.Module, rec: Recording, block: str, shape: torch.Size) -> list[list[Call]]:
    """Module outputs inside a block shaped like the residual stream, grouped by equal value."""
    pre = rec.get(block).input
    groups: list[list[Call]] = []
    for call in rec.inside(block):
        value, _ = as_positions(call.output, *shape)
        if call.calls != 1 or value is None or value.shape != pre.shape:
            continue
        if float(value.abs().max()) == 0.0 or close(value, pre):
            continue
        for group in groups:
            if close(as_positions(group[0].output, *shape)[0], value):
                group.append(call)
                break
        else:
            groups.append([call])
    return groups


def _representative(model: torch.nn.Module, group: list[Call]) -> Call:
    """The outermost module of equal-valued ones; a real computation before a dropout or identity."""

    def rank(call: Call) -> tuple:
        module = model.get_submodule(call.path)
        trivial = not any(True for _ in module.parameters())
        return (_depth(call.path), trivial, call.start)

    return min(group, key=rank)


def _decompose(model: torch.nn.Module, rec: Recording, block: str, shape: torch.Size) -> list[Call] | None:
    """Module outputs that sum to what the block adds to the residual (fewest terms >= 2 first)."""
    call = rec.get(block)
    delta = call.output.float() - call.input.float()
    tol = TOL * max(1.0, float(call.output.abs().max()))
    groups = [_representative(model, g) for g in _candidate_groups(model, rec, block, shape)]
    values = {c.path: as_positions(c.output, *shape)[0].float() for c in groups}
    for size in (2, 3, 1):
        for combo in itertools.combinations(groups, size):
            paths = [c.path for c in combo]
            if any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in itertools.permutations(paths, 2)):
                continue
            total = sum(values[p] for p in paths)
            if float((total - delta).abs().max()) <= tol:
                return sorted(combo, key=lambda c: c.start)
    return None


def _core(model: torch.nn.Module, rec: Recording, block: str, call: Call, shape: torch.Size) -> Call:
    """The module that computes a component: a post-norm or dropout hands over to its producer."""
    seen = set()
    while is_thin(model.get_submodule(call.path)) and call.path not in seen:
        seen.add(call.path)
        want = call.input
        producers = [
            c for c in rec.inside(block)
            if c.end < call.start and c.calls == 1 and c.output is not None and close(c.output, want)
        ]
        if not producers:
            break
        call = min(producers, key=lambda c: (_depth(c.path), -c.end))
    return call


def _mixes_positions(model: torch.nn.Module, rec: Recording, units: list[Call], ids: torch.Tensor) -> dict[str, bool]:
    """Whether each module's output at positions >= 1 depends on its first input at position 0.

    One forward per module (the same relative module in another layer of the same class shares the
    answer), changing only that module's first input: other inputs, such as a residual some
    sublayers add themselves, keep their recorded values.
    """
    batch, pos = ids.shape
    answers: dict[tuple[str, type], bool] = {}
    mixing = {}
    for call in units:
        key = (re.sub(r"\.\d+\.", ".#.", call.path), type(model.get_submodule(call.path)))
        if key not in answers:
            answers[key] = _mixes(model, call, ids, batch, pos)
        mixing[call.path] = answers[key]
    return mixing


def _mixes(model: torch.nn.Module, call: Call, ids: torch.Tensor, batch: int, pos: int) -> bool:
    if call.input is None or call.output is None:
        return True
    base = call.input
    generator = torch.Generator().manual_seed(1)

    def edit(_: torch.Tensor) -> torch.Tensor:
        value = base.clone()
        noise = torch.randn(value.shape, generator=generator).to(value) * (value.float().std() + 1.0)
        if value.dim() >= 3 and tuple(value.shape[:2]) == (batch, pos):
            value[:, 0] += noise[:, 0]
        else:  # flattened tokens: position 0 of every sequence
            value[::pos] += noise[::pos]
        return value

    edited = record(model, ids, edit_inputs={call.path: edit}, only={call.path}).get(call.path)
    old, _ = as_positions(call.output, batch, pos)
    new, _ = as_positions(edited.output if edited else None, batch, pos)
    return old is None or new is None or not close(new[:, 1:], old[:, 1:], 1e-6)


def _unit(rec: Recording, block: str, core: Call) -> Call:
    """The sublayer a component belongs to: the block's child module that contains its core."""
    child = _relative(core.path, block).split(".")[0]
    return rec.get(f"{block}.{child}") or core


def _components(model: torch.nn.Module, rec: Recording, anatomy: Anatomy, shape: torch.Size) -> None:
    """attn_out / mlp_out / mixer_out and resid_mid, kept only where every layer agrees.

    A component's kind comes from its sublayer (the block's child that computes it): one that mixes
    positions is attention (or, with a convolution or without head counts in the config, an SSM-style
    mixer); a position-wise one is the MLP.
    """
    layers = [f"{anatomy.layers}.{i}" for i in range(anatomy.n_layers)]
    found: dict[str, list[tuple[Call, Call, Call]]] = {}
    for block in layers:
        terms = _decompose(model, rec, block, shape)
        if terms is None:
            anatomy.notes.append(
                f"attn_out/mlp_out: no module outputs inside {block} sum to what it adds to the residual "
                "(a norm after the residual add, or a scaled residual)"
            )
            return
        cores = [_core(model, rec, block, term, shape) for term in terms]
        units = [_unit(rec, block, core) for core in cores]
        if len({u.path for u in units}) < len(units):
            units = cores  # one child computes several components: judge the cores themselves
        found[block] = list(zip(terms, cores, units))
    units = [unit for parts in found.values() for _, _, unit in parts]
    mixing = _mixes_positions(model, rec, units, sample_ids(model))
    has_heads = config_int(model.config, HEAD_COUNT_ATTRS) is not None
    templates = []
    for block, parts in found.items():
        kinds: dict[str, tuple[Call, Call, Call]] = {}
        for term, core, unit in parts:
            if not mixing[unit.path]:
                kind = "mlp"
            elif has_conv(model.get_submodule(unit.path)) or not has_heads:
                kind = "mixer"
            else:
                kind = "attn"
            if kind in kinds:
                anatomy.notes.append(f"attn_out/mlp_out: {block} adds two components of one kind ({kind})")
                return
            kinds[kind] = (term, core, unit)
        templates.append(
            {
                kind: (
                    Piece(_relative(term.path, block), view=as_positions(term.output, *shape)[1]),
                    _relative(core.path, block),
                    _relative(unit.path, block),
                )
                for kind, (term, core, unit) in kinds.items()
            }
        )
    if any(t != templates[0] for t in templates):
        anatomy.notes.append(
            "attn_out/mlp_out/mixer_out: layers differ in what they add to the residual (a hybrid); "
            "per-layer component roles are left out, the residual-stream roles stay"
        )
        return
    anatomy.components = {kind: piece for kind, (piece, _, _) in templates[0].items()}
    anatomy.cores = {kind: core for kind, (_, core, _) in templates[0].items()}
    anatomy.attention = templates[0]["attn"][2] if "attn" in templates[0] else None
    _resid_mid(rec, anatomy, found, shape)


def _resid_mid(rec: Recording, anatomy: Anatomy, found: dict, shape: torch.Size) -> None:
    """The first module input, between attention and MLP, equal to ``resid_pre + attn_out``."""
    if not {"attn", "mlp"} <= anatomy.components.keys():
        return
    pieces = []
    for block, parts in found.items():
        by_module = {_relative(term.path, block): (term, unit) for term, _, unit in parts}
        attn_term, _ = by_module[anatomy.components["attn"].module]
        _, mlp_unit = by_module[anatomy.components["mlp"].module]
        if attn_term.end > mlp_unit.start:
            return  # attention does not finish before the MLP starts: a parallel block
        want = rec.get(block).input.float() + as_positions(attn_term.output, *shape)[0].float()
        options = []
        for call in rec.inside(block):
            value, view = as_positions(call.input, *shape)
            if call.calls == 1 and attn_term.end < call.start <= mlp_unit.start and close(value, want):
                options.append((call.start, _depth(call.path), Piece(_relative(call.path, block), "input", view)))
        if not options:
            return
        pieces.append(min(options, key=lambda o: o[:2])[2])
    if all(p == pieces[0] for p in pieces):
        anatomy.resid_mid = pieces[0]


# -- attention heads --------------------------------------------------------------------------
def _linears(model: torch.nn.Module, rec: Recording, prefix: str) -> list[tuple[str, int, int, Call]]:
    """Linear maps called once below ``prefix``: (path, in, out, call), in call order."""
    out = []
    for call in rec.inside(prefix):
        widths = linear_widths(model.get_submodule(call.path))
        if widths is not None and call.calls == 1:
            out.append((call.path, widths[0], widths[1], call))
    return out


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
    hints = [r for r, words in (("q", ("q", "query")), ("k", ("k", "key")), ("v", ("v", "value")))
             if name.startswith(words[0]) or words[1] in name]
    return hints[0] if len(hints) == 1 else None


def _heads(model: torch.nn.Module, rec: Recording, anatomy: Anatomy) -> None:
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
    linears = _linears(model, rec, attention)
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
    if not all(_same_linear(model, anatomy, out[0], i) for i in range(anatomy.n_layers)):
        anatomy.notes.append("z: the output projection differs between layers")
        return
    anatomy.out_proj = _relative(out[0], block0)
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
        lin for lin in linears
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
        linears = _linears(model, rec, call.path)
        readers = [lin for lin in linears if lin[1] == d_model]
        outs = [lin for lin in _output_projections(linears, d_model) if _head_counts(model.config, lin[1])]
        own_readers = [lin for lin in readers if all(lin[0] != out[0] for out in outs)]
        if outs and own_readers and (found is None or _depth(call.path) > _depth(found)):
            if not all(_same_linear(model, anatomy, outs[-1][0], i) for i in range(anatomy.n_layers)):
                continue
            found = call.path
    return _relative(found, block0) if found else None


def _same_linear(model: torch.nn.Module, anatomy: Anatomy, path0: str, layer: int) -> bool:
    rel = _relative(path0, f"{anatomy.layers}.0")
    try:
        other = model.get_submodule(f"{anatomy.layers}.{layer}.{rel}")
    except AttributeError:
        return False
    return linear_widths(other) == linear_widths(model.get_submodule(path0))


def _qkv_options(model: torch.nn.Module, anatomy: Anatomy, linears: list, out_path: str, block0: str) -> list:
    heads = anatomy.heads
    d_model = anatomy.d_model
    q_width, kv_width = heads.n_heads * heads.d_head, heads.n_kv * heads.d_head
    readers = [
        lin for lin in linears
        if lin[0] != out_path and lin[1] == d_model and lin[3].input is not None and lin[3].input.dim() == 3
        and all(_same_linear(model, anatomy, lin[0], i) for i in range(anatomy.n_layers))
    ]
    fused = [lin for lin in readers if lin[2] == q_width + 2 * kv_width]
    if len(fused) == 1:
        rel = _relative(fused[0][0], block0)
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
        orders = [{"q": qs[0], **hinted}] if set(hinted) == {"k", "v"} else [
            {"q": qs[0], "k": kvs[0], "v": kvs[1]}, {"q": qs[0], "k": kvs[1], "v": kvs[0]}]
    else:
        if len(sized) != 3:
            return []
        hinted = {_hint(lin[0]): lin for lin in sized}
        # without names, the call order q, k, v first; the pattern then tells which one is v
        orders = [hinted] if set(hinted) == {"q", "k", "v"} else [
            dict(zip("qkv", perm)) for perm in itertools.permutations(sized)]
    return [{r: Piece(_relative(o[r][0], block0), view="heads" if r == "q" else "kv_heads") for r in "qkv"}
            for o in orders]


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


# -- MLP neurons --------------------------------------------------------------------------------
def _mlp_post(model: torch.nn.Module, rec: Recording, anatomy: Anatomy) -> None:
    """The input of the MLP's down projection: the linear whose output is the MLP's output."""
    core = anatomy.cores.get("mlp")
    if core is None:
        return
    d_model = anatomy.d_model
    block0 = f"{anatomy.layers}.0"
    batch, pos = rec.get(block0).input.shape[:2]
    path = f"{block0}.{core}" if core else block0
    module = model.get_submodule(path)
    core_call = rec.get(path)
    own = linear_widths(module)
    if own is not None and own[1] == d_model:
        down = (path, *own, core_call)
    else:
        downs = [lin for lin in _linears(model, rec, path) if lin[2] == d_model and close(lin[3].output, core_call.output)]
        if len(downs) != 1:
            anatomy.notes.append("mlp_post: no single down projection produces the MLP output (mixture of experts?)")
            return
        down = downs[0]
    value, view = as_positions(down[3].input, batch, pos)
    if value is None or not all(_same_linear(model, anatomy, down[0], i) for i in range(anatomy.n_layers)):
        anatomy.notes.append("mlp_post: the down projection differs between layers")
        return
    anatomy.mlp_post = Piece(_relative(down[0], block0), "input", view)


# -- the end of the model -----------------------------------------------------------------------
def _final_norm(model: torch.nn.Module, names: dict, rec: Recording, anatomy: Anatomy) -> None:
    """The module between the last layer and the unembedding, and any logit soft-cap."""
    last = rec.get(f"{anatomy.layers}.{anatomy.n_layers - 1}").output
    head = rec.get(anatomy.unembed)
    if head is None or head.input is None:
        anatomy.notes.append("final_norm: the unembedding does not run as a module")
        return
    options = []
    for call in rec.calls.values():
        inside_layers = call.path == anatomy.layers or call.path.startswith(anatomy.layers + ".")
        if call.calls != 1 or inside_layers or call.path in (anatomy.unembed, anatomy.embed):
            continue
        if anatomy.unembed.startswith(call.path + ".") or anatomy.layers.startswith(call.path + "."):
            continue
        if close(call.input, last) and close(call.output, head.input):
            options.append((_depth(call.path), call.start, call.path))
    if not options:
        anatomy.notes.append("final_norm: no module maps the last layer's output to the unembedding's input")
        return
    final_norm = min(options)[2]
    logits = rec.logits
    raw = head.output.float()
    if close(raw, logits):
        anatomy.final_norm = final_norm
        return
    for attr in sorted(vars(model.config)):
        cap = config_value(model.config, attr)
        capped = "softcap" in attr and "attn" not in attr and isinstance(cap, (int, float)) and cap
        if capped and close(torch.tanh(raw / cap) * cap, logits):
            anatomy.final_norm, anatomy.logit_softcap = final_norm, attr
            return
    anatomy.notes.append(
        "final_norm: the logits are not the unembedding's output (nor a config soft-cap of it), e.g. a logit "
        "scale; final_norm is left out so that unembed(final_norm(x)) is never mistaken for the logits"
    )


# -- attention patterns (needs an nnsight model) --------------------------------------------------
#: A call of a name or dotted name, not of a method on an expression (``x.view(...)``).
_CALL = re.compile(r"(?<![\w.)\]])([A-Za-z_][\w.]*)\s*\(")


def _softmax_like(name: str) -> bool:
    return "softmax" in name or "dropout" in name


def pattern_options(
    nn_model: Any, modules: list[str], block: str, ids: torch.Tensor, n_heads: int
) -> list[tuple[str, torch.Tensor]]:
    """Operations whose output is the attention pattern, with their values on layer 0.

    ``modules`` are searched in turn (paths relative to ``block``, e.g. the attention module and the
    module owning its query projection). Candidates are softmax and dropout operations in each
    forward, or inside a function it calls that computes a softmax (an attention implementation
    chosen at run time is drilled into too). Each is read on a real trace and kept if it is
    ``[batch, heads, query, key]``, sums to 1 over keys and is causal. Options are returned as
    ``<module>.source.<op>[.source.<op>]`` relative to the block, later operations (a dropout
    after the softmax) first.
    """
    found: list[tuple[str, torch.Tensor]] = []
    for module_path in modules:
        envoy = _envoy(nn_model, f"{block}.{module_path}")
        try:
            source = envoy.source
            names = list(source.names)
        except Exception:
            continue
        options = [f"source.{n}" for n in names if _softmax_like(n)]
        module = nn_model._module.get_submodule(f"{block}.{module_path}")
        for name in _drill_candidates(module, source, names)[:4]:
            inner = _drill(nn_model, envoy, name, ids)
            options += [f"source.{name}.source.{n}" for n in inner if _softmax_like(n)]
        good = []
        for option in options:
            value = _read_op(nn_model, envoy, option, ids)
            if _is_pattern(value, ids.shape, n_heads):
                good.append((f"{module_path}.{option}", value))
        found += reversed(good)
        if found:
            break
    return found


def _envoy(nn_model: Any, path: str) -> Any:
    from ..core.access import child_envoy

    node = nn_model
    for part in path.split("."):
        node = child_envoy(node, part)
    return node


def _drill_candidates(module: torch.nn.Module, source: Any, names: list[str]) -> list[str]:
    """Calls in the forward to Python functions that compute a softmax, or chosen at run time."""
    text = source.compiled.source.split("\n")
    forward_globals = getattr(inspect.unwrap(type(module).forward), "__globals__", {})
    out = []
    for name in names:
        base = re.sub(r"_\d+$", "", name)
        line = source.compiled.lines.get(name)
        if line is None:
            continue
        snippet = "\n".join(text[max(line - 1, 0) : line + 1])
        callees = [m for m in _CALL.findall(snippet) if m.replace(".", "_") == base]
        if not callees:
            continue  # an assignment, not a call
        target = _resolve(module, forward_globals, callees[0])
        if isinstance(target, torch.nn.Module):
            continue
        if target is None:
            out.append(name)  # a local variable: an implementation chosen at run time
            continue
        try:
            body = inspect.getsource(target)
        except (TypeError, OSError):
            continue
        if "softmax" in body:
            out.append(name)
    return out


def _resolve(module: torch.nn.Module, globals_: dict, dotted: str) -> Any:
    parts = dotted.split(".")
    if parts[0] == "self":
        node: Any = module
    elif parts[0] in globals_:
        node = globals_[parts[0]]
    elif hasattr(builtins, parts[0]):
        return False  # isinstance, hasattr, ...: never an attention implementation
    else:
        # a bare local name is a function chosen at run time; a method of a local object is not
        return None if len(parts) == 1 else False
    for part in parts[1:]:
        node = getattr(node, part, None)
        if node is None:
            return False  # unresolvable attribute: not worth drilling
    return node


def _drill(nn_model: Any, envoy: Any, name: str, ids: torch.Tensor) -> list[str]:
    found: list[str] = []
    try:
        with nn_model.trace(ids):
            found.extend(getattr(envoy.source, name).source.names)
    except Exception:
        return []
    return found


def _read_op(nn_model: Any, envoy: Any, option: str, ids: torch.Tensor) -> torch.Tensor | None:
    saved: list[Any] = []
    try:
        with nn_model.trace(ids):
            node = envoy
            for part in option.split("."):
                node = getattr(node, part)
            saved.append(node.output.save())
    except Exception:
        return None
    value = saved[0] if saved else None
    return value if isinstance(value, torch.Tensor) else None


def _is_pattern(value: torch.Tensor | None, shape: torch.Size, n_heads: int) -> bool:
    batch, pos = shape
    if value is None or tuple(value.shape) != (batch, n_heads, pos, pos):
        return False
    value = value.float()
    if not close(value.sum(-1), torch.ones_like(value.sum(-1))):
        return False
    future = torch.triu(torch.ones(pos, pos, dtype=torch.bool, device=value.device), diagonal=1)
    return float(value[..., future].abs().max()) <= TOL
