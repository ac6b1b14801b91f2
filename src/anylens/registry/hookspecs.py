"""Every hook an anylens plugin can implement. Built-in adapters implement them too."""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "anylens"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def anylens_adapters() -> list[Any]:
    """Return the adapters this plugin provides.

    Each item is an :class:`anylens.AdapterSpec`, or its data form: a dict or the path of a TOML
    file. An adapter claims the architectures it lists (``config.architectures`` / class names).
    """


@hookspec(firstresult=True)
def anylens_resolve(model: Any, config: Any) -> Any | None:
    """Claim a model that no adapter claims by architecture name.

    Called only when name lookup fails. Return an adapter (any form accepted by
    :hookspec:`anylens_adapters`) or ``None`` to let the next plugin try.
    """
