"""Tokenizer checks shared by the dataset generators."""

from __future__ import annotations

from typing import Any


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def is_single_token(tokenizer: Any, word: str) -> bool:
    """True when ``word`` (e.g. ``" Mary"``) is exactly one known token."""
    ids = token_ids(tokenizer, word)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def has_unknown(tokenizer: Any, text: str) -> bool:
    unk = tokenizer.unk_token_id
    return unk is not None and unk in token_ids(tokenizer, text)


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])
