"""Turning a name, a directory, a GGUF file or a Hugging Face model into an AnyModel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import AnylensError
from .model import AnyModel


def wrap(
    hf_model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    adapter: Any = None,
    attn_implementation: str | None = None,
) -> AnyModel:
    """Wrap a Hugging Face causal LM (already built) for role-based experiments.

    ``adapter`` overrides resolution (an adapter name, spec, dict or TOML path). Attention models
    are switched to eager attention unless ``attn_implementation`` says otherwise, because only
    eager attention materialises the probabilities that ``pattern`` reads and writes.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import PreTrainedModel

    spec = adapter_for(hf_model, adapter)
    spec = spec.specialize(hf_model.config)
    hf_model.eval()
    if "pattern" in spec.roles and hasattr(hf_model, "set_attn_implementation"):
        wanted = attn_implementation or "eager"
        if getattr(hf_model.config, "_attn_implementation", None) != wanted:
            hf_model.set_attn_implementation(wanted)
    if not isinstance(hf_model, PreTrainedModel):
        # A plain torch model (e.g. mamba-ssm's MambaLMHeadModel): nnsight's generic wrapper,
        # traced with token-id tensors; a tokenizer is optional.
        from nnsight import NNsight

        return AnyModel(NNsight(hf_model), spec, tokenizer)
    if tokenizer is None:
        tokenizer = _tokenizer_for(hf_model)
    nn_model = TransformersModel(hf_model, tokenizer=tokenizer)
    return AnyModel(nn_model, spec, tokenizer)


def adapter_for(module: torch.nn.Module, adapter: Any = None) -> Any:
    """The adapter spec for ``module``: resolved by the registry, or the one ``adapter`` names or is
    (an adapter name, a spec, a dict, or a TOML path)."""
    from ..registry.manager import as_spec, registry

    if adapter is None:
        return registry().resolve(module)
    if isinstance(adapter, str) and not adapter.endswith(".toml"):
        return registry().adapter(adapter)
    return as_spec(adapter)


def load(
    source: str | os.PathLike,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device | None = None,
    device_map: Any = None,
    adapter: Any = None,
    attn_implementation: str | None = None,
    remote: bool | str = False,
    **hf_kwargs: Any,
) -> AnyModel:
    """Load a model: ``"zoo:NAME"``, a named source (``"smollm2-135m"``), a local directory,
    a ``.gguf`` file, or a hub id (honouring ``HF_HUB_OFFLINE``).

    ``remote=True`` (or an NDIF URL) runs every trace on NDIF: ``source`` is then a hub id NDIF
    serves, and only its config is fetched. ``remote="local"`` loads the weights here but sends
    each trace through nnsight's serialising dry run of the remote path, to check an experiment
    before spending remote time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if remote and remote != "local":
        from .remote import load_remote

        return load_remote(str(source), remote=remote, adapter=adapter, tokenizer=tokenizer)
    location, gguf_file = _locate(source)
    kwargs = dict(hf_kwargs)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    hf_model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if device is not None and device_map is None:
        hf_model.to(device)
    if tokenizer is None:
        tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
    model = wrap(hf_model, tokenizer, adapter=adapter, attn_implementation=attn_implementation)
    model.source = str(source)
    model.remote = remote
    return model


def _locate(source: str | os.PathLike) -> tuple[str, str | None]:
    text = str(source)
    if text.startswith("zoo:"):
        from ..zoo import model_dir

        return str(model_dir(text[4:])), None
    from .sources import NAMED_SOURCES, materialize

    if text in NAMED_SOURCES:
        return str(materialize(text)), None
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {text!r} does not exist")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise AnylensError(f"{text!r} is a local path but has no config.json: give a saved model directory")
        return str(path), None
    return text, None  # a hub id


def _tokenizer_for(hf_model: torch.nn.Module) -> Any:
    from transformers import AutoTokenizer

    name = getattr(hf_model.config, "_name_or_path", "")
    if name:
        try:
            return AutoTokenizer.from_pretrained(name)
        except Exception:
            pass
    raise AnylensError(
        f"no tokenizer for {type(hf_model).__name__}: pass one, al.wrap(model, tokenizer) "
        "(any transformers tokenizer; experiments on strings need it)"
    )
