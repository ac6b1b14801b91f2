"""Prompt pairs that name their positions: ``al.pair`` reads names marked in the prompts' text.

``al.pair(model, "When [IO:Mary] and [S1:John] went to the store, [S2:John] gave a drink to",
"When [IO:Mary] and [S1:John] went to the store, [S2:Mary] gave a drink to")`` is the pair of
the unmarked texts with ``positions = {"IO": (1, 1), "S1": (3, 3), "S2": (9, 9)}``: each name is
the position of the *last* token of the words marked with it, in the clean and in the corrupt
prompt as the model tokenizes them. ``positions=["S2", "END"]`` then patches those positions of
each pair, whatever its length; ``END``, the last token, is defined for every prompt. Dataset
pairs (:func:`anylens.datasets.ioi_pairs`, :func:`~anylens.datasets.factual_pairs`) carry
``positions`` of the same form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.errors import PositionNameError
from ..core.token_spans import token_offsets, token_span
from .pair_positions import END

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: ``[NAME:words]``: a name (a letter or underscore, then letters, digits, ``_``, ``+``, ``-``) and
#: the words it names. Other brackets are text.
MARK = re.compile(r"\[([A-Za-z_][\w+\-]*):([^\[\]]+)\]")
#: What is left of a mark that is not closed or names no words: almost surely a typing slip.
BROKEN_MARK = re.compile(r"\[[A-Za-z_][\w+\-]*:")


@dataclass(frozen=True)
class Pair:
    """A clean and a corrupt prompt, the words a metric by name is built from, and named positions
    (name -> (clean position, corrupt position))."""

    clean: str
    corrupt: str
    answer: str | None = None
    distractor: str | None = None
    positions: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)


def unmark(text: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """The text without its ``[NAME:words]`` marks, and each name's character span in it."""
    pieces: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    length = last = 0
    for match in MARK.finditer(text):
        literal, (name, words) = text[last : match.start()], match.groups()
        if name in spans:
            raise PositionNameError(f"the name {name!r} is marked twice in {text!r}: mark each name once")
        if name == END:
            raise PositionNameError(
                f"{text!r} marks {END!r}, which every prompt defines as its last token: use another name"
            )
        start = length + len(literal)
        spans[name] = (start, start + len(words))
        pieces += [literal, words]
        length, last = start + len(words), match.end()
    pieces.append(text[last:])
    for literal in pieces[::2]:  # the text between marks
        broken = BROKEN_MARK.search(literal)
        if broken:
            raise PositionNameError(
                f"{text!r} has {literal[broken.start() :][:20]!r}, a mark that is not closed or names no words: "
                "write [NAME:words], e.g. 'When [IO:Mary] and John'"
            )
    return "".join(pieces), spans


def token_positions(model: AnyModel, text: str, spans: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Each name's position: the last token covering its characters in ``text``."""
    if not spans:
        return {}
    model.require_tokenizer(text)
    offsets = token_offsets(model.tokenizer, text)
    if offsets is None:
        raise PositionNameError(
            f"{model.name!r} has a tokenizer that does not report where its tokens lie in the text, so the words "
            f"marked in {text!r} cannot be found among its tokens: give Pair(clean, corrupt, positions={{...}}) "
            "with the positions counted by hand"
        )
    found = {}
    for name, (start, end) in spans.items():
        covering = token_span(offsets, start, end)
        if covering is None:
            raise PositionNameError(f"the words marked {name!r} in {text!r} cover no token: mark words with text")
        found[name] = covering[1]
    return found


def pair(
    model: AnyModel, clean: str, corrupt: str, *, answer: str | None = None, distractor: str | None = None
) -> Pair:
    """A :class:`Pair` whose positions are named by ``[NAME:words]`` marks in ``clean`` and
    ``corrupt`` (the same names in both); each name is the last token of its words."""
    clean_text, clean_spans = unmark(clean)
    corrupt_text, corrupt_spans = unmark(corrupt)
    if set(clean_spans) != set(corrupt_spans):
        raise PositionNameError(
            f"the clean prompt marks {sorted(clean_spans)} and the corrupt prompt {sorted(corrupt_spans)}: "
            "mark the same names in both, e.g. '[S2:John] gave' and '[S2:Mary] gave'"
        )
    clean_at = token_positions(model, clean_text, clean_spans)
    corrupt_at = token_positions(model, corrupt_text, corrupt_spans)
    positions = {name: (clean_at[name], corrupt_at[name]) for name in clean_spans}
    return Pair(clean_text, corrupt_text, answer, distractor, positions)


__all__ = ["MARK", "Pair", "pair", "unmark"]
