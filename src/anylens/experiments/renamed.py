"""Old argument names of the experiments, kept working for one release.

Every experiment is called as ``fn(model, prompts, *, ...)`` (or ``fn(model, clean, corrupt,
*, ...)``): the model and the prompts positionally, everything else by keyword, with the same
names throughout (``prompts``, ``positions``, ``metric``, ``batch_size``). :func:`renamed`
wraps an experiment so that its former keyword names, and its former positional options, still
work and warn with a :class:`FutureWarning` that names the keyword to use instead.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from ..core.errors import OptionError

F = TypeVar("F", bound=Callable[..., Any])


def renamed(**old_to_new: str) -> Callable[[F], F]:
    """Accept the experiment's old keyword names (``old_to_new``) and, after its positional
    inputs, its options given by position in the order of its signature (as it took them before
    they became keyword-only), each with a :class:`FutureWarning`.

    The wrapper keeps the experiment's signature (``inspect.signature`` shows the new one) and
    records the old names in ``__renamed__`` for callers that check options by name.
    """

    def decorate(function: F) -> F:
        parameters = inspect.signature(function).parameters.values()
        leading = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters)
        positional = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        name = function.__name__

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) > leading:
                extra, args = args[leading:], args[:leading]
                if len(extra) > len(positional):
                    raise OptionError(
                        f"{name}() takes {leading} positional arguments (the model and the prompts) but "
                        f"{leading + len(extra)} were given: pass the options by keyword ({', '.join(positional)})"
                    )
                names = positional[: len(extra)]
                warnings.warn(
                    f"{name}() takes its options by keyword: pass {', '.join(f'{n}=...' for n in names)}; "
                    "options given by position stop working in the next release",
                    FutureWarning,
                    stacklevel=2,
                )
                for option, value in zip(names, extra):
                    if option in kwargs:
                        raise OptionError(
                            f"{name}() got {option!r} by position and by keyword: give it once, by keyword"
                        )
                    kwargs[option] = value
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise OptionError(f"{name}() got both {old}= and {new}=; pass {new}= only ({old}= is its old name)")
                warnings.warn(
                    f"{name}({old}=...) is now {name}({new}=...); the old name stops working in the next release",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        wrapper.__renamed__ = dict(old_to_new)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def canonical(function: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the old keyword names of ``function`` replaced by the new ones, silently
    (for callers that have already warned, such as a sweep checking its configuration)."""
    old_to_new = getattr(function, "__renamed__", {})
    return {old_to_new.get(key, key): value for key, value in options.items()}


__all__ = ["canonical", "renamed"]
