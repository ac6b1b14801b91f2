"""Which positions of a clean and a corrupt prompt correspond, when their tokens do not line up.

``align="auto"`` pairs positions by one rule, shown by :func:`show_alignment`:

* prompts of the same token length whose differing tokens are whole words on both sides pair
  every position with itself (IOI name swaps, ``" France"`` -> ``" Italy"``);
* otherwise the common prefix pairs position by position from the start, the common suffix from
  the end, and the differing spans between them pair only their last tokens (``" Tower"`` of
  ``" E|iffel| Tower"`` with ``"remlin"`` of ``" K|remlin"``); the other positions of the spans
  have no counterpart and are not patched.

Same-length prompts whose sub-word splits shift positions (``" E|iffel| Tower"`` against
``" Col|osse|um"``) are patched position by position only with a :class:`MisalignmentWarning`
naming the positions that no longer correspond.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..core.errors import PromptError
from ..core.token_spans import token_offsets

if TYPE_CHECKING:
    from ..core.model import AnyModel

AUTO = "auto"


def word_of_tokens(model: AnyModel, text: str | None, ids: Sequence[int]) -> list[int] | None:
    """For each token, the index of the whitespace-separated word its last character lies in (a
    token of whitespace only: the word after it; a special token: -1); None where that cannot be
    told (token ids given, a slow tokenizer)."""
    if text is None or model.tokenizer is None:
        return None
    offsets = token_offsets(model.tokenizer, text)
    if offsets is None or len(offsets) != len(ids):
        return None
    starts = [match.start() for match in re.finditer(r"\S+", text)]

    def word(start: int, end: int) -> int:
        if end <= start:
            return -1
        if not text[start:end].strip():
            return bisect.bisect_left(starts, end)
        return bisect.bisect_right(starts, end - 1) - 1

    return [word(s, e) for s, e in offsets]


def _runs(positions: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive positions."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def shifted_positions(
    clean: Sequence[int], corrupt: Sequence[int], clean_words: list[int] | None, corrupt_words: list[int] | None
) -> list[int]:
    """Positions of same-length prompts that no longer correspond: in each run of differing
    tokens that covers fewer words than tokens on either side (a sub-word split), every position
    but the run's last."""
    differ = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
    if clean_words is None or corrupt_words is None:
        return []  # no text to find words in: every token counts as a word
    shifted = []
    for run in _runs(differ):
        words = min(len({clean_words[i] for i in run}), len({corrupt_words[i] for i in run}))
        if words < len(run):
            shifted.extend(run[:-1])
    return shifted


@dataclass(frozen=True)
class Alignment:
    """Paired positions (clean, corrupt) and how each pair was found."""

    clean: list[int]
    corrupt: list[int]
    kinds: list[str]  # "same", "prefix", "suffix" or "span end"


def auto_align(
    clean: Sequence[int],
    corrupt: Sequence[int],
    clean_words: list[int] | None = None,
    corrupt_words: list[int] | None = None,
) -> Alignment:
    """The ``align="auto"`` pairing of two token sequences (see the module's rule)."""
    clean, corrupt = list(clean), list(corrupt)
    n, m = len(clean), len(corrupt)
    if n == m and not shifted_positions(clean, corrupt, clean_words, corrupt_words):
        return Alignment(list(range(n)), list(range(n)), ["same"] * n)
    prefix = 0
    while prefix < min(n, m) and clean[prefix] == corrupt[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(n, m) - prefix and clean[n - 1 - suffix] == corrupt[m - 1 - suffix]:
        suffix += 1
    pairs = [(i, i, "prefix") for i in range(prefix)]
    if n - suffix > prefix and m - suffix > prefix:  # both spans have tokens: their last ones pair up
        pairs.append((n - suffix - 1, m - suffix - 1, "span end"))
    pairs += [(n - suffix + j, m - suffix + j, "suffix") for j in range(suffix)]
    return Alignment([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs])


def misalignment_message(
    model: AnyModel,
    clean_text: Any,
    corrupt_text: Any,
    clean: Sequence[int],
    corrupt: Sequence[int],
    shifted: list[int],
) -> str:
    clean_tokens = [model.decode([clean[i]]) for i in shifted]
    corrupt_tokens = [model.decode([corrupt[i]]) for i in shifted]
    return (
        f"clean {clean_text!r} and corrupt {corrupt_text!r} have the same number of tokens, but sub-word splits "
        f"shift their positions: position(s) {', '.join(map(str, shifted))} no longer correspond (clean "
        f"{clean_tokens} vs corrupt {corrupt_tokens}) and are patched position by position; pass align='auto' "
        "to patch only positions that correspond, or name the positions (positions=['END', ...])"
    )


def show_alignment(model: AnyModel, clean: Any, corrupt: Any, *, align: Any = AUTO) -> pd.DataFrame:
    """How ``align`` (by default ``"auto"``) pairs the positions of one clean and one corrupt prompt.

    One row per position of either prompt: ``clean_pos``, ``clean_token``, ``corrupt_pos``,
    ``corrupt_token`` and ``match`` (``same``, ``prefix``, ``suffix``, ``span end``, ``given``
    for an explicit alignment, or ``unpaired``: a position patching leaves alone).
    """
    from .pair_positions import pair_alignment, pair_items, pair_tokens

    items = pair_items(clean, corrupt)
    if len(items) != 1:
        raise PromptError(
            f"show_alignment shows one prompt pair, not {len(items)}: pass one clean and one corrupt prompt"
        )
    tokens = pair_tokens(model, *items[0])
    alignment = pair_alignment(model, tokens, align)
    paired_clean = dict(zip(alignment.clean, zip(alignment.corrupt, alignment.kinds)))
    paired_corrupt = set(alignment.corrupt)
    clean_tokens = [model.decode([i]) for i in tokens.clean]
    corrupt_tokens = [model.decode([i]) for i in tokens.corrupt]
    rows: list[tuple[Any, str, Any, str, str]] = []
    corrupt_next = 0

    def unpaired_corrupt_up_to(stop: int) -> None:
        nonlocal corrupt_next
        for k in range(corrupt_next, stop):
            if k not in paired_corrupt:
                rows.append((pd.NA, "", k, corrupt_tokens[k], "unpaired"))
        corrupt_next = max(corrupt_next, stop)

    for c, text in enumerate(clean_tokens):
        if c in paired_clean:
            k, kind = paired_clean[c]
            unpaired_corrupt_up_to(k)
            rows.append((c, text, k, corrupt_tokens[k], kind))
            corrupt_next = max(corrupt_next, k + 1)
        else:
            rows.append((c, text, pd.NA, "", "unpaired"))
    unpaired_corrupt_up_to(len(corrupt_tokens))
    frame = pd.DataFrame(rows, columns=["clean_pos", "clean_token", "corrupt_pos", "corrupt_token", "match"])
    return frame.astype({"clean_pos": "Int64", "corrupt_pos": "Int64"})


__all__ = ["AUTO", "Alignment", "auto_align", "shifted_positions", "show_alignment", "word_of_tokens"]
