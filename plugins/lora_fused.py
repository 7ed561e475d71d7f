"""The fused LoRA linear: `x @ W.T + b + dropout(x) @ A.T @ B.T * scale` as one autograd function.

Against a plain module composition it saves kernels and memory: the LoRA update is accumulated into the base
output in place (addmm), the input gradient of base and branch is one matmul plus one in-place addmm, and with
dropout the mask is not stored but regenerated in backward from a per-call seed, so no copy of the layer input
is kept alive. Used by LoraBranch when it is the only branch at a plain nn.Linear site (not under torch.compile,
which fuses the plain composition itself).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_GENERATORS: dict[torch.device, torch.Generator] = {}


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p)) drawn from `seed`: the same seed gives the same mask."""
    generator = _GENERATORS.get(device)
    if generator is None:
        generator = _GENERATORS[device] = torch.Generator(device=device)
    generator.manual_seed(seed)
    keep = torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=generator)
    return keep.mul_(1.0 / (1.0 - p))


class LoraLinear(torch.autograd.Function):
    """Forward and backward of a frozen-or-not linear plus its LoRA branch, sharing matmuls."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float, p: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        xd = x2 * dropout_mask(x2.shape, p, seed, x.device, x.dtype) if p > 0 else x2
        y = F.linear(x2, weight, bias)
        h = xd @ a.t()
        y.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scale, ctx.p, ctx.seed, ctx.has_bias = scale, p, seed, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        x, weight, a, b, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh = dy2 @ (b * ctx.scale)
        mask = dropout_mask(x2.shape, ctx.p, ctx.seed, x.device, x.dtype) if ctx.p > 0 else None
        dx = dw = dbias = da = db = None
        if need_b:
            db = (dy2.t() @ h).mul_(ctx.scale)
        if need_a:
            da = dh.t() @ (x2 * mask if mask is not None else x2)
        if need_x:
            if mask is None:
                dx = torch.addmm(dy2 @ weight, dh, a) if not need_w else (dy2 @ weight).addmm_(dh, a)
            else:
                dx = (dh @ a).mul_(mask).addmm_(dy2, weight)
            dx = dx.view(x.shape)
        if need_w:
            dw = dy2.t() @ x2
        if need_bias and ctx.has_bias:
            dbias = dy2.sum(0)
        return dx, dw, dbias, da, db, None, None
