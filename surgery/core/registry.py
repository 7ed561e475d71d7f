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
    from surgery.core.formats import AdapterFormat, PeftMapping


class Registry:
    """One pluggy PluginManager plus the methods, weight formats and rule directories its plugins return.

    Every hook is called through `pm.hook`, so pluggy's ordering (`tryfirst`/`trylast`, later registrations first)
    and hook wrappers apply. Which plugin gave what (for messages and `surgery plugins`) is read by calling the
    hook on each plugin alone (`pm.subset_hook_caller`)."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
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
        for cached in ("methods", "formats", "adapter_formats", "peft_mappings", "rule_dir_owners"):
            self.__dict__.pop(cached, None)

    # ---- calling hooks ----------------------------------------------------------------------------------------
    def _call(self, hook: str) -> list[Any]:
        """Everything the plugins return from `hook` (each returns a list), flattened, in pluggy's call order."""
        return [item for result in getattr(self.pm.hook, hook)() for item in result or []]

    def by_plugin(self, hook: str) -> dict[str, list[Any]]:
        """Plugin name -> what that plugin alone returns from `hook`, in pluggy's call order (for messages and
        listings; the objects are new ones, not those the registry uses)."""
        impls = list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))  # pluggy calls the last one first
        everyone = [impl.plugin for impl in impls]
        found: dict[str, list[Any]] = {}
        for impl in impls:
            alone = self.pm.subset_hook_caller(hook, [p for p in everyone if p is not impl.plugin])
            found[impl.plugin_name] = [item for result in alone() for item in result or []]
        return found

    def _owners_of(self, hook: str, key: Any, value: Any) -> list[str]:
        return [name for name, items in self.by_plugin(hook).items() if any(key(i) == value for i in items)]

    @cached_property
    def methods(self) -> dict[str, Method]:
        """Method name -> method, from every plugin's `surgery_methods`. One name from two plugins is an error."""
        found: dict[str, Method] = {}
        for method in self._call("surgery_methods"):
            if not isinstance(method, Method):
                owners = [n for n, items in self.by_plugin("surgery_methods").items()
                          if any(not isinstance(i, Method) for i in items)]
                raise PluginError(f"plugin {', '.join(map(repr, owners)) or '?'} returned {method!r} from "
                                  "surgery_methods, not a surgery.Method")
            if method.name in found:
                owners = self._owners_of("surgery_methods", lambda m: getattr(m, "name", None), method.name)
                raise PluginError(f"method {method.name!r} is provided by both {' and '.join(map(repr, owners))}")
            found[method.name] = method
        return found

    @cached_property
    def formats(self) -> list[WeightFormat]:
        """Every weight format in the order they are tried: highest `priority` first, and among equal priorities
        in pluggy's call order (so a `tryfirst` plugin's format is tried before the built-ins)."""
        found: list[WeightFormat] = []
        for fmt in self._call("surgery_weight_formats"):
            if not isinstance(fmt, WeightFormat):
                owners = [n for n, items in self.by_plugin("surgery_weight_formats").items()
                          if any(not isinstance(i, WeightFormat) for i in items)]
                raise PluginError(f"plugin {', '.join(map(repr, owners)) or '?'} returned {fmt!r} from "
                                  "surgery_weight_formats, not a WeightFormat")
            found.append(fmt)
        return sorted(found, key=lambda f: -f.priority)  # stable: call order within a priority

    @cached_property
    def adapter_formats(self) -> dict[str, "AdapterFormat"]:
        """Format name -> adapter file format, from every plugin's `surgery_adapter_formats`."""
        found: dict[str, AdapterFormat] = {}
        for fmt in self._call("surgery_adapter_formats"):
            if fmt.name in found or fmt.name == "surgery":
                owners = self._owners_of("surgery_adapter_formats", lambda f: getattr(f, "name", None), fmt.name)
                raise PluginError(f"adapter format {fmt.name!r} of plugin {' and '.join(map(repr, owners))} "
                                  "is already provided")
            found[fmt.name] = fmt
        return found

    @cached_property
    def peft_mappings(self) -> dict[str, "PeftMapping"]:
        """PEFT type -> mapping, from every plugin's `surgery_peft_mappings`. One type, or one method, mapped by
        two is an error."""
        found: dict[str, PeftMapping] = {}
        writers: dict[str, str] = {}
        for mapping in self._call("surgery_peft_mappings"):
            clash = mapping.peft_type in found or any(m in writers for m in mapping.methods)
            if clash:
                owners = [n for n, items in self.by_plugin("surgery_peft_mappings").items()
                          if any(i.peft_type == mapping.peft_type or set(i.methods) & set(mapping.methods) for i in items)]
                raise PluginError(f"PEFT type {mapping.peft_type!r} (methods {', '.join(sorted(mapping.methods))}) is "
                                  f"mapped by more than one mapping, of {' and '.join(map(repr, owners))}")
            found[mapping.peft_type] = mapping
            writers.update({m: mapping.peft_type for m in mapping.methods})
        return found

    def adapter_format(self, name: str) -> "AdapterFormat":
        if name not in self.adapter_formats:
            known = ", ".join(["surgery", *sorted(self.adapter_formats)])
            raise PluginError(f"no plugin provides adapter format {name!r}; known: {known}")
        return self.adapter_formats[name]

    def rule_dirs(self) -> list[Path]:
        """Rule directories in pluggy's call order: where two declare one rule-set name, the first one wins if
        its plugin asked for it (see `rule_precedence`)."""
        return [Path(d) for d in self._call("surgery_rule_dirs")]

    @cached_property
    def rule_dir_owners(self) -> dict[Path, str]:
        """Resolved rule directory -> the plugin that gives it."""
        return {Path(d).resolve(): name for name, dirs in self.by_plugin("surgery_rule_dirs").items() for d in dirs}

    def overrides(self, winner: Path, loser: Path) -> bool:
        """Whether rule directory `winner` (earlier in call order) may shadow a rule set of `loser`: its plugin's
        `surgery_rule_dirs` is marked `tryfirst`, or the other's `trylast`. Otherwise a clash is an error."""
        owners = self.rule_dir_owners
        marks = {impl.plugin_name: impl for impl in self.pm.hook.surgery_rule_dirs.get_hookimpls()}
        first, second = marks.get(owners.get(winner.resolve(), "")), marks.get(owners.get(loser.resolve(), ""))
        if first is None or second is None or first is second:
            return False
        return (first.tryfirst and not second.tryfirst) or (second.trylast and not first.trylast)

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
        methods, formats = self.by_plugin("surgery_methods"), self.by_plugin("surgery_weight_formats")
        return [(name, [m.name for m in methods.get(name, [])], [f.name for f in formats.get(name, [])])
                for name, _ in self.pm.list_name_plugin()]


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
