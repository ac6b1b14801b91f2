"""The zoo: tiny trained causal LMs with known mechanisms, shipped as package data.

Each model (trained by `anylens.zoo.train`) lives in `models/<name>/` with its tokenizer, a model card and
held-out metrics, and loads offline with `AutoModelForCausalLM.from_pretrained(model_dir(name))`.
"""

from __future__ import annotations

import pathlib

ZOO_MODELS = ("gpt2", "llama", "mistral", "mamba")


def model_dir(name: str) -> pathlib.Path:
    """Folder of the shipped zoo model `name` (config, weights, tokenizer, MODEL_CARD.md, metrics.json)."""
    if name not in ZOO_MODELS:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(ZOO_MODELS)}")
    return pathlib.Path(__file__).resolve().parent / "models" / name
