"""Turning a name, a directory, a GGUF file or a Hugging Face model into an AnyModel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..core.errors import DtypeError
from ..core.model import AnyModel
from ..core.spec import AdapterSpec
from ..core.wrapping import wrap_with_spec
from ..registry.resolve import adapter_for
from .hub import hub_access
from .integrity import find_damage
from .locate import Source, parse_source


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
    spec = adapter_for(hf_model, adapter)
    return wrap_with_spec(hf_model, spec, tokenizer, attn_implementation=attn_implementation)


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
    """Load a model: ``"zoo:NAME"``, ``"tiny:FAMILY"``, a named source (``"smollm2-135m"``), a local
    directory, a ``.gguf`` file, or a hub id (see :mod:`anylens.loading.locate`).

    A hub id that is not in the local Hugging Face cache while the hub cannot be reached
    (``HF_HUB_OFFLINE`` set, or no connection) fails at once with the local models listed.

    ``remote=True`` (or an NDIF URL) runs every trace on NDIF: ``source`` is then a hub id NDIF
    serves, and only its config is fetched. ``remote="local"`` loads the weights here but sends
    each trace through nnsight's serialising dry run of the remote path, to check an experiment
    before spending remote time.
    """
    from transformers import AutoTokenizer

    if remote and remote != "local":
        from .remote import load_remote

        return load_remote(str(source), remote=remote, adapter=adapter, tokenizer=tokenizer)
    torch_dtype = _as_dtype(dtype)
    parsed = parse_source(source)
    if parsed.kind == "tiny":
        model = _load_tiny(parsed.name, torch_dtype, device, adapter=adapter, attn_implementation=attn_implementation)
    else:
        location, gguf_file = _locate(parsed)
        kwargs = dict(hf_kwargs)
        if parsed.kind == "hub":
            kwargs.update(hub_access(parsed.name))
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        hf_model = _weights(location, gguf_file, kwargs)
        if device is not None and device_map is None:
            hf_model.to(device)
        if tokenizer is None:
            tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            if kwargs.get("local_files_only"):
                tok_kwargs["local_files_only"] = True
            tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
        model = wrap(hf_model, tokenizer, adapter=adapter, attn_implementation=attn_implementation)
    model.source = str(source)
    model.remote = remote
    return model


def adapter_of_source(source: str | os.PathLike) -> AdapterSpec:
    """The adapter (specialised to the config) that ``load(source)`` would wrap the model with,
    from the config alone where a registered adapter claims its architecture (no weights read);
    otherwise the model is loaded and released. For checking roles before a sweep computes."""
    parsed = parse_source(source)
    if parsed.kind == "tiny":
        from ..tiny import TINY_ADAPTERS

        if parsed.name in TINY_ADAPTERS:
            return TINY_ADAPTERS[parsed.name]
    elif parsed.kind in ("zoo", "named", "directory"):
        from transformers import AutoConfig

        from ..registry.manager import registry

        try:
            config = AutoConfig.from_pretrained(_locate(parsed)[0])
        except Exception:  # no readable config: the full load below reports what is wrong
            config = None
        claims = registry().claims
        for arch in getattr(config, "architectures", None) or []:
            if arch in claims:
                return claims[arch].adapter.specialize(config)
    model = load(source)
    try:
        return model.adapter
    finally:
        del model


#: The dtype names ``load`` accepts ("auto": the checkpoint's own dtype).
DTYPES = ("float32", "float16", "bfloat16", "float64", "auto")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return getattr(torch, dtype)
    raise DtypeError(f"dtype {dtype!r} is not one anylens loads: give one of {', '.join(DTYPES)} or a torch.dtype")


def _load_tiny(family: str, dtype: torch.dtype | str | None, device: Any, **wrap_kwargs: Any) -> AnyModel:
    from ..tiny import tiny

    model = tiny(family, **{k: v for k, v in wrap_kwargs.items() if v is not None})
    if isinstance(dtype, torch.dtype) or device is not None:
        model.hf.to(device=device, dtype=dtype if isinstance(dtype, torch.dtype) else None)
    return model


def _locate(source: Source) -> tuple[str, str | None]:
    """The directory (or hub id) ``from_pretrained`` takes, and the GGUF file name in it."""
    if source.kind == "zoo":
        from ..zoo import model_dir

        return str(model_dir(source.name)), None
    if source.kind == "named":
        from .sources import materialize

        return str(materialize(source.name)), None
    if source.kind == "gguf":
        return str(source.path.parent), source.path.name
    if source.kind == "directory":
        return str(source.path), None
    return source.name, None  # a hub id


def _weights(location: str, gguf_file: str | None, kwargs: dict[str, Any]) -> torch.nn.Module:
    """``from_pretrained``, with a damaged weights file reported as such."""
    try:
        return _from_pretrained(location, **kwargs)
    except Exception as error:
        damage = find_damage(Path(location), gguf_file) if Path(location).is_dir() else None
        if damage is not None:
            raise damage from error
        raise


def _from_pretrained(location: str, **kwargs: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(location, **kwargs)
