"""What a model source string names: the one parser behind ``al.load``, the command line and sweeps.

``zoo:NAME`` a shipped zoo model, ``tiny:FAMILY`` a tiny random model, a named source
(``smollm2-135m``), a ``.gguf`` file, a saved model directory, or else a hub id. A string that
looks like a path is a path, so a missing directory is reported as missing instead of being sent
to the hub as a malformed id; a near miss of a local name gets that name suggested instead.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ModelSourceError, SourcePathError

#: A hub id: ``name`` or ``org/name``.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass(frozen=True)
class Source:
    """A parsed model source. ``kind`` is zoo, tiny, named, gguf, directory or hub; ``name`` the
    zoo, tiny or named-source name, the path, or the hub id."""

    text: str
    kind: str
    name: str

    @property
    def path(self) -> Path:
        return Path(self.name).expanduser()


def zoo_names() -> tuple[str, ...]:
    from ..zoo import ZOO_MODELS

    return ZOO_MODELS


def tiny_families() -> tuple[str, ...]:
    from ..tiny import TINY_BUILDERS

    return tuple(TINY_BUILDERS)


def named_sources() -> tuple[str, ...]:
    from .sources import NAMED_SOURCES

    return tuple(NAMED_SOURCES)


def local_names() -> list[str]:
    """Every source that loads without a hub: zoo models, named sources, tiny families."""
    return [f"zoo:{n}" for n in zoo_names()] + list(named_sources()) + [f"tiny:{n}" for n in tiny_families()]


def looks_like_path(text: str) -> bool:
    """Whether ``text`` is meant as a local path rather than a hub id (``org/name``)."""
    separators = tuple(s for s in ("/", os.sep, os.altsep) if s)
    if text.startswith(("./", "../", "/", "~")) or text.endswith(separators) or text.count("/") > 1:
        return True
    return any(s in text for s in separators) and not _HUB_ID.fullmatch(text)


def near_miss(text: str, candidates: list[str]) -> str | None:
    """The local name ``text`` most likely meant (compared without case), if any is close."""
    lowered = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(text.lower(), list(lowered), n=1, cutoff=0.7)
    return lowered[found[0]] if found else None


def _unknown(prefix: str, name: str, kind: str, plural: str, names: tuple[str, ...]) -> ModelSourceError:
    guess = near_miss(name, list(names))
    hint = f"did you mean '{prefix}{guess}'? " if guess else ""
    return ModelSourceError(f"no {kind} {name!r}; {hint}{plural}: {', '.join(names)}")


def parse_source(source: str | os.PathLike) -> Source:
    """The parsed source, or a typed error for a prefixed name that does not exist, a path that
    does not exist, or a bare name that nearly matches a local one (checked before any hub access)."""
    text = str(source)
    if text.startswith("zoo:"):
        if text[4:] not in zoo_names():
            raise _unknown("zoo:", text[4:], "zoo model", "zoo models", zoo_names())
        return Source(text, "zoo", text[4:])
    if text.startswith("tiny:"):
        if text[5:] not in tiny_families():
            raise _unknown("tiny:", text[5:], "tiny model family", "families", tiny_families())
        return Source(text, "tiny", text[5:])
    if text in named_sources():
        return Source(text, "named", text)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise SourcePathError(f"GGUF file {text!r} does not exist: check the path")
        return Source(text, "gguf", text)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourcePathError(
                f"{text!r} is a local path but has no config.json: give a saved model directory (save_pretrained)"
            )
        return Source(text, "directory", text)
    if path.exists():
        raise SourcePathError(f"{text!r} is a file: give a model directory or a .gguf file")
    if isinstance(source, os.PathLike) or looks_like_path(text):
        raise SourcePathError(
            f"model path {text!r} does not exist ({path.resolve()}): check the path, or give a hub id as 'org/name'"
        )
    if "/" not in text:  # a bare name: a typo of a local name must not go to the hub
        guess = near_miss(text, local_names())
        if guess is not None:
            raise ModelSourceError(
                f"no local model {text!r}; did you mean {guess!r}? local models: {', '.join(local_names())}"
            )
    return Source(text, "hub", text)
