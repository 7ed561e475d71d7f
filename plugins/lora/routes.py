"""Per-sample routing (`surgery.per_sample`) for LoRA: every sample's own pair applied to the whole batch at once,
in two batched matmuls whatever the number of adapters, instead of the base running once per group of samples.

The pairs of the groups are stacked, ranks zero-padded to the largest and the scale folded into B
(formula.folded_b), with one zero pair last for the samples that take no adapter; each sample gathers its own.
dispatch.py decides when (no fused-projection channels, no dropout in training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from surgery_plugins.lora import formula


def stacked(branches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, s·B) of every group stacked, [groups + 1, r, in] and [groups + 1, out, r], the last group zero."""
    r = max(b.lora_A.shape[0] for b in branches)
    first = branches[0]
    dtype, in_features, out_features = first.lora_A.dtype, first.lora_A.shape[1], first.lora_B.shape[0]
    a = torch.stack([F.pad(b.lora_A.to(dtype), (0, 0, 0, r - b.lora_A.shape[0])) for b in branches]
                    + [first.lora_A.new_zeros((r, in_features))])
    b = torch.stack([F.pad(formula.folded_b(b.lora_B.to(dtype), b.scale), (0, r - b.lora_B.shape[1])) for b in branches]
                    + [first.lora_B.new_zeros((out_features, r))])
    return a, b


def output(state: tuple[torch.Tensor, torch.Tensor], group: torch.Tensor, x: torch.Tensor,
           out: torch.Tensor) -> torch.Tensor:
    """The base output `out` plus each sample's update (group[i]: sample i's index into the stack)."""
    a, b = state
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
    delta = torch.bmm(torch.bmm(flat, a[group].transpose(1, 2)), b[group].transpose(1, 2))
    return out + delta.reshape(*out.shape).to(out.dtype)
