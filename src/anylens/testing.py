"""Helpers for the test-suite: the tiny random models of :mod:`anylens.tiny`, under the names the
tests import. Production code imports :mod:`anylens.tiny` instead."""

from __future__ import annotations

# Everything anylens.tiny exports, so the two lists cannot drift apart.
from .tiny import *  # noqa: F403
from .tiny import __all__  # noqa: F401
