"""The plugin manager: built-in adapters (the static list of :mod:`.builtin`), entry-point plugins
and run-time registrations, all registered through one path, resolved deterministically."""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from ..core.errors import (
    AdapterConflictWarning,
    AdapterSpecError,
    PluginError,
    PluginLoadWarning,
    UnknownArchitectureError,
)
from ..core.spec import AdapterSpec
from . import hookspecs
from .builtin import BUILTIN_PLUGINS, plugin_name

ENTRY_POINT_GROUP = "anylens"


@dataclass
class Claim:
    adapter: AdapterSpec
    plugin: str
    builtin: bool


@dataclass
class Registry:
    """Which adapter serves which architecture, and which plugins failed."""

    pm: pluggy.PluginManager = field(default_factory=lambda: _new_plugin_manager())
    claims: dict[str, Claim] = field(default_factory=dict)
    adapters: dict[str, Claim] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    # -- registration ------------------------------------------------------------------------
    def register_plugin(self, plugin: Any, name: str, *, builtin: bool = False, override: bool = False) -> None:
        """Register a plugin object (a module or an instance with ``anylens_*`` hooks)."""
        self.failures.pop(name, None)  # a fixed plugin registered again is no longer failing
        try:
            self.pm.register(plugin, name=name)
        except Exception as error:  # a plugin with a malformed hook
            self._fail(name, error)
            return
        for impl in self.pm.hook.anylens_adapters.get_hookimpls():
            if impl.plugin_name != name:
                continue
            try:
                items = impl.function() or []
                specs = [as_spec(item) for item in items]
            except Exception as error:
                self.pm.unregister(name=name)
                self._fail(name, error)
                return
            for spec in specs:
                self._claim(spec, name, builtin=builtin, override=override)

    def register_adapter(self, adapter: Any, *, override: bool = False, plugin: str | None = None) -> AdapterSpec:
        spec = as_spec(adapter)
        name = plugin or f"runtime:{spec.name}"
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
            self._forget(name)
        self.register_plugin(_StaticPlugin([spec]), name, override=override)
        if name in self.failures:
            raise PluginError(self.failures[name])
        return spec

    def load_plugins(self) -> None:
        """The built-in adapters, then the plugins of the ``anylens`` entry-point group."""
        self.load_builtins()
        self.load_entry_points()

    def load_builtins(self) -> None:
        """Import and register every module of :data:`BUILTIN_PLUGINS`, in that order."""
        for module in BUILTIN_PLUGINS:
            name = plugin_name(module)
            if self.pm.has_plugin(name):
                continue
            try:
                plugin = importlib.import_module(module)
            except Exception as error:
                self._fail(name, error)
                continue
            self.register_plugin(plugin, name, builtin=True)

    def load_entry_points(self) -> None:
        """Import every plugin of the ``anylens`` entry-point group, by name.

        A point naming a built-in module (the metadata of an older anylens install advertised
        them) is skipped: the built-ins are registered once, from :data:`BUILTIN_PLUGINS`."""
        points = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
        for point in points:
            name = f"{point.dist.name if point.dist else '?'}:{point.name}"
            if self.pm.has_plugin(name) or point.value in BUILTIN_PLUGINS:
                continue
            try:
                plugin = point.load()
            except Exception as error:
                self._fail(name, error)
                continue
            self.register_plugin(plugin, name)

    def _claim(self, spec: AdapterSpec, plugin: str, *, builtin: bool, override: bool) -> None:
        claim = Claim(spec, plugin, builtin)
        if spec.name in self.adapters and self.adapters[spec.name].plugin != plugin and not override:
            warnings.warn(
                f"plugin {plugin!r} registers adapter name {spec.name!r}, already registered by "
                f"{self.adapters[spec.name].plugin!r}; keeping the first. Pass override=True to replace it.",
                AdapterConflictWarning,
                stacklevel=3,
            )
            return
        self.adapters[spec.name] = claim
        for arch in spec.architectures:
            held = self.claims.get(arch)
            if held is not None and held.plugin != plugin and held.adapter.name != spec.name:
                if not override:
                    warnings.warn(
                        f"plugin {plugin!r} claims {arch} with adapter {spec.name!r}, already served by "
                        f"{held.adapter.name!r} from {held.plugin!r}; keeping {held.adapter.name!r}. "
                        "Register with override=True to replace it.",
                        AdapterConflictWarning,
                        stacklevel=3,
                    )
                    continue
                warnings.warn(
                    f"adapter {spec.name!r} from {plugin!r} overrides {held.adapter.name!r} for {arch}",
                    AdapterConflictWarning,
                    stacklevel=3,
                )
            self.claims[arch] = claim

    def _forget(self, plugin: str) -> None:
        """Drop what a plugin claimed, so that registering it again replaces its claims."""
        self.adapters = {name: claim for name, claim in self.adapters.items() if claim.plugin != plugin}
        self.claims = {arch: claim for arch, claim in self.claims.items() if claim.plugin != plugin}

    def _fail(self, name: str, error: BaseException) -> None:
        message = f"plugin {name!r} failed: {type(error).__name__}: {error}"
        self.failures[name] = message
        warnings.warn(message + "; the other adapters keep working", PluginLoadWarning, stacklevel=3)

    # -- resolution --------------------------------------------------------------------------
    def resolve(self, model: Any) -> AdapterSpec:
        config = getattr(model, "config", None)
        names = list(getattr(config, "architectures", None) or []) + [type(model).__name__]
        for arch in names:
            if arch in self.claims:
                return self.claims[arch].adapter
        found = self.pm.hook.anylens_resolve(model=model, config=config)
        if found is not None:
            return as_spec(found)
        raise UnknownArchitectureError(
            f"no adapter claims {type(model).__name__} (architectures {names[:-1] or 'not set'}). "
            f"Registered adapters: {', '.join(sorted(self.adapters))}. "
            "Register one with al.register_adapter({...}) or a TOML file (see docs/adapters.md), "
            "or pass adapter=... to al.wrap / al.load."
        )

    def adapter(self, name: str) -> AdapterSpec:
        if name not in self.adapters:
            raise UnknownArchitectureError(f"no adapter named {name!r}; registered: {', '.join(sorted(self.adapters))}")
        return self.adapters[name].adapter


class _StaticPlugin:
    """A plugin that provides a fixed list of adapters (used by ``register_adapter``)."""

    def __init__(self, specs: list[AdapterSpec]):
        self.specs = specs

    @hookspecs.hookimpl
    def anylens_adapters(self) -> list[AdapterSpec]:
        return self.specs


def as_spec(item: Any) -> AdapterSpec:
    """An :class:`AdapterSpec` from a spec, a dict, or a TOML file path."""
    if isinstance(item, AdapterSpec):
        return item
    if isinstance(item, Mapping):
        return AdapterSpec.from_dict(item)
    if isinstance(item, (str, Path)) and str(item).endswith(".toml"):
        return AdapterSpec.from_toml(item)
    raise AdapterSpecError(
        f"cannot use {item!r} as an adapter: give an AdapterSpec, a dict of its fields, or a .toml file path"
    )


def _new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


_registry: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, built on first use: the built-in adapters, then the
    entry-point group."""
    global _registry
    if _registry is None:
        _registry = Registry()
        _registry.load_plugins()
        if not any(claim.builtin for claim in _registry.adapters.values()):
            failed = "; ".join(_registry.failures.get(plugin_name(module), module) for module in BUILTIN_PLUGINS)
            raise PluginError(f"no built-in adapter could be registered ({failed}): check the anylens installation")
    return _registry


def reset_registry() -> None:
    """Forget run-time registrations and reload plugins (for tests)."""
    global _registry
    _registry = None


def register_adapter(adapter: Any, *, override: bool = False) -> AdapterSpec:
    """Register an adapter at run time: an AdapterSpec, a dict, or a TOML file path."""
    return registry().register_adapter(adapter, override=override)


def register_plugin(plugin: ModuleType | Any, name: str | None = None, *, override: bool = False) -> None:
    """Register a plugin object at run time, the way an entry-point plugin is registered."""
    name = name or getattr(plugin, "__name__", None) or repr(plugin)
    reg = registry()
    reg.register_plugin(plugin, name, override=override)
    if name in reg.failures:
        raise PluginError(reg.failures[name])
