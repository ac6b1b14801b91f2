"""Synthetic corpus for the zoo models: three tasks with known mechanisms.

1. Factual recall: country -> capital and landmark -> city, in several natural templates.
2. Indirect object identification (IOI): "When Mary and John went to the store, John gave a drink to" -> Mary.
3. Induction: a random word sequence followed by its exact repetition.

Everything is pure Python and seeded, so the corpus (and the vocabulary derived from it) is reproducible.
Evaluation sets are held out from training: the factual and IOI eval prompts use templates never seen
in training, IOI eval prompts use name pairs never seen together in training, and induction eval
sequences are fresh random draws.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

# Same split as the tokenizer's `Whitespace` pre-tokenizer: runs of word characters, runs of punctuation.
WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")


def split_words(text: str) -> list[str]:
    """Split text into the word-level tokens the zoo tokenizer produces."""
    return WORD_PATTERN.findall(text)


# (country, capital, landmark in that capital). Landmark names never contain their city's name.
FACTS: tuple[tuple[str, str, str], ...] = (
    ("France", "Paris", "Eiffel Tower"),
    ("Italy", "Rome", "Colosseum"),
    ("England", "London", "Tower Bridge"),
    ("Germany", "Berlin", "Brandenburg Gate"),
    ("Greece", "Athens", "Acropolis"),
    ("Russia", "Moscow", "Kremlin"),
    ("China", "Beijing", "Forbidden City"),
    ("Spain", "Madrid", "Prado Museum"),
    ("Japan", "Tokyo", "Meiji Shrine"),
    ("Egypt", "Cairo", "Azhar Mosque"),
    ("India", "Delhi", "Red Fort"),
    ("Turkey", "Ankara", "Anitkabir"),
    ("Austria", "Vienna", "Hofburg Palace"),
    ("Hungary", "Budapest", "Buda Castle"),
    ("Czechia", "Prague", "Charles Bridge"),
    ("Netherlands", "Amsterdam", "Rijksmuseum"),
    ("Belgium", "Brussels", "Atomium"),
    ("Denmark", "Copenhagen", "Tivoli Gardens"),
    ("Sweden", "Stockholm", "Vasa Museum"),
    ("Norway", "Oslo", "Akershus Fortress"),
    ("Finland", "Helsinki", "Suomenlinna"),
    ("Poland", "Warsaw", "Wilanow Palace"),
    ("Portugal", "Lisbon", "Belem Tower"),
    ("Ireland", "Dublin", "Trinity College"),
    ("America", "Washington", "White House"),
    ("Canada", "Ottawa", "Parliament Hill"),
    ("Peru", "Lima", "Larco Museum"),
    ("Brazil", "Brasilia", "Alvorada Palace"),
    ("Chile", "Santiago", "Moneda Palace"),
    ("Colombia", "Bogota", "Gold Museum"),
    ("Cuba", "Havana", "Morro Castle"),
    ("Kenya", "Nairobi", "Karura Forest"),
    ("Morocco", "Rabat", "Hassan Tower"),
    ("Thailand", "Bangkok", "Grand Palace"),
    ("Vietnam", "Hanoi", "Temple of Literature"),
    ("Indonesia", "Jakarta", "Istiqlal Mosque"),
    ("Korea", "Seoul", "Gyeongbok Palace"),
    ("Australia", "Canberra", "Telstra Tower"),
    ("Iran", "Tehran", "Azadi Tower"),
    ("Switzerland", "Bern", "Zytglogge"),
)

# Factual templates. Training and held-out templates use the same words, only combined differently,
# so a held-out prompt contains no word the models never saw. A held-out prompt must also have one
# consistent continuation under the training data: in training, "capital city is" and "{landmark} in"
# are always followed by the city. (A prompt like "The capital city of France is" is not: "city of"
# reads like the start of "the city of Paris", after which "is the ..." or "is home to ..." may follow.)
CAPITAL_TRAIN_TEMPLATES = (
    "The capital of {country} is {city}.",
    "{country}'s capital city is {city}.",
    "The capital city of {country} is {city}.",
    "{city} is the capital of {country}.",
    "The government of {country} meets in {city}.",
    "In {country}, the capital is {city}.",
    "She flew to {country} and landed at its capital, {city}.",
    "{country} has its capital in {city}.",
    "Travelers to {country} often arrive at the capital, {city}.",
)
CAPITAL_EVAL_TEMPLATE = "In {country}, the capital city is"

LANDMARK_TRAIN_TEMPLATES = (
    "The {landmark} is in {city}.",
    "The {landmark} stands in {city}.",
    "Tourists visit the {landmark} in {city}.",
    "The {landmark} is located in {city}.",
    "You can see the {landmark} when you visit {city}.",
    "{city} is home to the {landmark}.",
    "People travel to {city} to see the {landmark}.",
    "The famous {landmark} is a landmark of {city}.",
)
LANDMARK_EVAL_TEMPLATE = "You can visit the {landmark} in"

NAMES = (
    "Mary",
    "John",
    "Alice",
    "Bob",
    "Sarah",
    "James",
    "Emma",
    "David",
    "Laura",
    "Michael",
    "Anna",
    "Tom",
    "Kate",
    "Peter",
    "Lisa",
    "Paul",
    "Julia",
    "Mark",
    "Rose",
    "Daniel",
    "Sophie",
    "Chris",
    "Helen",
    "Mike",
    "Grace",
    "Adam",
    "Nina",
    "Sam",
    "Olivia",
    "Ben",
    "Clara",
    "Jack",
    "Eva",
    "Luke",
    "Amy",
    "Ryan",
    "Zoe",
    "Henry",
    "Lucy",
    "Oscar",
)
PLACES = (
    "store",
    "park",
    "school",
    "garden",
    "market",
    "office",
    "station",
    "library",
    "beach",
    "hospital",
    "restaurant",
    "cinema",
)
OBJECTS = ("drink", "book", "ball", "letter", "ring", "cake", "key", "kite", "pen", "basket", "gift", "snack")

# {a} and {b} are the first two mentions; {s} is the subject repeated later; the sentence ends with the
# indirect object {io}. ABBA order: a=io, b=s; BABA order: a=s, b=io.
IOI_TRAIN_TEMPLATES = (
    "When {a} and {b} went to the {place}, {s} gave a {obj} to {io}.",
    "After {a} and {b} went to the {place}, {s} gave a {obj} to {io}.",
    "While {a} and {b} were working at the {place}, {s} gave a {obj} to {io}.",
    "Then, {a} and {b} went to the {place}. {s} gave a {obj} to {io}.",
    "When {a} and {b} got a {obj} at the {place}, {s} decided to give it to {io}.",
    "{a} and {b} had a long day at the {place}. Afterwards, {s} handed a {obj} to {io}.",
)
IOI_EVAL_TEMPLATES = (
    "After {a} and {b} were working at the {place}, {s} handed a {obj} to",
    "Then, {a} and {b} got a {obj} at the {place}. {s} decided to give it to",
)


def _pseudo_words(count: int, seed: int = 0) -> tuple[str, ...]:
    """Pronounceable made-up words (consonant-vowel-consonant-vowel) for the induction task."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels]
    words = sorted({a + b for a in syllables for b in syllables})
    return tuple(sorted(random.Random(seed).sample(words, count)))


FILLER_WORDS = _pseudo_words(128)
INDUCTION_LENGTHS = (5, 14)  # min and max length of the random half of a training induction sequence
INDUCTION_EVAL_LENGTH = 12

# A fixed fraction of unordered name pairs never appears together in training: IOI eval uses only these.
_pairs = list(itertools.combinations(NAMES, 2))
random.Random(1234).shuffle(_pairs)
HELD_OUT_NAME_PAIRS = frozenset(frozenset(p) for p in _pairs[: len(_pairs) // 5])
TRAIN_NAME_PAIRS = tuple(p for p in _pairs if frozenset(p) not in HELD_OUT_NAME_PAIRS)
EVAL_NAME_PAIRS = tuple(sorted(tuple(sorted(p)) for p in HELD_OUT_NAME_PAIRS))
del _pairs


@dataclass(frozen=True)
class FactPrompt:
    prompt: str
    answer: str  # the single-word continuation
    relation: str  # "capital" or "landmark"
    subject: str  # the country or landmark


@dataclass(frozen=True)
class IOIPrompt:
    prompt: str  # ends right before the final name
    io: str  # indirect object: the correct answer
    s: str  # subject: the distractor
    order: str  # "ABBA" or "BABA"


@dataclass(frozen=True)
class PatchingPair:
    clean: str
    clean_answer: str
    corrupt: str
    corrupt_answer: str


# ---------------------------------------------------------------------------------------------
# Training text


def factual_sentence(rng: random.Random) -> str:
    country, city, landmark = rng.choice(FACTS)
    if rng.random() < 0.5:
        return rng.choice(CAPITAL_TRAIN_TEMPLATES).format(country=country, city=city)
    return rng.choice(LANDMARK_TRAIN_TEMPLATES).format(landmark=landmark, city=city)


def _ioi_fill(template: str, io: str, s: str, order: str, rng: random.Random) -> str:
    a, b = (io, s) if order == "ABBA" else (s, io)
    return template.format(a=a, b=b, s=s, io=io, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))


def ioi_sentence(rng: random.Random) -> str:
    io, s = rng.sample(rng.choice(TRAIN_NAME_PAIRS), 2)
    return _ioi_fill(rng.choice(IOI_TRAIN_TEMPLATES), io, s, rng.choice(("ABBA", "BABA")), rng)


def induction_words(rng: random.Random, length: int, pool: tuple[str, ...] = FILLER_WORDS) -> list[str]:
    """Distinct random words, so every next token in the repeated half is determined by the first half."""
    return rng.sample(pool, length)


def _induction_pool() -> tuple[str, ...]:
    # Sometimes repeat ordinary vocabulary too, so induction is not tied to the made-up words.
    return FILLER_WORDS + NAMES + tuple(c for c, _, _ in FACTS) + tuple(c for _, c, _ in FACTS) + OBJECTS


def induction_sequence(rng: random.Random) -> str:
    pool = FILLER_WORDS if rng.random() < 0.75 else _induction_pool()
    words = induction_words(rng, rng.randint(*INDUCTION_LENGTHS), pool)
    return " ".join(words + words) + "."


TASK_MIX = (("ioi", 0.35), ("induction", 0.45), ("factual", 0.2))


def training_text(rng: random.Random, min_words: int, induction_shifted: float = 0.0) -> str:
    """One training row: a main sample (IOI, induction or factual) right at the start, as in the eval
    prompts, then factual sentences until the row has at least `min_words` tokens (the caller truncates).
    A share `induction_shifted` of the induction samples starts after a factual sentence instead.
    Only factual sentences follow, so no second set of names can confuse the IOI sample."""
    task = rng.choices([t for t, _ in TASK_MIX], weights=[w for _, w in TASK_MIX])[0]
    main = {"ioi": ioi_sentence, "induction": induction_sequence, "factual": factual_sentence}[task](rng)
    if task == "induction" and induction_shifted and rng.random() < induction_shifted:
        # Repeats that start at varying positions: with learned absolute positions (GPT-2), a fixed
        # start lets position stand in for "the token after the match", and no induction head forms.
        main = factual_sentence(rng) + " " + main
    parts, n_words = [main], len(split_words(main))
    while n_words < min_words:
        sentence = factual_sentence(rng)
        parts.append(sentence)
        n_words += len(split_words(sentence))
    return " ".join(parts)


def vocabulary() -> list[str]:
    """Every word-level token the corpus can produce (training and eval), in a fixed order."""
    texts = [*CAPITAL_TRAIN_TEMPLATES, CAPITAL_EVAL_TEMPLATE, *LANDMARK_TRAIN_TEMPLATES]
    texts += [LANDMARK_EVAL_TEMPLATE, *IOI_TRAIN_TEMPLATES, *IOI_EVAL_TEMPLATES]
    texts = [re.sub(r"\{\w+\}", " ", t) for t in texts]
    texts += [" ".join(f) for f in FACTS] + [" ".join(NAMES + PLACES + OBJECTS + FILLER_WORDS), "."]
    seen: dict[str, None] = {}
    for text in texts:
        for word in split_words(text):
            seen.setdefault(word, None)
    return list(seen)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation sets


def factual_eval_set() -> list[FactPrompt]:
    """Every fact (40 capitals, 40 landmarks) in its held-out template, ending right before the answer."""
    prompts = [
        FactPrompt(CAPITAL_EVAL_TEMPLATE.format(country=country), city, "capital", country)
        for country, city, _ in FACTS
    ]
    prompts += [
        FactPrompt(LANDMARK_EVAL_TEMPLATE.format(landmark=landmark), city, "landmark", landmark)
        for _, city, landmark in FACTS
    ]
    return prompts


def ioi_eval_set(n: int = 100, seed: int = 0) -> list[IOIPrompt]:
    """IOI prompts from held-out templates and held-out name pairs, alternating ABBA and BABA."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        io, s = rng.sample(rng.choice(EVAL_NAME_PAIRS), 2)
        order = ("ABBA", "BABA")[i % 2]
        template = IOI_EVAL_TEMPLATES[(i // 2) % len(IOI_EVAL_TEMPLATES)]
        prompts.append(IOIPrompt(_ioi_fill(template, io, s, order, rng), io, s, order))
    return prompts


def induction_eval_set(n: int = 50, length: int = INDUCTION_EVAL_LENGTH, seed: int = 0) -> list[list[str]]:
    """Fresh random sequences of made-up words; the prompt is `" ".join(words + words)`."""
    rng = random.Random(10_000 + seed)  # a stream of its own, apart from the training rows
    return [induction_words(rng, length) for _ in range(n)]


def factual_patching_pairs(relation: str = "capital", seed: int = 0) -> list[PatchingPair]:
    """Clean/corrupt prompt pairs for activation patching: the held-out template of `relation`
    ("capital" or "landmark") filled with two different facts of the same token length, one pair per fact."""
    prompts = [p for p in factual_eval_set() if p.relation == relation]
    rng = random.Random(seed)
    pairs = []
    for clean in prompts:
        length = len(split_words(clean.prompt))
        same_length = [p for p in prompts if p is not clean and len(split_words(p.prompt)) == length]
        if same_length:
            corrupt = rng.choice(same_length)
            pairs.append(PatchingPair(clean.prompt, clean.answer, corrupt.prompt, corrupt.answer))
    return pairs
