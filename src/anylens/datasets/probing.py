"""Factual prompts labelled for probing: the subject, its country and capital, and where the
subject ends among the prompt's tokens.

"The capital of France is" has country "France", capital "Paris", and the subject "France"
ending at its token index 4 (counting a BOS token where the tokenizer adds one); "The Eiffel
Tower is in" has subject "Eiffel Tower", country "France", capital "Paris". Probing the country
at ``subject_end`` and the capital at the last token asks where each is linearly readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._tokens import has_unknown
from .factual import FACTS, TEMPLATES


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    relation: str  # "capital" (the subject is the country) or "landmark"
    subject: str
    country: str
    capital: str
    subject_end: int  # token index of the subject's last token in the tokenized prompt


def labelled_prompts(
    tokenizer: Any,
    *,
    relations: Sequence[str] = ("capital", "landmark"),
    templates: dict[str, Sequence[str]] | None = None,
    facts: Sequence[tuple[str, str, str]] = FACTS,
) -> list[LabelledPrompt]:
    """Every fact in every template of ``relations`` that the tokenizer reads without unknown
    tokens and whose subject ends on a token boundary (the prompt's tokens up to the subject are
    the tokens of the text up to the subject)."""
    templates = templates or TEMPLATES
    prompts = []
    for relation in relations:
        for template in templates[relation]:
            for country, capital, landmark in facts:
                subject = country if relation == "capital" else landmark
                text = template.format(country=country, landmark=landmark)
                if has_unknown(tokenizer, text):
                    continue
                end = text.index(subject) + len(subject)
                ids, prefix = tokenizer(text)["input_ids"], tokenizer(text[:end])["input_ids"]
                if list(ids[: len(prefix)]) != list(prefix):
                    continue
                prompts.append(LabelledPrompt(text, relation, subject, country, capital, len(prefix) - 1))
    return prompts


__all__ = ["LabelledPrompt", "labelled_prompts"]
