"""The VeRA method: params, branch, shared projections, merge (the formula is in `vera_delta`)."""
from __future__ import annotations

import math
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
    SurgeryError,
    WeightEdit,
    branch_dtype,
    check_rank,
    input_of,
    module_device,
)


class VeraParams(MethodParams):
    """`r`: the projections' rank (VeRA uses far larger ranks than LoRA: PEFT's default 256); `projection_prng_key`:
    the seed of A and B; `d_initial`: the start value of Λ_d; `dropout` on the branch input; `init`: `default`
    (Λ_b zero, Λ_d = d_initial: PEFT's) or `random` (Λ_b one, Λ_d standard normal: PEFT's `init_weights=False`);
    `dtype`: the vectors' and projections' dtype (default: the base weight's)."""

    r: int = Field(256, gt=0)
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: Literal["default", "random"] = "default"
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's draw of a VeRA projection: uniform(±sqrt(3)·sqrt(2)/sqrt(fan_in)), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, in_features: int, out_features: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared A [r, in_features] and B [out_features, r] of seed `key`, drawn on the CPU in float32 (A first)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return kaiming_uniform((r, in_features), generator), kaiming_uniform((out_features, r), generator)


def vera_delta(a: torch.Tensor, b: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """The formula as a weight: ΔW = (Λ_b B)(Λ_d A), [out, in], for A [r, in], B [out, r]."""
    return (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)


class VeraBranch(Branch):
    """`vera_lambda_b` and `vera_lambda_d` of one site; reads the attachment's A and B from `owner` (the first
    site's branch, which holds them as the buffers `vera_A` and `vera_B`)."""

    def __init__(self, site: Site, params: VeraParams, dtype: torch.dtype, device: torch.device,
                 channels: torch.Tensor | None):
        super().__init__()
        self.r, self.key, self.path = params.r, params.projection_prng_key, site.path
        self.in_features, self.out_features = site.in_features, site.out_features
        width = site.out_features if channels is None else channels.numel()
        if params.init == "default":
            lambda_b, lambda_d = torch.zeros(width), torch.full((params.r,), params.d_initial)
        else:
            lambda_b, lambda_d = torch.ones(width), torch.randn(params.r)
        self.vera_lambda_b = nn.Parameter(lambda_b.to(dtype=dtype, device=device))
        self.vera_lambda_d = nn.Parameter(lambda_d.to(dtype=dtype, device=device))
        self.dropout = nn.Dropout(params.dropout) if params.dropout > 0 else nn.Identity()
        self.register_buffer("channels", channels, persistent=False)
        self.owner: VeraBranch | None = None  # set by the method's attach_model (a plain reference, not a submodule)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "owner":  # another site's branch: not a submodule of this one
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This site's A [r, in] and B [out, r] (B's rows of `channels` on a fused projection)."""
        if self.owner is None:
            raise SurgeryError(f"vera at {self.path!r} has no projections: it is not attached through surgery.attach")
        a, b = self.owner.vera_A[:, :self.in_features], self.owner.vera_B
        b = b[:self.out_features] if self.channels is None else b[self.channels]
        return a.to(self.vera_lambda_d.dtype), b.to(self.vera_lambda_b.dtype)

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        a, b = self.sliced()
        x = self.dropout(input_of(args, kwargs).to(self.vera_lambda_d.dtype))
        delta = (self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)).to(out.dtype)
        return out + delta if self.channels is None else out.index_add(-1, self.channels, delta)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.sliced()
        return vera_delta(a, b, self.vera_lambda_d, self.vera_lambda_b)


class Unshare:
    """Undo of `Vera.attach_model`: the branches forget the projections. A plain object, not a closure, so it
    follows the model through `copy.deepcopy`."""

    def __init__(self, branches: list[VeraBranch]):
        self.branches = branches

    def __call__(self) -> None:
        for branch in self.branches:
            branch.owner = None
        owner = self.branches[0]
        for name in ("vera_A", "vera_B"):
            if hasattr(owner, name):
                delattr(owner, name)


RANK_FACTOR = 4
"""VeRA's r may be at most this many times the widest side of a site (PEFT's default 256 on a 64-wide model): the
shared random projections are r x in and out x r, so r is what their memory grows with."""


class Vera(Method):
    name = "vera"
    params = VeraParams
    kinds = frozenset({"linear", "conv1d", "quantized_linear"})
    mergeable = True

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        sliced = sorted(r for r in roles if r in site.slices)
        device = module_device(module)
        channels = torch.tensor([c for r in sliced for a, b in site.channels(r) for c in range(a, b)],
                                device=device) if sliced else None
        return VeraBranch(site, params, branch_dtype(params.dtype, site.dtype), device, channels)

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        sliced = [r for r in roles if r in site.slices]
        width = sum(b - a for r in sliced for a, b in site.channels(r)) if sliced else site.out_features
        # A and B (frozen, r x in and out x r) are drawn at attach: r is bounded before they are allocated
        check_rank(self.name, site, params.r, RANK_FACTOR * max(site.in_features, site.out_features),
                   f"{RANK_FACTOR} x max(in, out)")
        return width + params.r

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Unshare:
        """Draw the attachment's A and B for its largest widths; the first branch holds them, every branch reads
        them there."""
        vera = list(branches.values())
        seeds = {(b.r, b.key) for b in vera}
        if len(seeds) != 1:
            raise SurgeryError(f"vera: the sites of one attachment share A and B, so they need one r and one "
                               f"projection_prng_key; this rule set gives (r, key) {', '.join(map(str, sorted(seeds)))}")
        r, key = seeds.pop()
        a, b = projections(r, max(v.in_features for v in vera), max(v.out_features for v in vera), key)
        owner = vera[0]
        like = owner.vera_lambda_d
        owner.register_buffer("vera_A", a.to(dtype=like.dtype, device=like.device))
        owner.register_buffer("vera_B", b.to(dtype=like.dtype, device=like.device))
        for branch in vera:
            branch.owner = owner
        return Unshare(vera)

    def merge_edit(self, site: Site, module: nn.Module, branch: Branch) -> WeightEdit:
        with torch.no_grad():
            delta = branch.delta_weight().detach().clone()
        channels = branch.channels

        def shift(weight: torch.Tensor, sign: float) -> torch.Tensor:
            wide = weight.to(torch.promote_types(weight.dtype, torch.float32))
            step = delta.to(wide.dtype) * sign
            return (wide + step if channels is None else wide.index_add(0, channels, step)).to(weight.dtype)

        return WeightEdit(apply=lambda w: shift(w, 1.0), revert=lambda w: shift(w, -1.0), form="add")
