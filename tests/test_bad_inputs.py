"""The bad-input catalogue: every bad or edge input a user can give gets a typed anylens error
(which also subclasses the matching built-in) naming the input and saying what to do, or is
handled correctly. One parametrized test runs every case.

A case is ``Case(id, run, error, match)``: ``run()`` must raise ``error`` (an :class:`AnylensError`
subclass) whose message matches every regular expression in ``match``; or ``error=None`` and
``run()`` makes its own assertions about the correct handling.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

import anylens as al


@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[], object]
    error: type[BaseException] | None
    match: tuple[str, ...] = ()


# -- loading, sources, adapters, roles -----------------------------------------------------------
LOADING_AND_ROLES: list[Case] = []


# -- experiments, metrics, results, command line ---------------------------------------------------
EXPERIMENTS_AND_CLI: list[Case] = []


CASES = [*LOADING_AND_ROLES, *EXPERIMENTS_AND_CLI]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_a_clear_answer(case: Case):
    if case.error is None:
        case.run()
        return
    assert issubclass(case.error, al.AnylensError), f"{case.id}: expect an anylens error, not {case.error}"
    with pytest.raises(case.error) as raised:
        case.run()
    message = str(raised.value)
    for pattern in case.match:
        assert re.search(pattern, message), f"{case.id}: {pattern!r} not in {message!r}"
