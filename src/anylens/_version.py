"""The package version, in one place: pyproject.toml reads it, ``anylens.__version__`` re-exports it."""

__version__ = "0.2.0.dev0"
