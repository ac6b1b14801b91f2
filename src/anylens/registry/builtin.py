"""The built-in adapters: plugin modules named here, registered on first use of the registry,
before any plugin of the ``anylens`` entry-point group.

A static list, like pytest's default plugins, so that anylens works from a source checkout that
was never installed (no entry-point metadata). Each module is registered through the same
``Registry.register_plugin`` call an entry-point plugin goes through, under the name
``anylens:<module>``, in the order listed (by name). The modules are named as strings: the
registry imports them only when it is built.
"""

from __future__ import annotations

BUILTIN_PLUGINS: tuple[str, ...] = (
    "anylens.adapters.gemma",
    "anylens.adapters.gemma2",
    "anylens.adapters.gpt2",
    "anylens.adapters.gpt_neox",
    "anylens.adapters.gptj",
    "anylens.adapters.inferred",
    "anylens.adapters.llama",
    "anylens.adapters.mamba",
    "anylens.adapters.mamba2",
    "anylens.adapters.mamba_ssm",
    "anylens.adapters.mistral",
    "anylens.adapters.opt",
    "anylens.adapters.phi3",
    "anylens.adapters.qwen2",
)


def plugin_name(module: str) -> str:
    """The registry name of a built-in plugin module: ``anylens:gpt2`` for ``anylens.adapters.gpt2``."""
    return "anylens:" + module.rsplit(".", 1)[-1]
