"""What identifies a sweep: its configuration as JSON, the environment it ran in, and each model.

A sweep resumes only into a directory whose recorded configuration and model identities equal
the ones described here; :func:`differences` names what does not.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .fingerprint import weights_fingerprint
from .store import canonical_json, sha256_bytes

if TYPE_CHECKING:
    from ..core.model import AnyModel
    from .experiments import Item


def describe(value: Any) -> Any:
    """A JSON description of an option that is equal exactly when the options are equal:
    metrics by their class and fields, callables by their qualified name, tensors by hash."""
    import dataclasses

    import torch

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((describe(v) for v in value), key=repr)
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return {"tensor": list(data.shape), "dtype": str(data.dtype), "sha256": sha256_bytes(data.numpy().tobytes())}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__qualname__, **fields}
    if callable(value):
        return {"callable": f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"}
    return repr(value)


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON values, one line per differing leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in old:
                lines.append(f"{where}: absent on disk, {new[key]!r} now")
            elif key not in new:
                lines.append(f"{where}: {old[key]!r} on disk, absent now")
            else:
                lines.extend(differences(old[key], new[key], where))
        return lines
    return [] if old == new else [f"{path or 'value'}: {old!r} on disk, {new!r} now"]


def environment() -> dict[str, str]:
    """Library versions the results were computed with, and torch's thread count: matrix
    products split their sums over threads, so another count may change the last bits."""
    import torch

    import anylens

    versions = {"anylens": getattr(anylens, "__version__", "?"), "python": platform.python_version()}
    for package in ("torch", "transformers", "nnsight"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    versions["torch_threads"] = str(torch.get_num_threads())
    return versions


def normalize(value: Any) -> Any:
    # What the manifest will hold after a JSON round trip (tuples become lists, ...).
    import json

    return json.loads(canonical_json(value))


def prompts_sha256(items: Sequence[Item]) -> str:
    return sha256_bytes(canonical_json([item.record() for item in items]))


def model_identity(model: AnyModel, source: str, weights: bool = True) -> dict[str, Any]:
    """What tells two loads of a source apart: adapter, architecture, size, a config hash, and a
    fingerprint of the weights (:func:`anylens.sweep.fingerprint.weights_fingerprint`), unless
    ``weights=False`` (whoever asks takes it apart)."""
    settings = model.config.to_dict() if hasattr(model.config, "to_dict") else {}  # a plain model may have none
    config = {k: v for k, v in settings.items() if not k.startswith("_") and k != "transformers_version"}
    return {
        "source": source,
        "adapter": model.adapter.name,
        "architecture": type(model.hf).__name__,
        "parameters": int(sum(p.numel() for p in model.hf.parameters())),
        "config_sha256": sha256_bytes(canonical_json(config)),
    } | ({"weights": weights_fingerprint(model)} if weights else {})


__all__ = ["describe", "differences", "environment", "model_identity", "normalize", "prompts_sha256"]
