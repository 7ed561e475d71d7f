"""LoHa (LyCORIS; Hyeon-Woo et al. 2022, "FedPara"): a low-rank Hadamard product update beside a frozen linear,

    ΔW = (B1 · A1) ⊙ (B2 · A2) · alpha / r        B1, B2: [out, r]    A1, A2: [r, in]

stored as HF PEFT names them (`hada_w1_a` = B1, `hada_w1_b` = A1, `hada_w2_a` = B2, `hada_w2_b` = A2). As PEFT
initialises them: B1, A1, B2 kaiming-uniform and A2 zero, so the update starts at zero. Rank and module dropout
as in `weight_delta`. Merging adds ΔW to the weight; unmerge restores the original bytes.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

import surgery
from surgery.plugin import Method, Site, check_rank
from surgery_plugins.weight_delta import DeltaBranch, DeltaMethod, LycorisParams


class LohaParams(LycorisParams):
    """`r`, `alpha`, `rank_dropout`, `module_dropout`, `dtype` as for every LyCORIS method; `init`: `default` (HF
    PEFT's: A2 zero, so the model starts unchanged) or `random` (every factor kaiming-uniform, PEFT's
    `init_weights=False`)."""

    init: Literal["default", "random"] = "default"


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
               scale: float) -> torch.Tensor:
    """The LoHa formula: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · scale, [out, in]."""
    return (w1_a @ w1_b) * (w2_a @ w2_b) * scale


class LohaPart(DeltaBranch):
    """The four LoHa factors of one weight (or of one role's channels of a fused one)."""

    def __init__(self, in_features: int, out_features: int, params: LohaParams, dtype: torch.dtype,
                 device: torch.device, channels: torch.Tensor | None = None):
        super().__init__(params, rank_dropout_scale=True, channels=channels)
        r = params.r
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        with torch.no_grad():
            for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
                if params.init == "default" and factor is self.hada_w2_b:
                    nn.init.zeros_(factor)
                else:
                    nn.init.kaiming_uniform_(factor, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return loha_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)


class Loha(DeltaMethod):
    name = "loha"
    params = LohaParams

    def part(self, in_features: int, out_features: int, params: Any, dtype: torch.dtype, device: torch.device,
             channels: torch.Tensor | None) -> DeltaBranch:
        return LohaPart(in_features, out_features, params, dtype, device, channels)

    def part_count(self, in_features: int, out_features: int, params: Any) -> int:
        return 2 * params.r * (in_features + out_features)

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        widths = [len(c) for c in self.channel_lists(site, roles)] or [site.out_features]
        check_rank(self.name, site, params.r, min([site.in_features, *widths]))  # at plan time, before allocating
        return super().count(site, params, roles)


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [Loha()]
