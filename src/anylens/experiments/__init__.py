"""Experiments written once against roles: they never name an architecture."""

from . import metrics
from .results import Result

__all__ = ["Result", "metrics"]
