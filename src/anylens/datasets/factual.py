"""Factual recall prompts with single-token answers and equal-length counterfactuals.

"The capital of France is" -> " Paris"; its counterfactual is the same template with another
subject of the same token length ("The capital of Italy is" -> " Rome").
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import PromptError
from ._tokens import format_with_spans, has_unknown, is_single_token, n_tokens, named_positions

#: (country, capital, a landmark in the capital)
FACTS: tuple[tuple[str, str, str], ...] = (
    ("France", "Paris", "Eiffel Tower"), ("Italy", "Rome", "Colosseum"), ("England", "London", "Tower Bridge"),
    ("Germany", "Berlin", "Brandenburg Gate"), ("Greece", "Athens", "Acropolis"), ("Russia", "Moscow", "Kremlin"),
    ("China", "Beijing", "Forbidden City"), ("Spain", "Madrid", "Prado Museum"), ("Japan", "Tokyo", "Meiji Shrine"),
    ("Egypt", "Cairo", "Azhar Mosque"), ("India", "Delhi", "Red Fort"), ("Turkey", "Ankara", "Anitkabir"),
    ("Austria", "Vienna", "Hofburg Palace"), ("Hungary", "Budapest", "Buda Castle"),
    ("Czechia", "Prague", "Charles Bridge"), ("Netherlands", "Amsterdam", "Rijksmuseum"),
    ("Belgium", "Brussels", "Atomium"), ("Denmark", "Copenhagen", "Tivoli Gardens"),
    ("Sweden", "Stockholm", "Vasa Museum"), ("Norway", "Oslo", "Akershus Fortress"),
    ("Finland", "Helsinki", "Suomenlinna"), ("Poland", "Warsaw", "Wilanow Palace"),
    ("Portugal", "Lisbon", "Belem Tower"), ("Ireland", "Dublin", "Trinity College"),
    ("America", "Washington", "White House"), ("Canada", "Ottawa", "Parliament Hill"),
    ("Peru", "Lima", "Larco Museum"), ("Brazil", "Brasilia", "Alvorada Palace"), ("Chile", "Santiago", "Moneda Palace"),
    ("Colombia", "Bogota", "Gold Museum"), ("Cuba", "Havana", "Morro Castle"), ("Kenya", "Nairobi", "Karura Forest"),
    ("Morocco", "Rabat", "Hassan Tower"), ("Thailand", "Bangkok", "Grand Palace"),
    ("Vietnam", "Hanoi", "Temple of Literature"), ("Indonesia", "Jakarta", "Istiqlal Mosque"),
    ("Korea", "Seoul", "Gyeongbok Palace"), ("Australia", "Canberra", "Telstra Tower"),
    ("Iran", "Tehran", "Azadi Tower"), ("Switzerland", "Bern", "Zytglogge"),
)  # fmt: skip

#: Templates per relation; the prompt ends right before the answer.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": ("The capital of {country} is", "The capital city of {country} is"),
    "landmark": ("The {landmark} is in", "You can visit the {landmark} in"),
}


#: Per relation, the words that state it in the templates (the first one a prompt holds outside
#: its subject is its ``relation`` position).
RELATION_WORDS: dict[str, tuple[str, ...]] = {"capital": ("capital",), "landmark": ("visit", "is")}


@dataclass(frozen=True)
class FactPair:
    clean: str
    answer: str  # with its leading space
    corrupt: str
    corrupt_answer: str
    relation: str
    subject: str
    #: name -> (clean position, corrupt position): ``subject_first`` and ``subject_last`` (the
    #: subject's first and last tokens) and ``relation`` (the last token of the relation's word;
    #: see :data:`RELATION_WORDS`); ``END``, the last token, is defined for every prompt.
    positions: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)


def factual_pairs(
    tokenizer: Any,
    *,
    relations: Sequence[str] = ("capital", "landmark"),
    templates: dict[str, Sequence[str]] | None = None,
    facts: Sequence[tuple[str, str, str]] = FACTS,
    seed: int = 0,
    minimum: int = 0,
) -> list[FactPair]:
    """Every fact in every template whose answer is one token, paired with a counterfactual
    (another fact, same template, same token length, different answer)."""
    templates = templates or TEMPLATES
    rng = random.Random(seed)
    pairs: list[FactPair] = []
    for relation in relations:
        for template in templates[relation]:
            prompts = []
            for country, city, landmark in facts:
                prompt = template.format(country=country, landmark=landmark)
                if is_single_token(tokenizer, " " + city) and not has_unknown(tokenizer, prompt):
                    subject = country if relation == "capital" else landmark
                    names = _names(tokenizer, template, relation, country, landmark)
                    prompts.append((prompt, " " + city, subject, names))
            for prompt, answer, subject, names in prompts:
                length = n_tokens(tokenizer, prompt)
                options = [p for p in prompts if p[1] != answer and n_tokens(tokenizer, p[0]) == length]
                if options:
                    other = rng.choice(options)
                    both = {name: (names[name], other[3][name]) for name in names if name in other[3]}
                    pairs.append(FactPair(prompt, answer, other[0], other[1], relation, subject, both))
    if len(pairs) < minimum:
        raise PromptError(
            f"only {len(pairs)} factual pairs have single-token answers and equal-length counterfactuals for this "
            f"tokenizer (wanted {minimum}); pass facts=... or templates=..."
        )
    return pairs


def _names(tokenizer: Any, template: str, relation: str, country: str, landmark: str) -> dict[str, int]:
    """``subject_first``, ``subject_last`` and ``relation`` of one prompt, as token positions."""
    text, spans = format_with_spans(template, country=country, landmark=landmark)
    subject = spans.get("country" if relation == "capital" else "landmark")
    if not subject:
        return {}
    start, end = subject[0]
    wanted = {"subject": (start, end)}
    for word in RELATION_WORDS.get(relation, ()):
        found = [m.span() for m in re.finditer(rf"\b{re.escape(word)}\b", text) if not start <= m.start() < end]
        if found:
            wanted["relation"] = found[0]
            break
    tokens = named_positions(tokenizer, text, wanted)
    names = {}
    if "subject" in tokens:
        names["subject_first"], names["subject_last"] = tokens["subject"]
    if "relation" in tokens:
        names["relation"] = tokens["relation"][1]
    return names
