"""Dataset generators adapt to the tokenizer: single-token names and answers, equal-length pairs."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from anylens import PromptError
from anylens.datasets import FACTS, IOI_TEMPLATES, NAMES, factual_pairs, ioi_pairs
from anylens.datasets.ioi import OBJECTS, PLACES


def word_tokenizer(words: set[str]) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<pad>": 1}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def words_of(*texts: str) -> set[str]:
    return {w for text in texts for w in re.findall(r"\w+|[^\w\s]+", text)}


ALL_IOI_WORDS = words_of(*IOI_TEMPLATES, *NAMES, *PLACES, *OBJECTS)


@pytest.mark.parametrize("corruption", ["swap_subject", "random_names"])
def test_ioi_pairs_are_aligned_and_answer_flips(corruption):
    # Leave three names out of the vocabulary: they must never be used.
    tok = word_tokenizer(ALL_IOI_WORDS - {"Mary", "John", "Alice"})
    pairs = ioi_pairs(tok, 40, corruption=corruption, seed=3)
    assert len(pairs) == 40
    assert [p.order for p in pairs[:4]] == ["ABBA", "BABA", "ABBA", "BABA"]
    for p in pairs:
        clean, corrupt = tok(p.clean)["input_ids"], tok(p.corrupt)["input_ids"]
        assert len(clean) == len(corrupt)
        assert tok.unk_token_id not in clean + corrupt
        io, s = p.answer.strip(), p.distractor.strip()
        assert io != s and {io, s} & {"Mary", "John", "Alice"} == set()
        # the clean prompt mentions IO once and S twice; its last name is the subject
        assert p.clean.count(io) == 1 and p.clean.count(s) == 2
        if corruption == "swap_subject":
            assert p.corrupt_answer == p.distractor and p.corrupt.count(io) == 2
        else:
            assert io not in p.corrupt and s not in p.corrupt


def test_ioi_refuses_templates_the_tokenizer_cannot_express():
    tok = word_tokenizer(set(NAMES) | {"When", "and"})
    with pytest.raises(PromptError, match="templates"):
        ioi_pairs(tok, 5)


def test_ioi_needs_single_token_names():
    tok = word_tokenizer(ALL_IOI_WORDS - set(NAMES))
    with pytest.raises(PromptError, match="single tokens"):
        ioi_pairs(tok, 5)


def test_factual_pairs_have_single_token_answers_and_equal_length_counterfactuals():
    words = words_of(
        *[
            t.format(country=c, landmark=lm)
            for ts in (
                {
                    "The capital of {country} is",
                    "The capital city of {country} is",
                    "The {landmark} is in",
                    "You can visit the {landmark} in",
                },
            )
            for t in ts
            for c, _, lm in FACTS
        ]
    )
    words |= {city for _, city, _ in FACTS} - {"Paris"}  # Paris unknown: France must be skipped
    tok = word_tokenizer(words)
    pairs = factual_pairs(tok, minimum=50)
    assert len(pairs) >= 50
    assert all(p.answer != " Paris" and p.corrupt_answer != " Paris" for p in pairs)
    for p in pairs:
        assert len(tok(p.clean)["input_ids"]) == len(tok(p.corrupt)["input_ids"])
        assert p.answer != p.corrupt_answer
        assert len(tok(p.answer, add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(PromptError, match="wanted 1000"):
        factual_pairs(tok, minimum=1000)
