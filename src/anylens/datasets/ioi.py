"""Indirect object identification (IOI) prompts with the standard corruptions.

"When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect object,
IO), not " John" (the subject, S). Corruptions:

* ``"swap_subject"``: the second mention of the subject becomes the IO ("..., Mary gave a drink
  to"), so the answer flips to John;
* ``"random_names"``: all three mentions are replaced by names unrelated to the clean prompt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.errors import PromptError
from ._tokens import format_with_spans, has_unknown, is_single_token, n_tokens, named_positions

#: Prompts end right before the final name. {a} and {b} are the first mentions, {s} the repeat.
IOI_TEMPLATES: tuple[str, ...] = (
    "When {a} and {b} went to the {place}, {s} gave a {obj} to",
    "After {a} and {b} went to the {place}, {s} gave a {obj} to",
    "While {a} and {b} were working at the {place}, {s} gave a {obj} to",
    "Then, {a} and {b} went to the {place}. {s} gave a {obj} to",
    "After {a} and {b} were working at the {place}, {s} handed a {obj} to",
    "Then, {a} and {b} got a {obj} at the {place}. {s} decided to give it to",
)

NAMES: tuple[str, ...] = (
    "Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David", "Laura", "Michael",
    "Anna", "Tom", "Kate", "Peter", "Lisa", "Paul", "Julia", "Mark", "Rose", "Daniel",
    "Sophie", "Chris", "Helen", "Mike", "Grace", "Adam", "Nina", "Sam", "Olivia", "Ben",
    "Clara", "Jack", "Eva", "Luke", "Amy", "Ryan", "Zoe", "Henry", "Lucy", "Oscar",
)  # fmt: skip
PLACES: tuple[str, ...] = ("store", "park", "school", "garden", "market", "office", "station", "library")
OBJECTS: tuple[str, ...] = ("drink", "book", "ball", "letter", "ring", "cake", "key", "gift")

CORRUPTIONS = ("swap_subject", "random_names")


@dataclass(frozen=True)
class IOIPair:
    clean: str
    corrupt: str
    answer: str  # the indirect object, with its leading space
    distractor: str  # the subject, with its leading space
    corrupt_answer: str
    order: str  # "ABBA" (IO first) or "BABA"
    template: int
    #: name -> (clean position, corrupt position): ``IO``, ``S1``, ``S1+1``, ``S2`` (``END``, the last
    #: token, is defined for every prompt). In the corrupt prompt a name is its slot of the template,
    #: whichever name fills it.
    positions: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)


def ioi_pairs(
    tokenizer: Any,
    n: int = 50,
    *,
    corruption: str = "swap_subject",
    seed: int = 0,
    templates: Sequence[str] = IOI_TEMPLATES,
    names: Sequence[str] = NAMES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
) -> list[IOIPair]:
    """``n`` clean/corrupt IOI pairs, alternating ABBA and BABA, valid for ``tokenizer``."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; choose one of {CORRUPTIONS}")
    usable = [name for name in names if is_single_token(tokenizer, " " + name)]
    if len(usable) < 5:
        raise PromptError(
            f"only {len(usable)} of {len(names)} names are single tokens for this tokenizer "
            f"({usable}); pass names=... that are (with a leading space)"
        )
    rng = random.Random(seed)
    pairs: list[IOIPair] = []
    attempts = 0
    while len(pairs) < n:
        attempts += 1
        if attempts > 50 * n:
            raise PromptError(
                f"could build only {len(pairs)} of {n} IOI pairs: the templates contain words this tokenizer "
                "does not know, or clean and corrupt prompts tokenize to different lengths; pass templates=..."
            )
        index = len(pairs) % len(templates) if attempts <= n else rng.randrange(len(templates))
        pair = _pair(rng, templates[index], index, usable, places, objects, corruption, len(pairs) % 2 == 0)
        if has_unknown(tokenizer, pair.clean) or has_unknown(tokenizer, pair.corrupt):
            continue
        if n_tokens(tokenizer, pair.clean) != n_tokens(tokenizer, pair.corrupt):
            continue
        pairs.append(replace(pair, positions=_positions(tokenizer, templates[index], pair)))
    return pairs


def _positions(tokenizer: Any, template: str, pair: IOIPair) -> dict[str, tuple[int, int]]:
    """The named positions of both prompts: the last token of each name's slot in the template
    ({} where the tokenizer cannot tell where its tokens lie)."""
    io, s1 = ("a", "b") if pair.order == "ABBA" else ("b", "a")
    names = {"IO": io, "S1": s1, "S2": "s"}
    sides = []
    for text in (pair.clean, pair.corrupt):
        filled, spans = format_with_spans(template, **_slot_words(template, text))
        found = named_positions(tokenizer, filled, {name: spans[slot][0] for name, slot in names.items()})
        if filled != text or len(found) < len(names):
            return {}
        sides.append({name: last for name, (_, last) in found.items()})
        sides[-1]["S1+1"] = sides[-1]["S1"] + 1
    return {name: (sides[0][name], sides[1][name]) for name in ("IO", "S1", "S1+1", "S2")}


def _slot_words(template: str, text: str) -> dict[str, str]:
    """The word in each slot of ``template`` as ``text`` fills it (slots are one word each)."""
    template_words, words = template.split(), text.split()
    values = {}
    for slot, word in zip(template_words, words):
        if "{" in slot:
            key = slot[slot.index("{") + 1 : slot.index("}")]
            prefix, suffix = slot[: slot.index("{")], slot[slot.index("}") + 1 :]
            values[key] = word[len(prefix) : len(word) - len(suffix)]
    return values


def _pair(rng, template, index, names, places, objects, corruption, abba) -> IOIPair:
    io, s, x, y, z = rng.sample(list(names), 5)
    place, obj = rng.choice(list(places)), rng.choice(list(objects))
    a, b = (io, s) if abba else (s, io)

    def fill(a_: str, b_: str, s_: str) -> str:
        return template.format(a=a_, b=b_, s=s_, place=place, obj=obj)

    clean = fill(a, b, s)
    if corruption == "swap_subject":
        corrupt, corrupt_answer = fill(a, b, io), s
    else:
        ax, bx = (x, y) if abba else (y, x)
        corrupt, corrupt_answer = fill(ax, bx, z), x
    return IOIPair(clean, corrupt, " " + io, " " + s, " " + corrupt_answer, "ABBA" if abba else "BABA", index)
