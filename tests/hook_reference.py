"""An independent reference for the experiment tests: plain torch hooks on the Hugging Face
modules, one forward per patch, written without anylens.

The per-family module knowledge lives in ``PATHS`` below, keyed by the model class, so the
reference never consults an adapter. A family whose class is missing here makes the experiment
tests fail with a message saying to add it: a new family must get an independent check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Paths:
    """Where things are, relative to the model and to each block."""

    layers: str
    out_proj: str | None = None  # its input is z, laid out [batch, pos, heads * d_head]
    mlp: str | None = None  # its output is what the MLP adds to the residual stream
    mid_norm: str | None = None  # its input is the residual after attention (resid_mid)
    heads: str = "num_attention_heads"  # config attribute counting query heads
    flat: tuple[str, ...] = ()  # roles whose module sees tokens flattened to [batch * pos, ...]


_LLAMA_LIKE = Paths("model.layers", "self_attn.o_proj", "mlp", "post_attention_layernorm")
PATHS: dict[str, Paths] = {
    "GPT2LMHeadModel": Paths("transformer.h", "attn.c_proj", "mlp", "ln_2"),
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Phi3ForCausalLM": _LLAMA_LIKE,
    "OlmoForCausalLM": _LLAMA_LIKE,
    # Gemma2 norms the MLP output before adding it; the MLP's norm input is the residual.
    "Gemma2ForCausalLM": Paths(
        "model.layers", "self_attn.o_proj", "post_feedforward_layernorm", "pre_feedforward_layernorm"
    ),
    "Gemma3ForCausalLM": Paths(
        "model.layers", "self_attn.o_proj", "post_feedforward_layernorm", "pre_feedforward_layernorm"
    ),
    # Parallel blocks: attention and MLP read the same residual, there is no resid_mid.
    "GPTNeoXForCausalLM": Paths("gpt_neox.layers", "attention.dense", "mlp"),
    "GPTJForCausalLM": Paths("transformer.h", "attn.out_proj", "mlp"),
    # OPT has no MLP module: fc2's output is added to the residual.
    "OPTForCausalLM": Paths(
        "model.decoder.layers", "self_attn.out_proj", "fc2", "final_layer_norm", flat=("mlp_out", "resid_mid")
    ),
    "MambaForCausalLM": Paths("backbone.layers"),
    "Mamba2ForCausalLM": Paths("backbone.layers", "mixer.out_proj", heads="num_heads"),
}


def paths_of(hf: torch.nn.Module) -> Paths:
    name = type(hf).__name__
    if name not in PATHS:
        pytest.fail(f"tests/hook_reference.py has no module paths for {name}: add an entry to PATHS")
    paths = PATHS[name]
    if name == "GPTNeoXForCausalLM" and not hf.config.use_parallel_residual:
        # Sequential NeoX: the MLP's norm reads the residual after the attention add.
        paths = dataclasses.replace(paths, mid_norm="post_attention_layernorm")
    return paths


def block(hf: torch.nn.Module, layer: int) -> torch.nn.Module:
    return hf.get_submodule(paths_of(hf).layers)[layer]


def n_layers(hf: torch.nn.Module) -> int:
    return len(hf.get_submodule(paths_of(hf).layers))


def n_heads(hf: torch.nn.Module) -> int:
    return int(getattr(hf.config, paths_of(hf).heads))


# -- hooking one role at one layer ------------------------------------------------------------
Edit = Callable[[torch.Tensor], torch.Tensor | None]


def _site(hf: torch.nn.Module, role: str, layer: int) -> tuple[torch.nn.Module, str]:
    """The module where ``role`` lives at ``layer``, and whether it is that module's input or output."""
    paths = paths_of(hf)
    here = block(hf, layer)
    if role == "resid_pre":
        return here, "input"
    if role == "z":
        return here.get_submodule(paths.out_proj), "input"
    if role == "resid_mid":
        return here.get_submodule(paths.mid_norm), "shared input"  # also the residual: edit in place
    if role == "mlp_out":
        return here.get_submodule(paths.mlp), "output"
    raise NotImplementedError(f"the hook reference does not cover role {role!r}")


def _hook(hf: torch.nn.Module, role: str, layer: int, edit: Edit, shape: tuple[int, int]):
    """Register a hook that passes ``role`` at ``layer`` through ``edit`` (None keeps it).

    ``edit`` always sees ``[batch, pos, ...]``, also where the module flattens tokens.
    """
    module, side = _site(hf, role, layer)
    if role in paths_of(hf).flat:
        inner = edit

        def edit(value):
            new = inner(value.view(*shape, *value.shape[1:]))
            return None if new is None else new.reshape(value.shape)

    def pre(module, args, kwargs):
        value = args[0] if args else kwargs["hidden_states"]
        new = edit(value)
        if new is None:
            return None
        if side == "shared input":
            with torch.no_grad():
                value.copy_(new)
            return None
        if args:
            return (new,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def post(module, args, output):
        value = output[0] if isinstance(output, tuple) else output
        new = edit(value)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    if side == "output":
        return module.register_forward_hook(post)
    return module.register_forward_pre_hook(pre, with_kwargs=True)


def run(hf: torch.nn.Module, ids: torch.Tensor, edits: dict[tuple[str, int], Edit] | None = None) -> torch.Tensor:
    """Logits ``[batch, pos, vocab]`` of one plain forward with the given edits hooked in."""
    handles = [_hook(hf, role, layer, edit, tuple(ids.shape)) for (role, layer), edit in (edits or {}).items()]
    try:
        return hf(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


def capture(hf: torch.nn.Module, role: str, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``role`` at every layer (``[batch, pos, ...]``, detached copies) and the logits."""
    store: dict[int, torch.Tensor] = {}

    def keep(layer):
        def edit(value):
            store[layer] = value.detach().clone()

        return edit

    with torch.no_grad():
        logits = run(hf, ids, {(role, layer): keep(layer) for layer in range(n_layers(hf))})
    return [store[layer] for layer in range(n_layers(hf))], logits


def gradients(hf: torch.nn.Module, role: str, ids: torch.Tensor, metric: Callable[[torch.Tensor], torch.Tensor]):
    """``role`` at every layer, d metric(logits).sum() / d role by ``torch.autograd.grad``, and the logits.

    The gradient is taken at the very tensor the model passes on, then laid out like the role
    (``[batch, pos, ...]``; heads split for ``z``).
    """
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(n_layers(hf)):
        module, side = _site(hf, role, layer)

        def keep_input(module, args, kwargs, layer=layer):
            store[layer] = args[0] if args else kwargs["hidden_states"]

        def keep_output(module, args, output, layer=layer):
            store[layer] = output[0] if isinstance(output, tuple) else output

        if side == "output":
            handles.append(module.register_forward_hook(keep_output))
        else:
            handles.append(module.register_forward_pre_hook(keep_input, with_kwargs=True))
    try:
        with torch.enable_grad():
            logits = hf(input_ids=ids).logits
            tensors = [store[layer] for layer in range(n_layers(hf))]
            grads = torch.autograd.grad(metric(logits).sum(), tensors)
    finally:
        for handle in handles:
            handle.remove()

    def layout(value):
        if role in paths_of(hf).flat:
            value = value.view(*ids.shape, *value.shape[1:])
        return heads_view(hf, value) if role == "z" else value

    return [layout(t.detach()) for t in tensors], [layout(g) for g in grads], logits.detach()


def heads_view(hf: torch.nn.Module, value: torch.Tensor) -> torch.Tensor:
    """[batch, pos, heads * d_head] -> [batch, pos, heads, d_head] (heads are laid out head-major)."""
    return value.unflatten(-1, (n_heads(hf), value.shape[-1] // n_heads(hf)))


def replace(
    value: torch.Tensor,
    source: torch.Tensor,
    role: str,
    hf,
    pos: int | None,
    head: int | None,
    source_pos: int | None = None,
) -> torch.Tensor:
    """``value`` with ``source`` copied in at ``pos`` (all positions if None) and ``head``."""
    new = value.clone()
    target_view, source_view = (heads_view(hf, new), heads_view(hf, source)) if role == "z" else (new, source)
    at = slice(None) if pos is None else pos
    src_at = at if source_pos is None else source_pos
    if head is None:
        target_view[:, at] = source_view[:, src_at]
    else:
        target_view[:, at, head] = source_view[:, src_at, head]
    return new


def logit_diff(logits: torch.Tensor, answer: int, distractor: int) -> torch.Tensor:
    last = logits[:, -1].float()
    return last[:, answer] - last[:, distractor]


def reference_patch(hf, role, over, clean, corrupt, direction, align=None, answer=300, distractor=301):
    """{(layer, head?, pos?): logit difference averaged over pairs}, one hooked forward per patch, and
    the clean and corrupt runs' logit differences.

    Each forward runs every prompt pair as a batch row with the same single patch.
    """
    target, source = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    if align is None:
        source_of = {p: p for p in range(target.shape[1])}
    else:
        src_pos, tgt_pos = align if direction == "denoise" else align[::-1]
        source_of = dict(zip(tgt_pos, src_pos))
    heads = range(n_heads(hf)) if "head" in over else [None]
    positions = list(source_of) if "pos" in over else [None]
    out = {}
    with torch.no_grad():
        source_acts, _ = capture(hf, role, source)
        for layer in range(n_layers(hf)):
            for head in heads:
                for pos in positions:

                    def edit(value, layer=layer, head=head, pos=pos):
                        for tp in source_of if pos is None else [pos]:
                            value = replace(value, source_acts[layer], role, hf, tp, head, source_of[tp])
                        return value

                    logits = run(hf, target, {(role, layer): edit})
                    key = (layer,) + ((head,) if head is not None else ()) + ((pos,) if pos is not None else ())
                    out[key] = logit_diff(logits, answer, distractor).mean().item()
        clean_metric = logit_diff(run(hf, clean), answer, distractor).mean().item()
        corrupt_metric = logit_diff(run(hf, corrupt), answer, distractor).mean().item()
    return out, clean_metric, corrupt_metric
