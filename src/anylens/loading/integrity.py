"""Telling a damaged weights file (a truncated download, a cut copy) from other load failures.

Consulted only after ``from_pretrained`` has failed, so a good load pays nothing for it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..core.errors import DamagedFileError


def safetensors_damage(path: Path) -> str | None:
    """Why a ``.safetensors`` file is unreadable (None when its header and size agree)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"it is {size} bytes, shorter than its header"
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            return f"its header needs {8 + header_len} bytes but the file has {size}"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            return "its header is not valid JSON"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + header_len + max(ends, default=0)
    return f"its tensors need {needed} bytes but the file has {size}" if needed > size else None


def gguf_damage(path: Path) -> str | None:
    """Why a ``.gguf`` file is unreadable (None when the gguf reader accepts it, or is missing)."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            return "it does not start with the GGUF magic bytes"
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        GGUFReader(path)
    except Exception as error:  # the reader fails in many ways on a cut file
        return f"the GGUF reader cannot read it ({type(error).__name__}: {error})"
    return None


def find_damage(directory: Path, gguf_file: str | None = None) -> DamagedFileError | None:
    """The error for the first damaged weights file of a model directory (or its GGUF file)."""
    if gguf_file is not None:
        checks = [(directory / gguf_file, gguf_damage)]
    else:
        checks = [(path, safetensors_damage) for path in sorted(directory.glob("*.safetensors"))]
    for path, check in checks:
        problem = check(path)
        if problem:
            return DamagedFileError(
                f"{path} is damaged: {problem} (a truncated download or an interrupted copy?); "
                "download or save the model again"
            )
    return None
