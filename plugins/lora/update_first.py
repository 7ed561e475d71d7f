"""y = x @ W.T + b + s · h @ B.T (h = x @ A.T given): the base matmul and then the update added in place, or, for
wide outputs of many tokens, the update computed first and the base matmul added onto it.

The first order, y = x @ W.T + b then y.addmm_(h, B.T), adds the update in a pass of its own: a skinny matmul that
reads and writes all of y, bound by memory. In the other order the skinny matmul writes u = b + s · h @ B.T (the
bias in cuBLAS's epilogue), then `u.addmm_(x, W.T)` runs the base matmul with beta = 1: cuBLAS reads u in the
epilogue of each output tile while other tiles still compute, so most of that read is hidden. It runs in place on u,
so nothing is copied (an out-of-place addmm would copy u into its output first). Both give the same numbers to
rounding.

Which order is faster depends on the shape. On an H200 in bf16 (docs/performance.md, fourth session of 2026-12-06),
as × the base matmul alone, base then update against update first:
- 16384 tokens × 2048 → 2048: 1.28–1.30 against 1.18–1.19;
- 4096 × 4096 → 14336: 1.15 against 1.07;
- 4096 × 4096 → 4096: 1.135 against 1.126;
- narrow outputs (→ 512, → 1024) and few tokens (2048 × 2048 → 2048, a 32-token decode step): update first lost,
  1.24–1.70 against 1.13–1.60.
`update_first` takes the measured wins: outputs of at least FIRST_OUT features and tokens × out of at least
FIRST_ELEMENTS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FIRST_OUT = 2048
FIRST_ELEMENTS = 1 << 25


def update_first(tokens: int, out: int) -> bool:
    """Whether `tokens` rows of an `out`-feature linear take the update first (see the module docstring)."""
    return out >= FIRST_OUT and tokens * out >= FIRST_ELEMENTS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, b: torch.Tensor,
           s: float = 1.0) -> torch.Tensor:
    """x @ weight.T + bias + s · h @ b.T for x [T, in], weight [out, in], h [T, r], b [out, r]: a new [T, out]."""
    if not update_first(x.shape[0], weight.shape[0]):
        return F.linear(x, weight, bias).addmm_(h, b.t(), alpha=s)
    if bias is not None:
        u = torch.addmm(bias, h, b.t(), alpha=s)
    else:  # beta = 0: the empty u is written, not read; s applied in the matmul, not in a pass of its own
        u = h.new_empty(x.shape[0], weight.shape[0]).addmm_(h, b.t(), beta=0, alpha=s)
    return u.addmm_(x, weight.t())
