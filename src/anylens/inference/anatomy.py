"""Finding the pieces of a decoder from its module structure, its config and recorded forwards.

Nothing here knows an architecture by name. Pieces are found by:

* structure: the embedding and unembedding the model itself reports, the longest list of blocks,
  linear layers identified by their widths (heads x head_dim -> d_model is an attention output
  projection, d_model -> heads x head_dim a query projection, ...);
* config: head counts, head size, soft-cap, maximum positions, read through their standard names;
* values: one forward pass recorded with plain hooks (:mod:`.probe`). What a layer adds to its
  residual stream is found by searching the module outputs inside the layer for a set that sums to
  ``output - input``; a pass that changes only position 0 of a sublayer's input tells token mixers
  (attention, SSMs) from position-wise modules (MLPs, norms).

This module finds the residual stream, its components, the MLP neurons and the model's ends;
:mod:`.heads` finds the attention heads and :mod:`.attention_ops` the pattern. The result is an
:class:`~.structure.Anatomy`: per-layer relative paths that hold for every layer, and notes saying
why a role could not be placed. :mod:`.infer` turns it into candidate adapters and lets
``anylens check`` choose.
"""

from __future__ import annotations

import itertools
import re

import torch

from ..core.errors import AnatomyError
from .heads import find_heads
from .probe import Call, Recording, record
from .structure import (
    HEAD_COUNT_ATTRS,
    LAYER_COUNT_ATTRS,
    MAX_POSITION_ATTRS,
    TOL,
    Anatomy,
    Piece,
    as_positions,
    close,
    config_int,
    config_value,
    depth,
    has_conv,
    is_thin,
    linear_widths,
    linears_in,
    relative,
    same_linear,
    sample_ids,
)


# -- reading a model ----------------------------------------------------------------------------
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
    find_heads(model, rec, anatomy)
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
        found.append((len(module) == (wanted[1] if wanted else -1), len(module), homogeneous, -depth(path), path))
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
        return (depth(call.path), trivial, call.start)

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
            c
            for c in rec.inside(block)
            if c.end < call.start and c.calls == 1 and c.output is not None and close(c.output, want)
        ]
        if not producers:
            break
        call = min(producers, key=lambda c: (depth(c.path), -c.end))
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
    child = relative(core.path, block).split(".")[0]
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
                    Piece(relative(term.path, block), view=as_positions(term.output, *shape)[1]),
                    relative(core.path, block),
                    relative(unit.path, block),
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
    _branch_inputs(rec, anatomy, found, shape)


def _resid_mid(rec: Recording, anatomy: Anatomy, found: dict, shape: torch.Size) -> None:
    """The first module input, between attention and MLP, equal to ``resid_pre + attn_out``."""
    if not {"attn", "mlp"} <= anatomy.components.keys():
        return
    pieces = []
    for block, parts in found.items():
        by_module = {relative(term.path, block): (term, unit) for term, _, unit in parts}
        attn_term, _ = by_module[anatomy.components["attn"].module]
        _, mlp_unit = by_module[anatomy.components["mlp"].module]
        if attn_term.end > mlp_unit.start:
            return  # attention does not finish before the MLP starts: a parallel block
        want = rec.get(block).input.float() + as_positions(attn_term.output, *shape)[0].float()
        options = []
        for call in rec.inside(block):
            value, view = as_positions(call.input, *shape)
            if call.calls == 1 and attn_term.end < call.start <= mlp_unit.start and close(value, want):
                options.append((call.start, depth(call.path), Piece(relative(call.path, block), "input", view)))
        if not options:
            return
        pieces.append(min(options, key=lambda o: o[:2])[2])
    if all(p == pieces[0] for p in pieces):
        anatomy.resid_mid = pieces[0]


def _branch_inputs(rec: Recording, anatomy: Anatomy, found: dict, shape: torch.Size) -> None:
    """attn_in / mlp_in / mixer_in: the input of the last module that runs before a branch's
    sublayer, outside it, on the stream the branch reads (its norm), kept where every layer agrees.
    The MLP reads ``resid_mid`` where there is one, else the block's input (a parallel block)."""
    roles = {"attn": "attn_in", "mixer": "mixer_in", "mlp": "mlp_in"}
    templates = []
    for block, parts in found.items():
        by_module = {relative(term.path, block): unit for term, _, unit in parts}
        stream = rec.get(block).input.float()
        mid = rec.get(f"{block}.{anatomy.resid_mid.module}") if anatomy.resid_mid else None
        pieces = {}
        for kind, piece in anatomy.components.items():
            unit = by_module[piece.module]
            want = stream if kind != "mlp" or mid is None else as_positions(mid.input, *shape)[0].float()
            options = []
            for call in rec.inside(block):
                value, view = as_positions(call.input, *shape)
                nested = f"{unit.path}.".startswith(f"{call.path}.") or call.path.startswith(f"{unit.path}.")
                if call.calls == 1 and call.start < unit.start and not nested and close(value, want):
                    options.append((call.start, Piece(relative(call.path, block), "input", view)))
            if options:
                pieces[roles[kind]] = max(options, key=lambda option: option[0])[1]
        templates.append(pieces)
    agreed = {role: piece for role, piece in templates[0].items() if all(t.get(role) == piece for t in templates)}
    if "attn_in" in agreed and "mixer" not in anatomy.components:
        agreed["mixer_in"] = agreed["attn_in"]  # attention is the token mixer
    anatomy.branch_inputs = agreed


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
        downs = [
            lin for lin in linears_in(model, rec, path) if lin[2] == d_model and close(lin[3].output, core_call.output)
        ]
        if len(downs) != 1:
            anatomy.notes.append("mlp_post: no single down projection produces the MLP output (mixture of experts?)")
            return
        down = downs[0]
    value, view = as_positions(down[3].input, batch, pos)
    if value is None or not all(same_linear(model, anatomy, down[0], i) for i in range(anatomy.n_layers)):
        anatomy.notes.append("mlp_post: the down projection differs between layers")
        return
    anatomy.mlp_post = Piece(relative(down[0], block0), "input", view)


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
            options.append((depth(call.path), call.start, call.path))
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
