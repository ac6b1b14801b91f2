"""An independent reference for edge attribution: plain torch hooks and ``torch.autograd.grad`` on
the Hugging Face modules, written without anylens. Where senders write and receivers read comes
from tests/circuit_reference.py (``CIRCUIT_PATHS``, keyed by the model class); head counts from
tests/hook_reference.py, so the zoo models (not only the tiny ones) are covered.

* sender outputs: the embedding (the first block's input), each head's ``z[..., h, :] @ W_O[h]``,
  a whole attention or mixer write, each MLP's output;
* receiver gradients: a zero tensor added to the input of the norm that starts each branch (to the
  last block's output, for the logits), its gradient taken by autograd: the gradient through that
  branch alone;
* single-edge effects: the clean run with one receiver's input shifted by one sender's
  corrupt-minus-clean output, which is exactly the clean run with that edge corrupted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from circuit_reference import circuit_paths
from hook_reference import forward_logits, n_heads

Shift = Callable[[torch.Tensor], torch.Tensor]


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _shift_receiver(hf: torch.nn.Module, kind: str, layer: int, shift: Shift):
    """Hook ``shift`` onto what a receiver reads: its branch norm's input, or the last block's
    output for the logits. ``shift`` sees ``[batch, pos, d]`` or OPT's flattened ``[batch * pos, d]``."""
    paths = circuit_paths(hf)
    blocks = hf.get_submodule(paths.layers)
    if kind == "logits":

        def post(module, args, output):
            value = shift(_first(output))
            return (value, *output[1:]) if isinstance(output, tuple) else value

        return blocks[-1].register_forward_hook(post)
    norm = paths.mlp_norm if kind == "mlp" else paths.attn_norm

    def pre(module, args, kwargs):
        if args:
            return (shift(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": shift(kwargs["hidden_states"])}

    return blocks[layer].get_submodule(norm).register_forward_pre_hook(pre, with_kwargs=True)


def receiver_gradients(
    hf: torch.nn.Module, ids: torch.Tensor, receivers: list[tuple[str, str, int]], metric: Callable
) -> dict[str, torch.Tensor]:
    """{receiver name: d metric(logits).sum() / d its input, ``[batch, pos, d_model]``} for
    receivers given as (name, kind, layer)."""
    zeros: dict[str, torch.Tensor] = {}
    handles = []
    for name, kind, layer in receivers:

        def add(value, name=name):
            zeros[name] = torch.zeros_like(value, requires_grad=True)
            return value + zeros[name]

        handles.append(_shift_receiver(hf, kind, layer, add))
    try:
        with torch.enable_grad():
            logits = forward_logits(hf, ids)
            names = list(zeros)
            grads = torch.autograd.grad(metric(logits).sum(), [zeros[n] for n in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return {
        name: (torch.zeros_like(zeros[name]) if grad is None else grad).reshape(*ids.shape, -1).float()
        for name, grad in zip(names, grads)
    }


def sender_outputs(
    hf: torch.nn.Module, ids: torch.Tensor, senders: list[tuple[str, str, int, int | None]]
) -> dict[str, torch.Tensor]:
    """{sender name: what it writes into the residual stream, ``[batch, pos, d_model]``} on ``ids``,
    for senders given as (name, kind, layer, head)."""
    paths = circuit_paths(hf)
    blocks = hf.get_submodule(paths.layers)
    store: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def keep_input(key):
        def pre(module, args, kwargs):
            store[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        return pre

    def keep_output(key):
        def post(module, args, output):
            store[key] = _first(output).detach().clone()

        return post

    handles.append(blocks[0].register_forward_pre_hook(keep_input(("embed", 0)), with_kwargs=True))
    for layer, block in enumerate(blocks):
        if paths.out_proj:
            proj = block.get_submodule(paths.out_proj)
            handles.append(proj.register_forward_pre_hook(keep_input(("head", layer)), with_kwargs=True))
        for kind in ("attn", "mlp", "mixer"):
            if getattr(paths, kind):
                handles.append(
                    block.get_submodule(getattr(paths, kind)).register_forward_hook(keep_output((kind, layer)))
                )
    try:
        with torch.no_grad():
            forward_logits(hf, ids)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, kind, layer, head in senders:
        if kind == "head":
            z = store[("head", layer)]
            d_head = z.shape[-1] // n_heads(hf)
            proj = blocks[layer].get_submodule(paths.out_proj)
            weight = proj.weight if paths.conv1d else proj.weight.T  # [in, out]
            rows = slice(head * d_head, (head + 1) * d_head)
            out[name] = z[..., rows] @ weight[rows]
        else:
            out[name] = store[(kind, max(layer, 0))].reshape(*ids.shape, -1)  # OPT's MLP sees flat tokens
    return {name: value.float() for name, value in out.items()}


def edge_effects(
    hf: torch.nn.Module,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    edges: list[tuple[tuple[str, str, int, int | None], tuple[str, str, int]]],
    metric: Callable,
) -> tuple[torch.Tensor, float]:
    """metric(edge corrupted) - metric(clean), averaged over pairs, for each (sender, receiver)
    edge: one forward per edge, the receiver's input shifted by the sender's corrupt-minus-clean
    output. Also returns metric(clean)."""
    senders = list({s[0]: s for s, _ in edges}.values())
    corrupt_out = sender_outputs(hf, corrupt, senders)
    deltas = {name: corrupt_out[name] - value for name, value in sender_outputs(hf, clean, senders).items()}
    with torch.no_grad():
        base = metric(forward_logits(hf, clean)).mean().item()
        effects = []
        for (sender, *_), (_name, kind, layer) in edges:

            def add(value, delta=deltas[sender]):
                return value + delta.to(value.dtype).reshape(value.shape)

            handle = _shift_receiver(hf, kind, layer, add)
            try:
                effects.append(metric(forward_logits(hf, clean)).mean().item() - base)
            finally:
                handle.remove()
    return torch.tensor(effects), base
