"""Tokenizer checks shared by the dataset generators."""

from __future__ import annotations

import string
from typing import Any

from ..core.token_spans import token_offsets, token_span


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


def format_with_spans(template: str, **values: str) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """``template.format(**values)`` and, per field, the character spans where its value landed."""
    pieces: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    length = 0
    for literal, field, _spec, _conversion in string.Formatter().parse(template):
        pieces.append(literal)
        length += len(literal)
        if field is not None:
            value = str(values[field])
            spans.setdefault(field, []).append((length, length + len(value)))
            pieces.append(value)
            length += len(value)
    return "".join(pieces), spans


def named_positions(tokenizer: Any, text: str, spans: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """Each name's (first, last) token covering its character span of ``text``; {} for a tokenizer
    that does not report where its tokens lie, and names whose span covers no token left out."""
    offsets = token_offsets(tokenizer, text)
    if offsets is None:
        return {}
    found = {name: token_span(offsets, start, end) for name, (start, end) in spans.items()}
    return {name: span for name, span in found.items() if span is not None}
