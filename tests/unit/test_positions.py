"""normalize_positions: the one reading of user-given token positions, for the engine and experiments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anylens as al
from anylens.core.errors import InterventionError, PromptError
from anylens.core.positions import normalize_positions, one_position
from anylens.engine import normalize_positions as engine_normalize_positions
from anylens.experiments import extraction


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, None),
        (2, [2]),
        (-1, [4]),
        ([0, -2, 3], [0, 3, 3]),
        (range(-5, 0), [0, 1, 2, 3, 4]),
        (slice(1, None, 2), [1, 3]),
        (np.int64(-3), [2]),
        (torch.tensor(1), [1]),
        (torch.tensor([4, -4]), [4, 1]),
    ],
)
def test_positions_become_absolute_indices_into_five_tokens(given, expected) -> None:
    assert normalize_positions(given, 5) == expected


@pytest.mark.parametrize("given", [5, -6, [0, 7]])
def test_a_position_outside_the_prompt_is_a_prompt_error_and_an_index_error(given) -> None:
    with pytest.raises(
        al.PositionError, match=r"clean position -?\d+ is out of range for a prompt of 5 tokens"
    ) as caught:
        normalize_positions(given, 5, "clean")
    assert isinstance(caught.value, al.PromptError) and isinstance(caught.value, IndexError)


def test_the_engine_and_the_experiments_share_one_implementation() -> None:
    assert engine_normalize_positions is normalize_positions
    assert extraction.normalize_positions is normalize_positions


@pytest.mark.parametrize(
    "given,expected",
    [(3, 3), (-1, -1), ([2], 2), ((-2,), -2), (np.int64(4), 4), (torch.tensor(1), 1), ([torch.tensor(-3)], -3)],
)
def test_one_position_takes_an_index_or_a_list_of_one(given, expected):
    assert one_position(given, PromptError, "reads one position") == expected


@pytest.mark.parametrize("given", [[1, 2], [], True, 1.5, "1", torch.tensor([1, 2]), None])
def test_one_position_refuses_anything_else_with_the_callers_error(given):
    with pytest.raises(InterventionError, match=r"^a vector is read at one position; got positions="):
        one_position(given, InterventionError, "a vector is read at one position")
