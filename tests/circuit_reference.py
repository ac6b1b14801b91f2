"""An independent reference for the circuit tests: edges patched with plain torch hooks on the
Hugging Face modules, one forward per row and prompt, written without anylens.

An edge ``sender -> receiver`` is patched by a forward pre-hook on the norm that starts the
receiver's branch (a forward hook on the last block for the logits), adding
``coefficient * (source write - other write)`` of the sender. The senders' writes are read by
hooks of their own: the first block's input (the embedding), the output projection's input cut
into heads, the attention / MLP / mixer modules' outputs. The module knowledge lives in
``CIRCUIT_PATHS`` below, keyed by the model class, never taken from an adapter.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest
import torch

#: Query heads of every tiny attention model (tests/tiny_models.py builds them with four).
TINY_HEADS = 4


@dataclass(frozen=True)
class CircuitPaths:
    """Where senders write and receivers read, under one block (``layers`` from the model root)."""

    layers: str
    attn_norm: str  # its input is what attention (or the SSM mixer) reads
    mlp_norm: str | None = None  # its input is what the MLP reads (the same norm in GPT-J)
    attn: str | None = None  # its output (first element of a tuple) is attention's write
    mlp: str | None = None  # its output is the MLP's write
    mixer: str | None = None  # its output is an SSM mixer's write
    out_proj: str | None = None  # its input is z, [batch, pos, heads * d_head]
    conv1d: bool = False  # the output projection stores its weight as [in, out] (GPT-2's Conv1D)
    parallel: bool = False  # attention and MLP read the same stream
    flat_mlp: bool = False  # the MLP side sees [batch * pos, d] (OPT)


_LLAMA_LIKE = CircuitPaths(
    "model.layers", "input_layernorm", "post_attention_layernorm", "self_attn", "mlp", out_proj="self_attn.o_proj"
)
_MAMBA = CircuitPaths("backbone.layers", "norm", mixer="mixer")
_NEOX = CircuitPaths(
    "gpt_neox.layers",
    "input_layernorm",
    "post_attention_layernorm",
    "attention",
    "mlp",
    out_proj="attention.dense",
    parallel=True,
)
CIRCUIT_PATHS: dict[str, CircuitPaths] = {
    "GPT2LMHeadModel": CircuitPaths(
        "transformer.h", "ln_1", "ln_2", "attn", "mlp", out_proj="attn.c_proj", conv1d=True
    ),
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Phi3ForCausalLM": _LLAMA_LIKE,
    # Gemma 2 norms each sublayer's output before adding it: the post-norms are the writes.
    "Gemma2ForCausalLM": CircuitPaths(
        "model.layers",
        "input_layernorm",
        "pre_feedforward_layernorm",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
    ),
    "GPTNeoXForCausalLM": _NEOX,
    "GPTJForCausalLM": CircuitPaths(
        "transformer.h", "ln_1", "ln_1", "attn", "mlp", out_proj="attn.out_proj", parallel=True
    ),
    "OPTForCausalLM": CircuitPaths(
        "model.decoder.layers",
        "self_attn_layer_norm",
        "final_layer_norm",
        "self_attn",
        "fc2",
        out_proj="self_attn.out_proj",
        flat_mlp=True,
    ),
    "MambaForCausalLM": _MAMBA,
    "Mamba2ForCausalLM": _MAMBA,
    "TinyPlainLM": CircuitPaths("blocks", "norm_a", "norm_b", "mix", "ff", out_proj="mix.out"),
}


def circuit_paths(hf: torch.nn.Module) -> CircuitPaths:
    name = type(hf).__name__
    if name not in CIRCUIT_PATHS:
        pytest.fail(f"tests/circuit_reference.py has no circuit paths for {name}: add an entry to CIRCUIT_PATHS")
    paths = CIRCUIT_PATHS[name]
    if name == "GPTNeoXForCausalLM" and not hf.config.use_parallel_residual:
        paths = dataclasses.replace(paths, parallel=False)
    return paths


# -- nodes, by the names the tests use ---------------------------------------------------------
_NAME = re.compile(r"^(embed|logits|a(\d+)\.h(\d+)|(attn|mlp|mixer|block)(\d+))$")


def parse(name: str) -> tuple[str, int | None, int | None]:
    """``(kind, layer, head)`` of a node name: "a1.h2" -> ("head", 1, 2), "mlp0" -> ("mlp", 0, None)."""
    match = _NAME.match(name)
    assert match, f"not a node name: {name}"
    if match.group(1) in ("embed", "logits"):
        return match.group(1), None, None
    if match.group(2) is not None:
        return "head", int(match.group(2)), int(match.group(3))
    return match.group(4), int(match.group(5)), None


def order(name: str, n_layers: int, parallel: bool) -> tuple[float, int]:
    """(layer, stage) of a node: senders reach receivers strictly after them."""
    kind, layer, _ = parse(name)
    if kind == "embed":
        return (-1, 0)
    if kind == "logits":
        return (n_layers, 0)
    return (layer, 1 if kind == "mlp" and not parallel else 0)


def reaches(sender: str, receiver: str, n_layers: int, parallel: bool) -> bool:
    return order(sender, n_layers, parallel) < order(receiver, n_layers, parallel)


# -- the hooks ---------------------------------------------------------------------------------
def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _head_writes(hf: torch.nn.Module, paths: CircuitPaths, layer: int, z: torch.Tensor) -> torch.Tensor:
    """[batch, pos, heads, d_model]: each head's slice of z through its columns of the projection."""
    proj = hf.get_submodule(paths.layers)[layer].get_submodule(paths.out_proj)
    weight = proj.weight if paths.conv1d else proj.weight.T  # [in, out]
    d_head = z.shape[-1] // TINY_HEADS
    z = z.reshape(*z.shape[:-1], TINY_HEADS, d_head)
    return torch.einsum("bphd,hdm->bphm", z, weight.reshape(TINY_HEADS, d_head, -1))


def _sender_hooks(hf: torch.nn.Module, paths: CircuitPaths, ids: torch.Tensor, store: dict) -> list:
    """Hooks that put every sender's write into ``store`` as the forward reaches it."""
    batch, seq = ids.shape
    blocks = hf.get_submodule(paths.layers)
    handles = []

    def embed(module, args, kwargs):
        store["embed"] = _hidden(args, kwargs)

    handles.append(blocks[0].register_forward_pre_hook(embed, with_kwargs=True))
    for layer, block in enumerate(blocks):
        if paths.out_proj:

            def heads(module, args, kwargs, layer=layer):
                writes = _head_writes(hf, paths, layer, _hidden(args, kwargs))
                for head in range(TINY_HEADS):
                    store[f"a{layer}.h{head}"] = writes[:, :, head]

            handles.append(block.get_submodule(paths.out_proj).register_forward_pre_hook(heads, with_kwargs=True))
        for kind, module in (("attn", paths.attn), ("mlp", paths.mlp), ("mixer", paths.mixer)):
            if module is None:
                continue

            def write(module, args, output, name=f"{kind}{layer}", flat=kind == "mlp" and paths.flat_mlp):
                value = _first(output)
                store[name] = value.reshape(batch, seq, -1) if flat else value

            handles.append(block.get_submodule(module).register_forward_hook(write))
    return handles


def record(hf: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every sender's write on ``ids``, by node name."""
    paths, store = circuit_paths(hf), {}
    handles = _sender_hooks(hf, paths, ids, store)
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.detach().clone() for name, value in store.items()}


def run(
    hf: torch.nn.Module,
    ids: torch.Tensor,
    edges: list[tuple],
    source: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Final-position logits with each edge ``(sender, receiver, c)`` adding to the receiver's
    input ``c * (source[sender] - base[sender])``; without ``base``, the sender's write in this
    very forward (read live, so upstream changes reach it). An edge
    ``(sender, receiver, c, writes)`` takes its source write from ``writes`` instead."""
    paths = circuit_paths(hf)
    blocks = hf.get_submodule(paths.layers)
    batch, seq = ids.shape
    live: dict[str, torch.Tensor] = {}
    handles = _sender_hooks(hf, paths, ids, live) if base is None else []
    by_receiver: dict[str, list[tuple[str, float, dict]]] = {}
    for sender, receiver, coefficient, *own_source in edges:
        by_receiver.setdefault(receiver, []).append((sender, coefficient, own_source[0] if own_source else source))

    def delta(receiver: str, like: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(batch, seq, like.shape[-1])
        for sender, coefficient, writes in by_receiver.get(receiver, []):
            other = live[sender] if base is None else base[sender]
            total = total + coefficient * (writes[sender] - other)
        return total

    def add_to_input(receiver: str, flat: bool):
        def hook(module, args, kwargs):
            value = _hidden(args, kwargs)
            change = delta(receiver, value)
            value = value + (change.reshape(value.shape) if flat else change)
            return ((value, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": value})

        return hook

    def add_to_output(module, args, output):
        value = _first(output) + delta("logits", _first(output))
        return (value, *output[1:]) if isinstance(output, tuple) else value

    for receiver in by_receiver:
        kind, layer, _ = parse(receiver)
        if kind == "logits":
            handles.append(blocks[-1].register_forward_hook(add_to_output))
            continue
        norm = paths.mlp_norm if kind == "mlp" else paths.attn_norm
        flat = kind == "mlp" and paths.flat_mlp
        handles.append(
            blocks[layer].get_submodule(norm).register_forward_pre_hook(add_to_input(receiver, flat), with_kwargs=True)
        )
    try:
        with torch.no_grad():
            out = hf(ids)
    finally:
        for handle in handles:
            handle.remove()
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits[:, -1].float()


def all_edges(senders: list[str], receivers: list[str], n_layers: int, parallel: bool) -> list[tuple[str, str]]:
    """Every (sender, receiver) with the sender strictly before the receiver."""
    return [(s, r) for r in receivers for s in senders if reaches(s, r, n_layers, parallel)]


def last_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The unpatched run's final-position logits."""
    return run(hf, ids, [], {})
