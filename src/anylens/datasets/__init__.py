"""Prompt datasets for circuit experiments, adapted to a given tokenizer.

Every generator keeps only what the tokenizer can express faithfully: names and answers that are
one token (with their leading space), prompts without unknown tokens, and clean/corrupt pairs of
equal token length, so that positions line up in patching experiments.
"""

from .factual import FACTS, FactPair, factual_pairs
from .ioi import IOI_TEMPLATES, NAMES, IOIPair, ioi_pairs
from .probing import LabelledPrompt, labelled_prompts

__all__ = [
    "FACTS",
    "IOI_TEMPLATES",
    "NAMES",
    "FactPair",
    "IOIPair",
    "LabelledPrompt",
    "factual_pairs",
    "ioi_pairs",
    "labelled_prompts",
]
