"""The fused LoRA linear: `x @ W.T + b + s · B(A(dropout(x)))` (formula.linear) as one autograd function.

Against a plain module composition it saves kernels and memory: the LoRA update is accumulated into the base
output in place (addmm), the input gradient of base and branch is one matmul plus one in-place addmm, in the
order update_first.py takes for y (the LoRA term first on wide inputs, cuBLAS adding dy @ W onto it; or, for a
layer wider in than out, one matmul over [dy | dh] and [W; A], which moves fewer bytes than updating dx), and
no copy of the layer input is made for backward: with dropout the mask is drawn again in backward (by the
kernels of kernels.py, or by replaying torch's dropout from the saved random state; inside a CUDA graph capture,
where that state cannot be read, torch's mask is kept), and an input that is a product autograd keeps anyway is
kept as its factors (saved_input.py). With `merged`, dx comes through the merged weight W + s·B @ A built in
backward (merged_weight.py). y never does here: a merged bf16 weight rounds the update into the weight, which made
the logits less accurate than PEFT's against float64, where y = x @ W.T + b + s·h @ B.T rounds it into the output
once (docs/performance.md, bf16 accuracy). Where autograd records nothing and there is no dropout, `inference`
computes the same output by plain ops, through the merged weight where it pays.

dispatch.py decides when this runs and with which of kernels, merged weight and saved factors; nothing here
checks a condition of its own (the one choice left, dx from one widened matmul for a layer wider in than out,
is a layout of the same product).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from surgery_plugins.lora import kernels, merged_weight, update_first
from surgery_plugins.lora.saved_input import restored


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted dropout in one fused kernel: (dropped x, keep mask)."""
    return torch.native_dropout(x, p, True)


def capturing(device: torch.device) -> bool:
    """Whether work on `device` is being captured in a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def replay_dropout(x: torch.Tensor, p: float, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's dropout again, from the random-number state it started with (the live state is untouched)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        if devices:
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return dropout(x, p)


def inference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
              s: float, merged: bool, one_pass: bool) -> torch.Tensor:
    """`LoraLinear`'s output without autograd and dropout, by the same plain ops and without the autograd
    function's per-call cost: through the merged weight (built by the kernel with `one_pass`), or the base
    matmul and the update in the order update_first.py takes for the shape."""
    x2 = x.reshape(-1, x.shape[-1])
    if merged:
        y = F.linear(x2, merged_weight.merged(weight, a, b, s, one_pass), bias)
    else:
        y = update_first.linear(x2, weight, bias, x2 @ a.t(), b, s)
    return y.view(*x.shape[:-1], y.shape[-1])


class LoraLinear(torch.autograd.Function):
    """Forward and backward of a frozen-or-not linear plus its LoRA branch, sharing matmuls.

    After the tensors and the scale s comes the dispatch's `path` (dispatch.Path): its `p` the dropout rate,
    `saved` what to keep of x for backward ((x,) or its factors), `kernels` the Triton kernels for the passes
    over x, `merged` the merged weight for dx (p = 0 only). `weight` is a tensor, or a quantized layer's
    (quantized_base.QuantizedWeight), dequantized here in forward and again in backward where dx is needed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, s: float, path: Any) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        p, saved, use_kernels = path.p, path.saved, path.kernels
        ctx.kernels, ctx.merged = use_kernels, path.merged
        ctx.quantized = None if isinstance(weight, torch.Tensor) else weight
        if ctx.quantized is not None:
            weight = ctx.quantized()  # dense for this call only: backward dequantizes again
        ctx.seed = kernels.new_seed(x.device) if use_kernels and p > 0 else 0
        # torch's dropout is drawn again in backward from the random state it started with; inside a CUDA graph
        # capture, where that state cannot be read, its mask is kept instead
        torch_dropout = p > 0 and not use_kernels
        keep = torch_dropout and capturing(x.device)
        ctx.rng = rng_state(x.device) if torch_dropout and not keep else None
        mask = None
        if p > 0 and use_kernels:
            h = kernels.dropped_down(x2, a, 1, p, ctx.seed)
        elif torch_dropout:
            dropped, mask = dropout(x2, p)
            h = dropped @ a.t()
        else:
            h = x2 @ a.t()
        y = update_first.linear(x2, weight, bias, h, b, s)
        ctx.save_for_backward(weight if ctx.quantized is None else None, a, b, h, mask if keep else None, *saved)
        ctx.scale, ctx.p, ctx.has_bias, ctx.shape = s, p, bias is not None, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor):
        weight, a, b, h, kept_mask, *saved = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        if need_x and ctx.quantized is not None:
            weight = ctx.quantized()
        d_in = ctx.shape[-1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh = torch.addmm(h, dy2, b, beta=0, alpha=ctx.scale)  # dy @ B * s in one call (h: any [M, r], unread)
        dx = dw = dbias = da = db = None
        if need_b:
            db = torch.addmm(b, dy2.t(), h, beta=0, alpha=ctx.scale)  # dy.T @ h * s (b unread)
        if need_x and ctx.merged:
            dx = dy2 @ merged_weight.merged(weight, a, b, ctx.scale, one_pass=False)
        elif need_x and ctx.p == 0 and dy2.shape[0] * (d_in - dy2.shape[1]) > weight.numel():
            dx = torch.cat([dy2, dh], dim=1) @ torch.cat([weight, a])  # wide in: one matmul beats updating dx
        if ctx.kernels:  # dA (and the masked part of dx) in one pass over x, or over its two factors
            factors = tuple(t.reshape(-1, d_in) for t in saved)
            update, first = None, False
            if need_x and dx is None:  # the kernel writes the (masked) LoRA term, or adds it in place
                first = update_first.update_first(dy2.shape[0], d_in)
                dx = update = dy2.new_empty(dy2.shape[0], d_in) if first else dy2 @ weight
            if need_a or update is not None:
                da = kernels.input_grads(factors, dh, a, 1, ctx.p, ctx.seed, update, first).to(a.dtype)
            if first:  # the base term added onto the LoRA term, as update_first.linear orders y
                dx.addmm_(dy2, weight)
            x2 = restored(factors) if need_w else None
        else:
            x2 = restored(saved).reshape(-1, d_in)
            if kept_mask is not None:
                xd, mask = torch.ops.aten.native_dropout_backward(x2, kept_mask, 1.0 / (1.0 - ctx.p)), kept_mask
            else:
                xd, mask = replay_dropout(x2, ctx.p, ctx.rng) if ctx.p > 0 else (x2, None)
            if need_a:
                da = dh.t() @ xd
            del xd
            if need_x and dx is None:
                if mask is not None:
                    dx = torch.ops.aten.native_dropout_backward(dh @ a, mask, 1.0 / (1.0 - ctx.p)).addmm_(dy2, weight)
                elif update_first.update_first(dy2.shape[0], d_in):
                    dx = (dh @ a).addmm_(dy2, weight)
                else:
                    dx = (dy2 @ weight).addmm_(dh, a)
        if dx is not None:
            dx = dx.view(ctx.shape)
        if need_w:
            dw = dy2.t() @ x2
        if need_bias and ctx.has_bias:
            dbias = dy2.sum(0)
        return dx, dw, dbias, (da if need_a else None), db, None, None
