"""y = x @ W.T + b + s · h @ B.T: a base linear and its LoRA update (h = x @ A.T already computed), in one call.

Two ways, the same numbers to rounding:
- cuBLAS: F.linear, then addmm_ of the update into its output. The addmm_ reads and writes the whole output once
  more (4 bytes per element in bf16): most of what a mixed batch's update costs (docs/performance.md).
- the kernel (kernels.py, `_linear_update_kernel`): one GEMM whose accumulator starts from the update, so the
  output is written once. cuBLAS is the faster GEMM on some shapes, so neither wins everywhere.

`linear_update` times both once per shape on the GPU at hand (tiles.py: tokens in power-of-two buckets, out, in,
rank, dtype, bias; the kernel with each of its candidate tiles) and keeps the faster. Where the kernels don't serve
(the caller's `serve`, from dispatch.kernels_serve; operands of other dtypes; a strided operand) or tuning is off,
cuBLAS. Used wherever a LoRA output is the base's plus an update added in place: fused.inference (unmerged),
shared.py's members, the routed joined form (routes.py) and its groups.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from surgery_plugins.lora import kernels, tiles

KIND = "update"


def linear_update(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
                  b: torch.Tensor, s: float, serve: bool) -> torch.Tensor:
    """x @ weight.T + bias + s · h @ b.T for x [T, in], weight [out, in], h [T, r], b [out, r]; a new [T, out].
    `serve`: whether the kernels serve x and rank r (dispatch.kernels_serve)."""
    config = _config(x, weight, bias, h, b, s) if serve and serves(x, weight, h, b) else None
    if config is None or "cublas" in config:
        return F.linear(x, weight, bias).addmm_(h, b.t(), alpha=s)
    return kernels.linear_update(x, weight, bias, h, b, s, config)


def serves(x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernel takes these operands: all in x's dtype, weight contiguous, x, h and b with unit column
    stride."""
    return (weight.dtype == h.dtype == b.dtype == x.dtype and weight.is_contiguous()
            and x.stride(1) == h.stride(1) == b.stride(1) == 1)


def bucket(tokens: int) -> int:
    """The power of two at or above `tokens`: calls whose token counts share it share a choice."""
    return 1 << max(tokens - 1, 0).bit_length()


def _config(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, b: torch.Tensor,
            s: float) -> dict | None:
    """The chosen way for this call's shape (a tiles.CANDIDATES["update"] entry), or None: cuBLAS, untimed."""
    if not tiles.enabled(x.device):
        return None
    key = (x.dtype, bucket(x.shape[0]), weight.shape[0], weight.shape[1], h.shape[1], bias is not None)

    def trial(config: dict):  # on this call's own tensors, into a scratch output: nothing is written to them
        if "cublas" in config:
            return lambda: F.linear(x, weight, bias).addmm_(h, b.t(), alpha=s)
        return lambda: kernels.linear_update(x, weight, bias, h, b, s, config)
    return tiles.choose(KIND, key, trial, tiles.cache_file(x.device))
