"""Token positions as users give them (an index, a list, a slice; negative from the end), made absolute.

One function for every layer: the engine checks the positions a plan patches, experiments the
positions they read.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import SupportsIndex, cast

from .errors import PositionError


def normalize_positions(positions: int | slice | Iterable[int] | None, length: int, what: str = "") -> list[int] | None:
    """Positions in ``0..length-1`` (negative ones count from the end), None (all) unchanged, or
    :class:`PositionError` naming the position (``what`` says which prompt it indexes)."""
    if positions is None:
        return None
    if isinstance(positions, slice):
        return list(range(length))[positions]
    # One index: an int, or an integer scalar (numpy, torch); anything else raises TypeError and is a list.
    try:
        chosen = [operator.index(cast(SupportsIndex, positions))]
    except TypeError:
        chosen = [int(p) for p in cast(Iterable[int], positions)]
    for p in chosen:
        if not -length <= p < length:
            raise PositionError(
                f"{what + ' ' if what else ''}position {p} is out of range for a prompt of {length} tokens "
                f"(valid: 0..{length - 1} or -{length}..-1)"
            )
    return [p % length for p in chosen]


def one_position(positions: object, error: type[Exception], refusal: str) -> int:
    """The single position an experiment reads: an integer index (numpy and torch scalars too) or a
    list of one. Anything else (several positions, a bool, a float) raises ``error`` with
    ``refusal`` followed by what was given."""
    if isinstance(positions, (list, tuple)) and len(positions) == 1:
        positions = positions[0]
    if not isinstance(positions, bool):
        try:
            return operator.index(cast(SupportsIndex, positions))
        except TypeError:
            pass
    raise error(f"{refusal}; got positions={positions!r}")


__all__ = ["normalize_positions", "one_position"]
