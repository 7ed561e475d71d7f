"""`copy`: train a full copy of a module in place of the frozen original (HF PEFT's `modules_to_save`, e.g. a
classification head). The original stays untouched; detach and unmerge bring it back. Merging an attachment keeps
the copy running (it has no weight edit); bake puts the copy in the original's place."""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

import surgery
from surgery.plugin import Branch, Method, MethodParams, Site


class CopyParams(MethodParams):
    """No parameters: the copy starts equal to the original."""


class ModuleCopy(Branch):
    """A trainable deep copy of the base module, called instead of it."""

    replaces_base = True
    kept_when_merged = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(base)
        self.module.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def baked_module(self) -> nn.Module:
        return self.module


class Copy(Method):
    name = "copy"
    params = CopyParams
    kinds = frozenset({"linear", "conv1d", "embedding"})
    mergeable = False

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        return ModuleCopy(module)

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        return (site.in_features or 0) * (site.out_features or 0) + (site.out_features or 0) * site.bias


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [Copy()]
