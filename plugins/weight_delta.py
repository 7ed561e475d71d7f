"""What LoHa and LoKr share: a branch adding `x @ ΔW^T` for a ΔW [out, in] that its method builds from small
factors, LyCORIS's rank and module dropout, role slices of fused projections, and the merge `W ± ΔW`.

A method subclasses `DeltaMethod` and gives `part` (a `DeltaBranch` whose `delta_weight()` is the formula) and
`part_count`. On a fused projection selected by role, the branch is one part per role, each adding its ΔW to
that role's output channels only.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from surgery.plugin import (
    Branch,
    Method,
    MethodParams,
    Site,
    SlicedBranch,
    WeightEdit,
    branch_dtype,
    input_of,
    module_device,
)


class LycorisParams(MethodParams):
    """`r`: rank; `alpha`: scale numerator (scale = alpha / r, as LyCORIS and HF PEFT); `rank_dropout`: in training,
    drop rows of ΔW with this probability; `module_dropout`: in training, skip the whole branch with this
    probability; `dtype`: the factors' dtype (default: the base weight's)."""

    r: int = Field(8, gt=0)
    alpha: float = 8.0
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class DeltaBranch(Branch):
    """`y + x @ ΔW^T`, on every output channel or, with `channels`, on those only. Subclasses give `delta_weight()`
    (ΔW [out, in], scale included). In training, `rank_dropout` zeroes rows of ΔW (rescaled by the kept share if
    `rank_dropout_scale`) and `module_dropout` skips the branch, as HF PEFT's LyCORIS layers do."""

    def __init__(self, params: LycorisParams, rank_dropout_scale: bool, channels: torch.Tensor | None):
        super().__init__()
        self.scale = params.scale
        self.rank_dropout, self.rank_dropout_scale = params.rank_dropout, rank_dropout_scale
        self.module_dropout = params.module_dropout
        self.register_buffer("channels", channels, persistent=False)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _training_delta(self) -> torch.Tensor:
        w = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            keep = (torch.rand(w.shape[0], device=w.device) > self.rank_dropout).to(w.dtype)
            if self.rank_dropout_scale:
                keep = keep / keep.mean()
            w = w * keep[:, None]
        return w

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        w = self._training_delta()
        delta = F.linear(input_of(args, kwargs).to(w.dtype), w)
        if self.training and self.module_dropout > 0:
            delta = delta * (torch.rand((), device=w.device) > self.module_dropout).to(w.dtype)
        delta = delta.to(out.dtype)
        return out + delta if self.channels is None else out.index_add(-1, self.channels, delta)


class SlicedDeltaBranch(SlicedBranch):
    """One `DeltaBranch` per selected role of a fused projection (e.g. only q and v of GPT-2's c_attn)."""


def sliced_roles(site: Site, roles: frozenset[str]) -> list[str]:
    """The selected roles that are slices of a fused projection ([] means: the whole module)."""
    return sorted(r for r in roles if r in site.slices)


def role_channels(site: Site, role: str) -> list[int]:
    return [c for a, b in site.channels(role) for c in range(a, b)]


class DeltaMethod(Method):
    """A method whose branch adds a ΔW built from factors: subclasses give `part` and `part_count`."""

    kinds = frozenset({"linear", "conv1d", "quantized_linear"})
    mergeable = True

    def part(self, in_features: int, out_features: int, params: Any, dtype: torch.dtype, device: torch.device,
             channels: torch.Tensor | None) -> DeltaBranch:
        raise NotImplementedError

    def part_count(self, in_features: int, out_features: int, params: Any) -> int:
        raise NotImplementedError

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        dtype, device = branch_dtype(params.dtype, site.dtype), module_device(module)
        sliced = sliced_roles(site, roles)
        if not sliced:
            return self.part(site.in_features, site.out_features, params, dtype, device, None)
        parts = {}
        for role in sliced:
            channels = torch.tensor(role_channels(site, role), device=device)
            parts[role.rsplit(".", 1)[-1]] = self.part(site.in_features, channels.numel(), params, dtype, device, channels)
        return SlicedDeltaBranch(parts)

    def channel_lists(self, site: Site, roles: frozenset[str]) -> list[list[int]]:
        """The output channels of each selected role slice ([] for the whole module)."""
        return [role_channels(site, r) for r in sliced_roles(site, roles)]

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        sliced = sliced_roles(site, roles)
        if not sliced:
            return self.part_count(site.in_features, site.out_features, params)
        return sum(self.part_count(site.in_features, len(role_channels(site, r)), params) for r in sliced)

    def merge_edit(self, site: Site, module: nn.Module, branch: Branch) -> WeightEdit:
        parts = list(branch.parts.values()) if isinstance(branch, SlicedDeltaBranch) else [branch]
        with torch.no_grad():
            deltas = [(p.channels, p.delta_weight().detach().clone()) for p in parts]

        def shift(weight: torch.Tensor, sign: float) -> torch.Tensor:
            wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
            for channels, delta in deltas:
                delta = delta.to(wide.dtype) * sign
                wide = wide + delta if channels is None else wide.index_add(0, channels, delta)
            return wide.to(weight.dtype)

        return WeightEdit(apply=lambda w: shift(w, 1.0), revert=lambda w: shift(w, -1.0), form="add")
