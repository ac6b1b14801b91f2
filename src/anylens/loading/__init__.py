"""Loading: from a source string or a built model to an AnyModel.

Above the core and the registry: :mod:`.locate` parses a source (zoo, tiny, named, GGUF,
directory, hub id), :mod:`.hub` decides whether the hub can be asked, :mod:`.sources` fetches the
named sources, :mod:`.integrity` names a damaged weights file, :mod:`.remote` builds NDIF-backed
models, and :mod:`.loader` holds ``load`` and ``wrap`` (the registry picks the adapter).
"""

from __future__ import annotations

from .loader import load, wrap

__all__ = ["load", "wrap"]
