"""The package's own files: pinned versions, declared imports, one version, release files."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import anylens as al

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "anylens"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
LOCK = ROOT / "requirements" / "lock.txt"


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


def declared(*extras: str) -> set[str]:
    project = PYPROJECT["project"]
    names = {requirement_name(item) for item in project["dependencies"]}
    for extra in extras:
        names |= {requirement_name(item) for item in project["optional-dependencies"][extra]}
    return names


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements/lock.txt: {line!r} is not an exact pin"
            pins[normalized(name)] = version
    return pins


def test_every_dependency_the_suite_installs_is_pinned_in_the_lock():
    pins = locked()
    # tomli applies to Python 3.10 only; the lock is made on the Python CI runs.
    missing = declared("dev", "real") - set(pins) - {"tomli"}
    assert not missing, f"not pinned in requirements/lock.txt: {sorted(missing)}; run `make lock`"
    assert pins["torch"] == "2.13.0"  # the CPU wheel, without a local build tag pip would not match


def third_party_imports() -> dict[str, set[str]]:
    """Top-level modules imported anywhere in the package (at any depth: lazy imports count), by file."""
    found: dict[str, set[str]] = {}
    stdlib = set(sys.stdlib_module_names)
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in stdlib and top != "anylens":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared():
    distributions = importlib.metadata.packages_distributions()
    allowed = declared("real", "cuda") | {"tomli"}
    undeclared = {}
    for module, files in third_party_imports().items():
        providers = {normalized(name) for name in distributions.get(module, [module])}
        if not providers & allowed:
            undeclared[module] = sorted(files)
    assert "torch" in third_party_imports() and "nnsight" in third_party_imports()  # the scan sees imports
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_one_version_everywhere():
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "anylens._version.__version__"}
    namespace: dict[str, str] = {}
    exec((SOURCE / "_version.py").read_text(encoding="utf-8"), namespace)
    assert al.__version__ == namespace["__version__"]
    assert importlib.metadata.version("anylens") == al.__version__, "reinstall the package: pip install -e ."


def test_release_files():
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Version 2.0" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert (SOURCE / "py.typed").is_file()
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    base = re.match(r"\d+\.\d+\.\d+", al.__version__).group(0)
    assert f"## {base}" in changelog or "## Unreleased" in changelog


def test_version_option_names_the_stack(capsys):
    from anylens.cli import main

    assert main(["--version"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"anylens {al.__version__} (")
    transformers = importlib.metadata.version("transformers").split("+")[0]
    assert f"transformers {transformers}" in printed
