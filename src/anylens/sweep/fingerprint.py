"""A fingerprint of a model's weights, so that a sweep can tell whether the model it resumes with is
the one its finished chunks were computed with.

The architecture, size and config of a model say nothing about its weights: a local directory
retrained or fine-tuned in place loads as the same model. Up to :data:`FULL_HASH_BYTES` of
weights (every zoo and test model, models of a few hundred million parameters in float32) the
fingerprint is the sha256 of every tensor of the state dict: name, dtype, shape and bytes. Past
that, hashing every byte would cost seconds per load, so each tensor contributes its name, dtype,
shape and :data:`SAMPLES_PER_TENSOR` elements at evenly spaced flat positions: any retraining,
fine-tune or replaced file changes them, but an edit confined to elements between the samples
(one row of one matrix, say) goes unnoticed. The fingerprint records which of the two it is.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: Weights up to this size are hashed whole.
FULL_HASH_BYTES = 1 << 30
#: Elements per tensor hashed in a sampled fingerprint.
SAMPLES_PER_TENSOR = 4096


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    # Viewed as bytes, any dtype (bfloat16 included, which numpy lacks) hashes as stored; hashed
    # in place, since a copy of every weight costs as long as hashing it.
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).cpu().numpy())


def weights_fingerprint(model: AnyModel, full_hash_bytes: int = FULL_HASH_BYTES) -> dict[str, Any]:
    """``{"method": "sha256" | "sampled-sha256", "sha256": ..., "bytes": ...}`` of the model's
    state dict (parameters and persistent buffers), tensors in name order."""
    state = model.hf.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    whole = total <= full_hash_bytes
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if whole or tensor.numel() <= SAMPLES_PER_TENSOR:
            digest.update(_raw_bytes(tensor))
        else:
            flat = tensor.detach().reshape(-1)
            positions = torch.linspace(0, flat.numel() - 1, SAMPLES_PER_TENSOR, dtype=torch.float64).long()
            digest.update(_raw_bytes(flat[positions.to(flat.device)]))
    fingerprint: dict[str, Any] = {
        "method": "sha256" if whole else "sampled-sha256",
        "sha256": digest.hexdigest(),
        "bytes": int(total),
    }
    if not whole:
        fingerprint["samples_per_tensor"] = SAMPLES_PER_TENSOR
    return fingerprint


__all__ = ["FULL_HASH_BYTES", "SAMPLES_PER_TENSOR", "weights_fingerprint"]
