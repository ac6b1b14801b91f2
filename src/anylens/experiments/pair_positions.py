"""Each clean/corrupt pair's positions: which positions pair up, and which of them are patched.

A pair's positions are paired by its ``align`` (None: position by position; ``"auto"``: see
:mod:`.alignment`; ``(clean_positions, corrupt_positions)``), and the patched ones are chosen
by ``positions``: indices of the patched run, or *names* the pair defines. A name pairs the
position of that name in the clean prompt with the one in the corrupt prompt, whatever the
alignment; ``END`` (the last token) is defined for every prompt, other names come from the pair
(``pair.positions``: name -> (clean position, corrupt position)), as dataset pairs and
:func:`anylens.pair` carry them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import AlignmentError, PositionError, PositionNameError, PromptError
from ..core.positions import normalize_positions
from .alignment import AUTO, Alignment, auto_align, shifted_positions, word_of_tokens
from .prompts import _is_pair, _text

if TYPE_CHECKING:
    from ..core.model import AnyModel

#: The name every prompt defines: its last token.
END = "END"


# -- the pairs, one by one ----------------------------------------------------------------------
def _items(prompts: Any) -> list[Any]:
    if isinstance(prompts, torch.Tensor):
        return list(prompts if prompts.dim() == 2 else prompts[None])
    if isinstance(prompts, (str, dict)) or _is_pair(prompts):
        return [prompts]
    return list(prompts)


def pair_items(clean: Any, corrupt: Any) -> list[tuple[Any, Any]]:
    """The (clean, corrupt) prompt of every pair; one prompt on either side goes with every pair."""
    cleans, corrupts = _items(clean), _items(corrupt)
    if not cleans or not corrupts:
        raise PromptError("the prompt list is empty: give at least one prompt")
    if len(cleans) != len(corrupts):
        if len(corrupts) == 1:
            corrupts = corrupts * len(cleans)
        elif len(cleans) == 1:
            cleans = cleans * len(corrupts)
        else:
            raise PromptError(f"{len(cleans)} clean prompts but {len(corrupts)} corrupt prompts: give as many of each")
    return list(zip(cleans, corrupts))


@dataclass
class PairTokens:
    """One pair's prompts (as given), texts (None for token ids) and token ids."""

    clean_item: Any
    corrupt_item: Any
    clean_text: str | None
    corrupt_text: str | None
    clean: list[int]
    corrupt: list[int]


def _ids(model: AnyModel, item: Any, side: str) -> tuple[str | None, list[int]]:
    if isinstance(item, torch.Tensor):
        return None, [int(i) for i in item.reshape(-1)]
    text = _text(item, side)
    model.require_tokenizer(text)
    return text, [int(i) for i in model.tokenizer(text)["input_ids"]]  # as tokenize_aligned does


def pair_tokens(model: AnyModel, clean_item: Any, corrupt_item: Any) -> PairTokens:
    clean_text, clean = _ids(model, clean_item, "clean")
    corrupt_text, corrupt = _ids(model, corrupt_item, "corrupt")
    return PairTokens(clean_item, corrupt_item, clean_text, corrupt_text, clean, corrupt)


# -- which positions pair up --------------------------------------------------------------------
def pair_alignment(model: AnyModel, tokens: PairTokens, align: Any) -> Alignment:
    """The pair's positions paired by ``align`` (None, ``"auto"`` or explicit lists)."""
    n, m = len(tokens.clean), len(tokens.corrupt)
    if align is None:
        if n != m:
            raise PromptError(
                "clean and corrupt prompts have different token lengths, so positions cannot be matched: "
                f"clean {tokens.clean_text!r} -> {n} tokens {[model.decode([i]) for i in tokens.clean]}; "
                f"corrupt {tokens.corrupt_text!r} -> {m} tokens {[model.decode([i]) for i in tokens.corrupt]}. "
                "Pass align='auto' to pair the common tokens and the differing spans' last tokens, "
                "align=(clean_positions, corrupt_positions), or name the positions (positions=['END'])."
            )
        return Alignment(list(range(n)), list(range(n)), ["same"] * n)
    if isinstance(align, str):
        if align != AUTO:
            raise PromptError(f"align={align!r}: use 'auto', or (clean_positions, corrupt_positions)")
        clean_words = word_of_tokens(model, tokens.clean_text, tokens.clean)
        corrupt_words = word_of_tokens(model, tokens.corrupt_text, tokens.corrupt)
        return auto_align(tokens.clean, tokens.corrupt, clean_words, corrupt_words)
    clean_pos, corrupt_pos = explicit_alignment(align, n, m)
    return Alignment(clean_pos, corrupt_pos, ["given"] * len(clean_pos))


def explicit_alignment(align: Any, t_clean: int, t_corrupt: int) -> tuple[list[int], list[int]]:
    """``align=(clean_positions, corrupt_positions)`` checked against both prompts' lengths."""
    try:
        clean_pos, corrupt_pos = align
        clean_pos, corrupt_pos = list(clean_pos), list(corrupt_pos)
    except (TypeError, ValueError):
        raise PromptError(
            "align must be 'auto', a pair (clean_positions, corrupt_positions) of equal-length lists, "
            "or a list of those, one per prompt pair"
        ) from None
    if len(clean_pos) != len(corrupt_pos):
        raise PromptError(
            f"align pairs {len(clean_pos)} clean positions with {len(corrupt_pos)} corrupt positions: give as many of each"
        )
    checked = []
    for name, pos, length in (("clean", clean_pos, t_clean), ("corrupt", corrupt_pos, t_corrupt)):
        try:
            pos = normalize_positions(pos, length, f"align's {name}")
        except PositionError as error:
            raise AlignmentError(
                f"{error}: align maps positions of the {name} prompt, which has {length} tokens; "
                "see al.show_alignment(model, clean, corrupt) for both prompts' positions, or pass align='auto'"
            ) from None
        if len(set(pos)) != len(pos):
            raise PromptError(f"align lists a {name} position twice: {pos}")
        checked.append(pos)
    return checked[0], checked[1]


def per_pair_aligns(align: Any, n_pairs: int) -> list[Any]:
    """``align`` for each pair: one for all (None, ``"auto"``, a pair of position lists) or a list
    with one per pair."""
    if not _per_pair(align):
        return [align] * n_pairs
    if len(align) != n_pairs:
        raise PromptError(f"align gives {len(align)} alignments for {n_pairs} prompt pairs: give one per pair, or one")
    return list(align)


def _per_pair(align: Any) -> bool:
    def one(entry: Any) -> bool:
        if entry is None or isinstance(entry, str):
            return True
        return (
            isinstance(entry, (list, tuple))
            and len(entry) == 2
            and all(isinstance(side, (list, tuple, range)) for side in entry)
        )

    return isinstance(align, list) and bool(align) and all(one(entry) for entry in align)


# -- named positions ----------------------------------------------------------------------------
def defined_names(item: Any, side: int, length: int) -> dict[str, int]:
    """The names a prompt (``side`` 0: clean, 1: corrupt) defines, as positions in ``0..length-1``."""
    given = item.get("positions") if isinstance(item, dict) else getattr(item, "positions", None)
    names = {}
    for name, both in (given or {}).items():
        position = operator.index(both[side])
        if not -length <= position < length:
            which = ("clean", "corrupt")[side]
            raise PositionError(
                f"the pair names position {position} {name!r} of its {which} prompt, which has {length} tokens "
                f"(valid: 0..{length - 1}): count the named positions with the model's tokenizer, or use al.pair"
            )
        names[name] = position % length
    names.setdefault(END, length - 1)
    return names


def _name_position(name: str, item: Any, side: int, length: int, text: Any) -> int:
    names = defined_names(item, side, length)
    if name not in names:
        which = ("clean", "corrupt")[side]
        raise PositionNameError(
            f"position name {name!r} is not defined for the {which} prompt {text!r}; it defines "
            f"{', '.join(map(repr, names))}. Give pairs that name their positions (anylens.datasets.ioi_pairs, "
            "factual_pairs, or al.pair(model, 'When [IO:Mary] and ...', ...)), or integer positions"
        )
    return names[name]


def asks_by_name(positions: Any) -> bool:
    """Whether ``positions`` names a position (a name, or a list holding one)."""
    entries = [positions] if isinstance(positions, str) else positions
    return isinstance(entries, (list, tuple)) and any(isinstance(e, str) for e in entries)


def named_indices(prompts: Any, positions: Any, length: int) -> tuple[Any, dict[int, str]]:
    """``positions`` with each name replaced by the index the prompts (their clean side) give it,
    and index -> name, for an experiment that runs prompts of one length as one batch.

    A name must be at the same position in every prompt of the batch; positions without names
    pass unchanged (the experiment checks them)."""
    if not asks_by_name(positions):
        return positions, {}
    entries = [positions] if isinstance(positions, str) else positions
    items = _items(prompts)
    texts = [None if isinstance(item, torch.Tensor) else _text(item, "clean") for item in items]
    resolved, labels = [], {}
    for entry in entries:
        if not isinstance(entry, str):
            resolved.append(entry)
            continue
        found = {_name_position(entry, item, 0, length, text) for item, text in zip(items, texts)}
        if len(found) > 1:
            raise PromptError(
                f"position name {entry!r} is at positions {sorted(found)} in different prompts of one batch: "
                "give prompts where it is at one position, or run them apart (al.run calls each prompt alone "
                "and aggregates by name)"
            )
        (index,) = found
        resolved.append(index)
        labels[index] = entry
    return resolved, labels


@dataclass(frozen=True)
class PairPositions:
    """The positions one pair patches: ``target`` in the patched run, ``source`` in the run its
    activations come from, ``labels`` the names they were asked for by (None: an index)."""

    target: tuple[int, ...]
    source: tuple[int, ...]
    labels: tuple[str | None, ...]
    shifted: tuple[int, ...] = ()  # patched positions that no longer correspond (see alignment)

    @property
    def key(self) -> tuple:
        return (self.target, self.source, self.labels)


def resolve_pair(model: AnyModel, tokens: PairTokens, direction: str, align: Any, positions: Any) -> PairPositions:
    """Which positions of this pair are patched from where, for ``positions`` (None: every paired one)."""
    denoise = direction == "denoise"
    entries = [positions] if isinstance(positions, str) else positions
    named = asks_by_name(positions)
    t_target = len(tokens.corrupt if denoise else tokens.clean)
    alignment = None
    if not named or not all(isinstance(e, str) for e in entries):
        alignment = pair_alignment(model, tokens, align)
    if alignment is not None:
        clean_pos, corrupt_pos = alignment.clean, alignment.corrupt
        aligned_target, aligned_source = (corrupt_pos, clean_pos) if denoise else (clean_pos, corrupt_pos)
    pairs: list[tuple[int, int, str | None]] = []

    def indexed(given: Any) -> None:  # positions of the patched run, through the alignment
        wanted = normalize_positions(given, t_target, "patched-run")
        missing = [p for p in wanted if p not in aligned_target]
        if missing:
            raise PromptError(
                f"positions {missing} are not aligned to any source position; aligned positions: {aligned_target}"
            )
        pairs.extend((p, aligned_source[aligned_target.index(p)], None) for p in wanted)

    if entries is None:
        pairs = [(t, s, None) for t, s in zip(aligned_target, aligned_source)]
    elif not named:
        indexed(positions)
    else:
        for entry in entries:
            if not isinstance(entry, str):
                indexed(entry)
                continue
            clean_at = _name_position(entry, tokens.clean_item, 0, len(tokens.clean), tokens.clean_text)
            corrupt_at = _name_position(entry, tokens.corrupt_item, 1, len(tokens.corrupt), tokens.corrupt_text)
            pairs.append((corrupt_at, clean_at, entry) if denoise else (clean_at, corrupt_at, entry))
    targets = [t for t, _, _ in pairs]
    if len(set(targets)) != len(targets):
        repeated = sorted({t for t in targets if targets.count(t) > 1})
        raise PromptError(
            f"positions {list(positions)} name the same position {repeated} of the patched run "
            f"{tokens.corrupt_text if denoise else tokens.clean_text!r}: give each position once"
        )
    shifted: list[int] = []
    differ = [a != b for a, b in zip(tokens.clean, tokens.corrupt)]
    if align is None and alignment is not None and any(a and b for a, b in zip(differ, differ[1:])):
        # Only a run of two differing tokens or more can split words differently: look for words then.
        words = (
            word_of_tokens(model, tokens.clean_text, tokens.clean),
            word_of_tokens(model, tokens.corrupt_text, tokens.corrupt),
        )
        moved = set(shifted_positions(tokens.clean, tokens.corrupt, *words))
        shifted = [t for t, _, label in pairs if label is None and t in moved]
    return PairPositions(
        tuple(t for t, _, _ in pairs),
        tuple(s for _, s, _ in pairs),
        tuple(label for *_, label in pairs),
        tuple(shifted),
    )


__all__ = [
    "END",
    "asks_by_name",
    "PairPositions",
    "PairTokens",
    "defined_names",
    "explicit_alignment",
    "named_indices",
    "pair_alignment",
    "pair_items",
    "pair_tokens",
    "per_pair_aligns",
    "resolve_pair",
]
