"""The import rules of the package layout: arrows point down only.

Every module under ``src/anylens`` is parsed with ``ast``; every import counts, including the lazy
ones inside functions and those under ``TYPE_CHECKING``. A module belongs to the layer of the
longest key below that is its name or a dotted prefix of it (relative to ``anylens``; ``""`` is
the top-level package, the public API ``import anylens as al``). A layer may import itself and
the layers listed for it, nothing else. A layer that does not exist yet (``engine``) simply has
no modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PUBLIC = ""  # the top-level package: anylens/__init__.py, the public API

#: layer -> the other layers it may import, from the bottom up.
ALLOWED: dict[str, set[str]] = {
    # roles, adapter specs, the wrapped model, role access, errors
    "core": set(),
    # one data module per architecture, written as a third-party plugin is: the core or the public API
    "adapters": {"core", PUBLIC},
    # the plugin that hands models no adapter claims to structural inference
    "adapters.inferred": {"core", PUBLIC, "adapters", "inference"},
    # tiny random models built from configs; the builders need only the core
    "tiny.models": {"core", "tiny.plain"},
    "tiny.plain": {"core"},
    "tiny.arch": {"core"},
    # ``anylens.tiny``: the builders, and tiny() that wraps one through the registry
    "tiny": {"core", "registry", "tiny.models", "tiny.arch", "tiny.plain"},
    # hookspecs, plugin manager, built-in list (module names as strings), resolution, table, verify
    "registry": {"core", "inference", "tiny.arch"},
    # adapters inferred from structure, verified with the registry's check
    "inference": {"core", "registry", "tiny.models", "tiny.arch"},
    # sources, hub, named sources, integrity, remote, load and wrap
    "loading": {"core", "registry", "tiny", "zoo"},
    # the batched patching executor
    "engine": {"core"},
    # extraction, lens, DLA, patching, ablation, attribution, patterns, metrics, results
    "experiments": {"core", "engine"},
    # the component graph and edge-level experiments, on roles, the engine and the experiments
    "circuits": {"core", "engine", "experiments"},
    "datasets": {"core"},
    # the shipped models' names and directories ...
    "zoo": set(),
    # ... and the tools that train and check them, on the public API
    "zoo.mechanisms": {PUBLIC, "zoo"},
    "zoo.train": {PUBLIC, "zoo", "zoo.mechanisms"},
    "viz": set(),
    "_version": set(),
    PUBLIC: {"_version", "core", "registry", "loading", "experiments"},
    # the top: many models and prompts on disk, the command line, the demo
    "sweep": {PUBLIC, "core", "loading", "experiments", "engine", "datasets"},
    "demo": {PUBLIC, "datasets", "viz"},
    "cli": {PUBLIC, "core", "registry", "loading", "zoo", "zoo.train"},
    # helpers for the test-suite only; nothing in src imports it
    "testing": {"tiny"},
}

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "anylens"


def module_names() -> dict[str, tuple[Path, bool]]:
    """Every module, as a name relative to ``anylens`` -> (file, whether it is a package)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


MODULES = module_names()


def layer_of(name: str) -> str | None:
    """The longest key of ALLOWED that is ``name`` or a dotted prefix of it (``""`` only itself)."""
    keys = [key for key in ALLOWED if key == name or (key and name.startswith(key + "."))]
    return max(keys, key=len) if keys else None


def imported(name: str) -> set[str]:
    """The anylens modules ``name`` imports, relative to ``anylens`` (``""``: the package itself)."""
    path, is_package = MODULES[name]
    package = ["anylens", *name.split(".")] if name else ["anylens"]
    if not is_package:
        package = package[:-1]
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # ``from .. import datasets`` imports a module, not ``anylens``
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if _relative(submodule) in MODULES else base)
    return {_relative(target) for target in targets if target == "anylens" or target.startswith("anylens.")}


def _relative(target: str) -> str:
    return "" if target == "anylens" else target.removeprefix("anylens.")


def test_every_module_has_a_layer():
    unplaced = [name for name in MODULES if layer_of(name) is None]
    assert not unplaced, f"modules outside every layer of ALLOWED (add them to the table): {unplaced}"


@pytest.mark.parametrize("name", sorted(MODULES), ids=lambda name: name or "anylens")
def test_imports_point_down(name):
    layer = layer_of(name)
    allowed = ALLOWED[layer] | {layer}
    wrong = sorted(target or "anylens" for target in imported(name) if layer_of(target) not in allowed)
    assert not wrong, f"anylens.{name} (layer {layer or 'anylens'!r}) imports {wrong}; it may import {sorted(allowed)}"


def test_core_imports_only_core():
    """The rule the layout rests on, spelled out: the core imports no other part of anylens."""
    for name in MODULES:
        if layer_of(name) == "core":
            assert {layer_of(target) for target in imported(name)} <= {"core"}, name


def test_nothing_in_src_imports_the_test_helpers():
    importers = sorted(name for name in MODULES if "testing" in imported(name))
    assert not importers, f"production modules import anylens.testing: {importers}; use anylens.tiny"


def test_the_rules_see_lazy_imports():
    """The parser must count an import inside a function, or the table proves nothing."""
    assert "inference.infer" in imported("adapters.inferred")  # imported inside anylens_resolve
    assert "registry.resolve" in imported("tiny")  # imported inside tiny()
