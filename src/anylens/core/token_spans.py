"""Where a tokenizer's tokens lie in the text: how marked words and dataset slots become positions."""

from __future__ import annotations

from typing import Any


def token_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]] | None:
    """Each token's character span in ``text`` (special tokens span nothing), as the experiments
    tokenize it; None for a tokenizer that cannot tell (a slow tokenizer)."""
    try:
        encoded = tokenizer(text, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    offsets = encoded.get("offset_mapping")
    return None if offsets is None else [(int(s), int(e)) for s, e in offsets]


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The first and last token covering the characters ``start..end-1``, or None if none does."""
    covering = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    return (covering[0], covering[-1]) if covering else None


__all__ = ["token_offsets", "token_span"]
