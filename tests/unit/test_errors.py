"""Every error and warning anylens raises on purpose lives in ``anylens.core.errors``, is exported
from ``anylens``, and subclasses ``AnylensError`` (or ``AnylensWarning``) and a built-in."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import anylens as al
from anylens.core import errors

PACKAGE = Path(al.__file__).resolve().parent
CLASSES = {
    name: cls for name, cls in vars(errors).items() if inspect.isclass(cls) and cls.__module__ == errors.__name__
}
#: Base classes that group errors rather than name one: they need no built-in of their own.
GROUPS = {errors.AnylensError, errors.SweepError}
#: Exceptions of the command line that never leave it (each becomes exit status 2 and one line on
#: stderr): internal control flow, deliberately plain ``Exception`` and not part of the API.
INTERNAL = {("cli.py", "UsageError"), ("sweep/cli.py", "_ArgumentError")}

#: (module, name) where an error or warning was defined before it moved: still importable there.
FORMER_HOMES = [
    ("anylens.engine", "OverError"),
    ("anylens.engine.plan", "OverError"),
    ("anylens.experiments.dla", "LinearisationError"),
    ("anylens.inference.structure", "AnatomyError"),
    ("anylens.inference.infer", "InferenceError"),
    ("anylens.tiny.arch", "TinyBuildError"),
    ("anylens.registry.manager", "AdapterConflictWarning"),
    ("anylens.registry.manager", "PluginLoadWarning"),
    ("anylens.sweep", "SweepError"),
    ("anylens.sweep", "SweepConfigError"),
    ("anylens.sweep", "SweepWeightsChangedError"),
    ("anylens.sweep", "SweepIntegrityError"),
    ("anylens.sweep", "SweepBusyError"),
    ("anylens.sweep", "SweepModelError"),
    ("anylens.sweep", "SweepWarning"),
    ("anylens.sweep.store", "SweepConfigError"),
    ("anylens.sweep.runner", "SweepModelError"),
]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_error_and_warning_is_exported_and_typed(name: str) -> None:
    cls = CLASSES[name]
    assert getattr(al, name) is cls and name in al.__all__
    if issubclass(cls, Warning):
        assert issubclass(cls, errors.AnylensWarning)
        return
    assert issubclass(cls, errors.AnylensError)
    if cls not in GROUPS:
        builtins = [
            b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)
        ]
        assert builtins, f"{name} subclasses no built-in exception (ValueError, LookupError, ...)"


@pytest.mark.parametrize(("module", "name"), FORMER_HOMES)
def test_errors_stay_importable_where_they_were_defined_before(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is CLASSES[name]


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def test_no_module_but_core_errors_defines_an_error_or_warning() -> None:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "core/errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {_base_name(b) for b in node.bases}
                if any(b in CLASSES or b.endswith(("Error", "Exception", "Warning")) for b in bases):
                    found.add((relative, node.name))
    assert found == INTERNAL, "define errors and warnings in anylens/core/errors.py"


@pytest.mark.parametrize(("module", "name"), sorted(INTERNAL))
def test_the_command_line_s_own_exceptions_stay_internal(module: str, name: str) -> None:
    cls = getattr(importlib.import_module("anylens." + module.removesuffix(".py").replace("/", ".")), name)
    assert not issubclass(cls, errors.AnylensError) and not hasattr(al, name)
