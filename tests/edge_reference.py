"""An independent reference for edge attribution: plain torch hooks and ``torch.autograd.grad`` on
the Hugging Face modules, written without anylens (module knowledge keyed by the model class).

* sender outputs: the embedding (the first block's input), each head's ``z[..., h, :] @ W_O[h]``,
  a whole attention or mixer write, each MLP's output;
* receiver gradients: a zero tensor added to the input of the norm that starts each branch (and of
  the final norm, for the logits), its gradient taken by autograd: the gradient through that
  branch alone;
* single-edge effects: the clean run with one receiver's norm input shifted by one sender's
  corrupt-minus-clean output, which is exactly the clean run with that edge corrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hook_reference import block, forward_logits, n_heads, n_layers, paths_of


@dataclass(frozen=True)
class Branches:
    mixer_norm: str  # in each block: the norm that starts the token-mixing branch
    mlp_norm: str | None  # the norm that starts the MLP branch (None: no MLP, or the mixer's norm feeds both)
    final_norm: str  # from the model: the norm before the unembedding
    writer: str | None = None  # in each block: the module whose output is the whole mixer write


_LLAMA_LIKE = Branches("input_layernorm", "post_attention_layernorm", "model.norm", "self_attn")
BRANCHES: dict[str, Branches] = {
    "GPT2LMHeadModel": Branches("ln_1", "ln_2", "transformer.ln_f", "attn"),
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Phi3ForCausalLM": _LLAMA_LIKE,
    # Gemma2 norms attention's output before the residual add: that norm's output is the write.
    "Gemma2ForCausalLM": Branches(
        "input_layernorm", "pre_feedforward_layernorm", "model.norm", "post_attention_layernorm"
    ),
    "GPTNeoXForCausalLM": Branches("input_layernorm", "post_attention_layernorm", "gpt_neox.final_layer_norm"),
    "OPTForCausalLM": Branches("self_attn_layer_norm", "final_layer_norm", "model.decoder.final_layer_norm"),
    "GPTJForCausalLM": Branches("ln_1", None, "transformer.ln_f"),
    "MambaForCausalLM": Branches("norm", None, "backbone.norm_f", "mixer"),
    "Mamba2ForCausalLM": Branches("norm", None, "backbone.norm_f", "mixer"),
    "TinyPlainLM": Branches("norm_a", "norm_b", "norm_out", "mix"),
}


def branches_of(hf: torch.nn.Module) -> Branches:
    name = type(hf).__name__
    if name not in BRANCHES:
        pytest.fail(f"tests/edge_reference.py has no branch norms for {name}: add an entry to BRANCHES")
    return BRANCHES[name]


def receiver_module(hf: torch.nn.Module, kind: str, layer: int) -> torch.nn.Module:
    """The norm whose input a receiver (a graph node's kind and layer) reads."""
    branches = branches_of(hf)
    if kind == "logits":
        return hf.get_submodule(branches.final_norm)
    name = branches.mlp_norm if kind == "mlp" else branches.mixer_norm
    return block(hf, layer).get_submodule(name)


def _shift_input(module: torch.nn.Module, shift: Callable[[torch.Tensor], torch.Tensor]):
    def pre(module, args, kwargs):
        if args:
            return (shift(args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": shift(kwargs["hidden_states"])}

    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _as_tokens(value: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, ...]`` whether the module saw tokens that way or flattened (OPT's MLP)."""
    return value.view(*ids.shape, *value.shape[1:]) if value.shape[0] == ids.numel() != ids.shape[0] else value


def receiver_gradients(
    hf: torch.nn.Module, ids: torch.Tensor, receivers: list[tuple[str, str, int]], metric: Callable
) -> dict[str, torch.Tensor]:
    """{receiver name: d metric(logits).sum() / d its norm's input, ``[batch, pos, d_model]``}.

    ``receivers`` are (name, kind, layer); receivers sharing a norm share its gradient.
    """
    zeros: dict[int, torch.Tensor] = {}
    handles = []
    modules = {name: receiver_module(hf, kind, layer) for name, kind, layer in receivers}
    for key, module in {id(m): m for m in modules.values()}.items():

        def add(value, key=key):
            zeros[key] = torch.zeros_like(value, requires_grad=True)
            return value + zeros[key]

        handles.append(_shift_input(module, add))
    try:
        with torch.enable_grad():
            logits = forward_logits(hf, ids)
            keys = list(zeros)
            grads = torch.autograd.grad(metric(logits).sum(), [zeros[k] for k in keys], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    by_key = {k: (torch.zeros_like(zeros[k]) if g is None else g) for k, g in zip(keys, grads)}
    return {name: _as_tokens(by_key[id(module)], ids).float() for name, module in modules.items()}


def sender_outputs(hf: torch.nn.Module, ids: torch.Tensor, senders: list[tuple[str, str, int, int | None]]):
    """{sender name: what it writes into the residual stream, ``[batch, pos, d_model]``} on ``ids``.

    ``senders`` are (name, kind, layer, head).
    """
    paths, branches = paths_of(hf), branches_of(hf)
    store: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def keep_input(key):
        def pre(module, args, kwargs):
            store[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return pre

    def keep_output(key):
        def post(module, args, output):
            store[key] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return post

    for layer in range(n_layers(hf)):
        here = block(hf, layer)
        if paths.out_proj:
            handles.append(
                here.get_submodule(paths.out_proj).register_forward_pre_hook(keep_input(("z", layer)), with_kwargs=True)
            )
        if branches.writer:
            handles.append(here.get_submodule(branches.writer).register_forward_hook(keep_output(("writer", layer))))
        if paths.mlp:
            handles.append(here.get_submodule(paths.mlp).register_forward_hook(keep_output(("mlp", layer))))
    handles.append(block(hf, 0).register_forward_pre_hook(keep_input(("embed", 0)), with_kwargs=True))
    try:
        with torch.no_grad():
            forward_logits(hf, ids)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, kind, layer, head in senders:
        if kind == "embed":
            out[name] = store[("embed", 0)]
        elif kind == "head":
            z = store[("z", layer)]
            d_head = z.shape[-1] // n_heads(hf)
            proj = block(hf, layer).get_submodule(paths.out_proj)
            # nn.Linear keeps [out, in]; GPT-2's Conv1D keeps [in, out].
            weight = proj.weight.T if isinstance(proj, torch.nn.Linear) else proj.weight
            rows = slice(head * d_head, (head + 1) * d_head)
            out[name] = z[..., rows] @ weight[rows]
        elif kind == "mlp":
            out[name] = _as_tokens(store[("mlp", layer)], ids)
        else:
            out[name] = store[("writer", layer)]
    return {name: value.float() for name, value in out.items()}


def edge_effects(
    hf: torch.nn.Module,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    edges: list[tuple[tuple[str, str, int, int | None], tuple[str, str, int]]],
    metric: Callable,
) -> tuple[torch.Tensor, float]:
    """metric(edge corrupted) - metric(clean), averaged over pairs, for each (sender, receiver)
    edge: one forward per edge, the receiver's norm input shifted by the sender's corrupt-minus-clean
    output. Also returns metric(clean)."""
    senders = list({s[0]: s for s, _ in edges}.values())
    corrupt_out = sender_outputs(hf, corrupt, senders)
    deltas = {name: corrupt_out[name] - value for name, value in sender_outputs(hf, clean, senders).items()}
    with torch.no_grad():
        base = metric(forward_logits(hf, clean)).mean().item()
        effects = []
        for (sender, _kind, _layer, _head), (_name, kind, layer) in edges:
            module = receiver_module(hf, kind, layer)
            delta = deltas[sender]

            def add(value, delta=delta):
                return value + delta.to(value.dtype).reshape(value.shape)

            handle = _shift_input(module, add)
            try:
                effects.append(metric(forward_logits(hf, clean)).mean().item() - base)
            finally:
                handle.remove()
    return torch.tensor(effects), base
