"""LoKr (LyCORIS; Yeh et al. 2023): a Kronecker-product update beside a frozen linear,

    ΔW = kron(W1, W2) · alpha / r        W1: [out_l, in_m]    W2: [out_k, in_n]

where out = out_l·out_k and in = in_m·in_n are LyCORIS's factorizations (`factorization`: the two factors nearest
the square root, or with `decompose_factor` f one factor f). W2 is stored low-rank, `w2_a @ w2_b` of rank r, when
r < max(out_k, in_n) / 2, else whole; with `decompose_both`, W1 too (`w1_a @ w1_b`, when r < max(out_l, in_m) / 2).
Names and initialisation as in HF PEFT: W1 (or w1_a) zero, the rest kaiming-uniform, so the update starts at zero.
Merging adds ΔW to the weight; unmerge restores the original bytes.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import field_validator
from torch import nn

import surgery
from surgery.plugin import Method
from surgery_plugins.weight_delta import DeltaBranch, DeltaMethod, LycorisParams


class LokrParams(LycorisParams):
    """`r`, `alpha`, `rank_dropout`, `module_dropout`, `dtype` as for every LyCORIS method, and:
    `rank_dropout_scale`: rescale the kept rows by their share (HF PEFT's default: no); `decompose_both`: W1 low-rank
    too; `decompose_factor`: the factor of the Kronecker split (-1: near the square root); `init`: `default` (HF
    PEFT's, the update starts at zero), `random` (every factor kaiming-uniform) or `lycoris` (W2 or w2_b zero, as the
    LyCORIS repository)."""

    rank_dropout_scale: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    init: Literal["default", "random", "lycoris"] = "default"

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("decompose_factor must be -1 or a positive integer")
        return value


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of `dimension` into m <= n with m·n = dimension: m = factor if it divides, else the divisor
    pair nearest the square root with m <= factor (any m for factor -1)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def lokr_shapes(in_features: int, out_features: int, params: LokrParams) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """(W1 shape, W2 shape, W1 whole?, W2 whole?) of a LoKr on a [out, in] weight."""
    out_l, out_k = factorization(out_features, params.decompose_factor)
    in_m, in_n = factorization(in_features, params.decompose_factor)
    whole_w1 = not (params.decompose_both and params.r < max(out_l, in_m) / 2)
    whole_w2 = not (params.r < max(out_k, in_n) / 2)
    return (out_l, in_m), (out_k, in_n), whole_w1, whole_w2


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """The LoKr formula: ΔW = kron(W1, W2) · scale, [out_l·out_k, in_m·in_n]."""
    return torch.kron(w1, w2.contiguous()) * scale


class LokrPart(DeltaBranch):
    """The LoKr factors of one weight (or of one role's channels of a fused one)."""

    def __init__(self, in_features: int, out_features: int, params: LokrParams, dtype: torch.dtype,
                 device: torch.device, channels: torch.Tensor | None = None):
        super().__init__(params, rank_dropout_scale=params.rank_dropout_scale, channels=channels)
        (out_l, in_m), (out_k, in_n), whole_w1, whole_w2 = lokr_shapes(in_features, out_features, params)
        r, kw = params.r, dict(dtype=dtype, device=device)

        def new(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **kw))

        self.whole_w1, self.whole_w2 = whole_w1, whole_w2
        if whole_w1:
            self.lokr_w1 = new(out_l, in_m)
        else:
            self.lokr_w1_a, self.lokr_w1_b = new(out_l, r), new(r, in_m)
        if whole_w2:
            self.lokr_w2 = new(out_k, in_n)
        else:
            self.lokr_w2_a, self.lokr_w2_b = new(out_k, r), new(r, in_n)
        zero = {"default": ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b"), "random": ()}[params.init]
        with torch.no_grad():
            for name, factor in self.named_parameters():
                if name in zero:
                    nn.init.zeros_(factor)
                else:
                    nn.init.kaiming_uniform_(factor, a=math.sqrt(5))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 and W2, each whole or as the product of its two low-rank factors."""
        w1 = self.lokr_w1 if self.whole_w1 else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.whole_w2 else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        return lokr_delta(*self.factors(), self.scale)


class Lokr(DeltaMethod):
    name = "lokr"
    params = LokrParams

    def part(self, in_features: int, out_features: int, params: Any, dtype: torch.dtype, device: torch.device,
             channels: torch.Tensor | None) -> DeltaBranch:
        return LokrPart(in_features, out_features, params, dtype, device, channels)

    def part_count(self, in_features: int, out_features: int, params: Any) -> int:
        (out_l, in_m), (out_k, in_n), whole_w1, whole_w2 = lokr_shapes(in_features, out_features, params)
        w1 = out_l * in_m if whole_w1 else params.r * (out_l + in_m)
        w2 = out_k * in_n if whole_w2 else params.r * (out_k + in_n)
        return w1 + w2


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [Lokr()]
