"""The Host: the module the engine swaps in at an adapted site. It runs the frozen base module and the active
branches around it; the base module object is kept untouched and put back on detach."""
from __future__ import annotations

from typing import Any

from torch import nn

from surgery.method import Branch


class Host(nn.Module):
    """Wraps `base` (the original module) and the branches of every attachment at this site, by name.

    Branches run in attachment order: each active, unmerged branch may change the call's inputs
    (`adapt_call`), then the base runs (or the last running branch that `replaces_base`), then each may change
    the output (`adapt_output`).
    Attribute reads the Host does not know fall through to the base (`host.weight` is `base.weight`).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.branches = nn.ModuleDict()
        self.running: tuple[str, ...] = ()  # active and unmerged branch names, in order; set by the ledger

    def add(self, name: str, branch: Branch) -> None:
        self.branches[name] = branch

    def remove(self, name: str) -> Branch:
        return self.branches.pop(name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        running = [self.branches[n] for n in self.running]
        call = self.base
        for branch in running:
            args, kwargs = branch.adapt_call(args, kwargs)
            if branch.replaces_base:
                call = branch
        out = call(*args, **kwargs)
        for branch in running:
            out = branch.adapt_output(args, kwargs, out)
        return out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "branches"):
                raise
            return getattr(self.base, name)

    def extra_repr(self) -> str:
        return f"running={list(self.running)}"
