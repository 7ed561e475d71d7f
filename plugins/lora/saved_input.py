"""How the fused LoRA linear keeps its layer input for backward (dA = dh.T @ x needs it) without a copy of its own.

When the input is the fresh, unmodified product u * v of two same-shaped tensors that autograd keeps anyway
(its multiplication node saved both, e.g. an MLP's act(gate) * up feeding the down projection), the function
keeps u and v, which costs no memory, and multiplies them again in backward (or reads both in its kernel),
instead of keeping x, which would be one more activation of the layer's full width alive per layer.
Anything else is kept as itself. Whether to keep the factors is decided in dispatch.py (`kept`): not under
saved-tensor hooks, since activation checkpointing or offloading manage saved tensors themselves.
"""
from __future__ import annotations

import torch


def hooks_active() -> bool:
    """Whether saved-tensor hooks (checkpointing, offloading) are installed."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def factors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(u, v) with x == u * v as computed and unchanged since, both saved by x's multiplication node and laid out
    as x is; None where x is not such a product."""
    node = x.grad_fn
    if node is None or type(node).__name__ != "MulBackward0" or x._version != 0:
        return None
    u, v = getattr(node, "_saved_self", None), getattr(node, "_saved_other", None)
    if all(isinstance(t, torch.Tensor) and t.shape == x.shape and t.dtype == x.dtype and t.device == x.device
           and t.stride() == x.stride() for t in (u, v)):
        return u, v
    return None


def restored(saved: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The input from what was kept: (x,) or its factors (u, v)."""
    return saved[0] if len(saved) == 1 else torch.mul(*saved)
