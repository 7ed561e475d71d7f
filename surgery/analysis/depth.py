"""Depth-reduced views of models with repeated blocks, and structural signatures for caching.

A long `nn.ModuleList` of blocks is temporarily cut down to one representative per distinct structure (class,
submodule classes, parameter and buffer shapes), in the original order. Paths found on the reduced model are
expanded back to every block that the representative stands for.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn


def structure(module: nn.Module) -> tuple:
    """A hashable key of a module's structure: classes of all submodules, shapes and dtypes of all tensors."""
    modules = tuple((name, type(m).__module__, type(m).__qualname__) for name, m in module.named_modules())
    tensors = tuple((name, tuple(t.shape), str(t.dtype))
                    for name, t in list(module.named_parameters()) + list(module.named_buffers()))
    return modules, tensors


def sharing(module: nn.Module) -> tuple:
    """Which module and parameter names are aliases of one object (tied weights, shared modules)."""
    def pattern(items: list[tuple[str, object]]) -> tuple:
        first: dict[int, str] = {}
        aliases = []
        for name, obj in items:
            owner = first.setdefault(id(obj), name)
            if owner != name:
                aliases.append((name, owner))
        return tuple(aliases)

    modules = pattern(list(module.named_modules(remove_duplicate=False)))
    params = pattern(list(module.named_parameters(remove_duplicate=False)))
    return modules, params


@dataclass(frozen=True)
class Reduction:
    """Which original list indices each kept index stands for, per reduced ModuleList (keyed by reduced path)."""

    groups: dict[str, tuple[tuple[int, ...], ...]]

    def expand(self, path: str, fixed: dict[str, int] | None = None) -> list[tuple[str, dict[str, int]]]:
        """Original paths of a reduced-model path, each with its choice of index per reduced list.

        `fixed` pins choices (from expanding a related path), so that paths within one block expand together.
        """
        results: list[tuple[list[str], dict[str, int]]] = [([], {})]
        prefix = ""
        for part in path.split(".") if path else []:
            choices = self.groups.get(prefix)
            if choices is not None and part.isdigit() and int(part) < len(choices):
                options = choices[int(part)]
                if fixed and prefix in fixed and fixed[prefix] in options:
                    options = (fixed[prefix],)
                results = [(parts + [str(j)], {**picked, prefix: j}) for parts, picked in results for j in options]
            else:
                results = [(parts + [part], picked) for parts, picked in results]
            prefix = f"{prefix}.{part}" if prefix else part
        return [(".".join(parts), picked) for parts, picked in results]


def _reducible(members: list[nn.Module]) -> bool:
    return len(members) >= 2 and all(next(m.parameters(), None) is not None for m in members)


@contextlib.contextmanager
def reduced_depth(model: nn.Module) -> Iterator[Reduction]:
    """Temporarily keep one representative block per distinct structure in every repeated ModuleList."""
    saved: list[tuple[nn.ModuleList, dict]] = []
    groups: dict[str, tuple[tuple[int, ...], ...]] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, nn.ModuleList) and id(child) not in seen:
                members = list(child._modules.values())
                if _reducible(members):
                    by_key: dict[tuple, list[int]] = {}
                    for i, member in enumerate(members):
                        by_key.setdefault(structure(member), []).append(i)
                    if len(by_key) < len(members):
                        kept = sorted(by_key.values(), key=lambda ids: ids[0])
                        saved.append((child, child._modules))
                        child._modules = {str(k): members[ids[0]] for k, ids in enumerate(kept)}
                        groups[child_path] = tuple(tuple(ids) for ids in kept)
            visit(child, child_path)

    try:
        visit(model, "")
        yield Reduction(groups)
    finally:
        for module_list, modules in reversed(saved):
            module_list._modules = modules
