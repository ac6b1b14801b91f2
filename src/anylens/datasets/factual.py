"""Factual recall prompts with single-token answers and equal-length counterfactuals.

"The capital of France is" -> " Paris"; its counterfactual is the same template with another
subject of the same token length ("The capital of Italy is" -> " Rome").
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.errors import PromptError
from ._tokens import has_unknown, is_single_token, n_tokens

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


@dataclass(frozen=True)
class FactPair:
    clean: str
    answer: str  # with its leading space
    corrupt: str
    corrupt_answer: str
    relation: str
    subject: str


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
                    prompts.append((prompt, " " + city, subject))
            for prompt, answer, subject in prompts:
                length = n_tokens(tokenizer, prompt)
                options = [p for p in prompts if p[1] != answer and n_tokens(tokenizer, p[0]) == length]
                if options:
                    other = rng.choice(options)
                    pairs.append(FactPair(prompt, answer, other[0], other[1], relation, subject))
    if len(pairs) < minimum:
        raise PromptError(
            f"only {len(pairs)} factual pairs have single-token answers and equal-length counterfactuals for this "
            f"tokenizer (wanted {minimum}); pass facts=... or templates=..."
        )
    return pairs
