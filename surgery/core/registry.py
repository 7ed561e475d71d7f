"""The plugin manager: loads plugins from the `surgery` entry-point group and indexes what they provide."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
from torch import nn

from surgery.core import hookspecs
from surgery.core.formats import WeightFormat
from surgery.core.method import Method
from surgery.errors import PluginError

if TYPE_CHECKING:
    from surgery.core.formats import AdapterFormat


class Registry:
    """One pluggy PluginManager plus the methods, weight formats and rule directories its plugins return."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.owners: dict[int, str] = {}  # id of each indexed method or format -> the plugin that gave it
        self.pm.add_hookspecs(hookspecs)
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        """Register every module of the `surgery` entry-point group; a plugin that fails to import is named."""
        from importlib.metadata import entry_points

        for ep in entry_points(group=hookspecs.PROJECT):
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as err:
                raise PluginError(f"plugin {ep.name!r} ({ep.value}, from package {ep.dist.name if ep.dist else '?'}) "
                                  f"failed to load: {type(err).__name__}: {err}") from err
            self.pm.register(plugin, name=ep.name)

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object or module at run time (in addition to the entry points)."""
        self.pm.register(plugin, name=name)
        self._forget()

    def unregister(self, plugin: Any) -> None:
        self.pm.unregister(plugin)
        self._forget()

    def _forget(self) -> None:
        for cached in ("methods", "formats", "adapter_formats"):
            self.__dict__.pop(cached, None)
        self.owners.clear()

    @cached_property
    def methods(self) -> dict[str, Method]:
        """Method name -> method, from every plugin's `surgery_methods`."""
        found: dict[str, Method] = {}
        origin: dict[str, str] = {}
        for impl in self.pm.hook.surgery_methods.get_hookimpls():
            for method in impl.function() or []:
                if not isinstance(method, Method):
                    raise PluginError(f"plugin {impl.plugin_name!r} returned {method!r} from surgery_methods, not a surgery.Method")
                if method.name in found:
                    raise PluginError(f"method {method.name!r} is provided by both {origin[method.name]!r} and {impl.plugin_name!r}")
                found[method.name], origin[method.name] = method, impl.plugin_name
                self.owners[id(method)] = impl.plugin_name
        return found

    @cached_property
    def formats(self) -> list[WeightFormat]:
        """Every weight format, highest priority first."""
        found: list[WeightFormat] = []
        for impl in self.pm.hook.surgery_weight_formats.get_hookimpls():
            for fmt in impl.function() or []:
                if not isinstance(fmt, WeightFormat):
                    raise PluginError(f"plugin {impl.plugin_name!r} returned {fmt!r} from surgery_weight_formats, not a WeightFormat")
                found.append(fmt)
                self.owners[id(fmt)] = impl.plugin_name
        return sorted(found, key=lambda f: -f.priority)

    @cached_property
    def adapter_formats(self) -> dict[str, "AdapterFormat"]:
        """Format name -> adapter file format, from every plugin's `surgery_adapter_formats`."""
        found: dict[str, AdapterFormat] = {}
        for impl in self.pm.hook.surgery_adapter_formats.get_hookimpls():
            for fmt in impl.function() or []:
                if fmt.name in found or fmt.name == "surgery":
                    raise PluginError(f"adapter format {fmt.name!r} of plugin {impl.plugin_name!r} is already provided")
                found[fmt.name] = fmt
        return found

    def adapter_format(self, name: str) -> "AdapterFormat":
        if name not in self.adapter_formats:
            known = ", ".join(["surgery", *sorted(self.adapter_formats)])
            raise PluginError(f"no plugin provides adapter format {name!r}; known: {known}")
        return self.adapter_formats[name]

    def rule_dirs(self) -> list[Path]:
        return [Path(d) for dirs in self.pm.hook.surgery_rule_dirs() for d in dirs or []]

    def method(self, name: str) -> Method:
        if name not in self.methods:
            raise PluginError(f"no plugin provides method {name!r}; installed methods: {', '.join(sorted(self.methods)) or 'none'}")
        return self.methods[name]

    def format_of(self, module: nn.Module) -> WeightFormat | None:
        """The first (highest-priority) format that recognises `module`, or None."""
        for fmt in self.formats:
            if fmt.matches(module):
                return fmt
        return None

    def plugins(self) -> list[tuple[str, list[str], list[str]]]:
        """(plugin name, its methods, its formats) for every registered plugin."""
        methods, formats = self.methods.values(), self.formats
        return [(name, [m.name for m in methods if self.owners.get(id(m)) == name],
                 [f.name for f in formats if self.owners.get(id(f)) == name]) for name, _ in self.pm.list_name_plugin()]


_REGISTRY: Registry | None = None


def manager() -> Registry:
    """The process-wide registry, created (and entry points loaded) on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin (module or object with `@surgery.hookimpl` functions) for this process."""
    manager().register(plugin, name=name)
