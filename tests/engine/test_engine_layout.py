"""The engine's layering, read from the source: it builds on anylens.core only, its modules import
each other without a cycle, and experiments use the package, never its modules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import anylens.engine as engine

SRC = Path(engine.__file__).parent.parent  # src/anylens
ENGINE_MODULES = sorted(p.stem for p in (SRC / "engine").glob("*.py") if p.stem != "__init__")
ON_THE_ENGINE = ("patching", "ablation", "attribution")


def anylens_imports(path: Path, package: str) -> list[str]:
    """The anylens modules ``path`` imports when it runs (imports under TYPE_CHECKING left out)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and ast.unparse(branch.test) == "TYPE_CHECKING"
        for statement in branch.body
        for node in ast.walk(statement)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append(".".join([*base, node.module] if node.module else base))
            elif node.module and node.module.startswith("anylens"):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("anylens")]
    return found


def test_the_engine_builds_on_core_only():
    for name in ["__init__", *ENGINE_MODULES]:
        for module in anylens_imports(SRC / "engine" / f"{name}.py", "anylens.engine"):
            assert module.startswith(("anylens.core", "anylens.engine")), (name, module)


def test_engine_modules_import_each_other_without_a_cycle():
    graph = {
        name: {
            m.split(".")[2]
            for m in anylens_imports(SRC / "engine" / f"{name}.py", "anylens.engine")
            if m.startswith("anylens.engine.")
        }
        for name in ENGINE_MODULES
    }
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for other in graph[name]:
                visit(other, (*path, name))
            done.add(name)

    for name in ENGINE_MODULES:
        visit(name, ())


@pytest.mark.parametrize("name", ON_THE_ENGINE)
def test_experiments_use_the_engine_package_not_its_modules(name):
    modules = anylens_imports(SRC / "experiments" / f"{name}.py", "anylens.experiments")
    assert "anylens.engine" in modules
    assert not [m for m in modules if m.startswith("anylens.engine.")]


def test_the_public_names_of_the_engine_exist():
    assert engine.__all__ and all(hasattr(engine, name) for name in engine.__all__)
    for name in ENGINE_MODULES:
        importlib.import_module(f"anylens.engine.{name}")
