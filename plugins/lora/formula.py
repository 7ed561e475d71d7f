"""The formula of LoRA (Hu et al. 2021), in plain torch: what every path of this package computes, and the
reference every fast path is tested against in float64.

A linear-like module with weight W [out, in] and bias b gets a pair A [r, in], B [out, r] and a scale s:

    s  = alpha / r            (alpha / sqrt(r) with rsLoRA)                          `scale`
    y  = base(x) + s · B(A(dropout(x)))                                               `output`, `update`
    ΔW = s · B @ A            merged: y = x @ (W + ΔW).T + b, without dropout         `delta_weight`

On a fused projection (q, k and v in one matrix) each selected role has its own pair, added to that role's
output channels only: y[..., c] += s · B(A(dropout(x))) for the channels c of the role (`output` with
`channels`); merged, its ΔW goes to those rows of W.

An embedding (table E [num, dim], ids i) gets A [r, num] and B [dim, r], both read by id:
y = E[i] + s · A.T[i] @ B.T (`embedding_output`), and ΔW = s · B @ A in the dense [dim, num] view.

Stacked MoE experts (one weight W [E, out, in], token t routed to expert e computing x_t @ W[e].T) get one pair
per expert, A [E, r, in] and B [E, out, r], applied in weight space as HF PEFT's `target_parameters` does: the
module reads W + ΔW with ΔW[e] = s · B[e] @ A[e] (`expert_weight`), so each token routed to e gets
x_t @ W[e].T + s · B[e](A[e](x_t)). Dropout has no place in it (x is not seen). On a fused gate_up a role's pair
covers that role's output channels (dimension 1) only.

A linear weight that its module reads itself instead of calling a linear (nn.MultiheadAttention's in_proj_weight
and out_proj.weight: sites of kind `weight`) gets the same pair applied the same way: the module reads W + ΔW
(`linear_weight`), so y = x @ (W + s · B @ A).T + b, the plain formula without dropout.

Per-sample routing and combination use the pair with the scale folded into B: s · B (`folded_b`).

The scale is `scale(...)`, kept by each branch as `branch.scale`. In plain torch it is applied here and nowhere
else; the fast paths (chosen in dispatch.py) are given `branch.scale` as an argument and apply it inside their
fused matmuls (as alpha) or kernels (as a constant), where the same formula needs it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def scale(alpha: float, r: int, rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / (math.sqrt(r) if rslora else r)


def update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
           dropout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """s · B(A(dropout(x))), in the pair's dtype."""
    x = x.to(a.dtype)
    if dropout is not None:
        x = dropout(x)
    return F.linear(F.linear(x, a), b) * s


def output(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
           dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
           channels: torch.Tensor | None = None) -> torch.Tensor:
    """The base output `out` of input `x` plus the update, in out's dtype: on every output channel, or on
    `channels` only (a role's slice of a fused projection)."""
    delta = update(x, a, b, s, dropout).to(out.dtype)
    if channels is None:
        return out + delta
    return out.index_add(-1, channels, delta)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
           s: float, mask: torch.Tensor | float | None = None) -> torch.Tensor:
    """A LoRA-adapted nn.Linear as a whole: x @ W.T + b + s · B(A(x · mask)), where `mask` stands for dropout
    (the keep mask divided by the keep probability; None: no dropout)."""
    return F.linear(x, weight, bias) + update(x if mask is None else x * mask, a, b, s)


def delta_weight(a: torch.Tensor, b: torch.Tensor, s: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = s · B @ A [out, in]; with `weight`, W + ΔW in one addmm (a new tensor: W is read, not written)."""
    if weight is None:
        return (b @ a) * s
    return torch.addmm(weight, b, a, alpha=s)


def folded_b(b: torch.Tensor, s: float) -> torch.Tensor:
    """s · B: the pair with its scale folded into B (ΔW = folded_b @ A)."""
    return b * s


def embedding_output(out: torch.Tensor, ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
                     padding_idx: int | None) -> torch.Tensor:
    """The embedding `out` of `ids` plus s · A.T[ids] @ B.T, in out's dtype."""
    after_a = F.embedding(ids, a.T, padding_idx=padding_idx)
    return out + (after_a @ b.T * s).to(out.dtype)


def linear_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
                  channels: torch.Tensor | None = None) -> torch.Tensor:
    """W + ΔW for a linear weight W [out, in] that its module reads itself (nn.MultiheadAttention's in_proj), on
    every output channel or on `channels` only (a new tensor, in W's dtype): merged LoRA, applied on each read."""
    if channels is None:
        return torch.addmm(weight, b.to(weight.dtype), a.to(weight.dtype), alpha=s)
    return weight.index_add(0, channels, delta_weight(a, b, s).to(weight.dtype))


def expert_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
                  channels: torch.Tensor | None = None) -> torch.Tensor:
    """W + ΔW for stacked experts, W [E, out, in], A [E, r, in], B [E, out, r]: ΔW[e] = s · B[e] @ A[e], added to
    every output channel or to `channels` only (a new tensor, in W's dtype)."""
    if channels is None:
        return torch.baddbmm(weight, b.to(weight.dtype), a.to(weight.dtype), alpha=s)
    return weight.index_add(1, channels, (torch.bmm(b, a) * s).to(weight.dtype))
