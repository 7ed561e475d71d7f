"""A quantized base layer's weight, as LoRA's fused path reads an nn.Linear's: for weight formats that offer
`compute_dtype` and `compute_weight` (bitsandbytes' Linear4bit), the dense weight in the layer's compute dtype,
dequantized anew on each call, once in forward and once more in backward where dx is needed (as bitsandbytes'
own matmul does), so nothing dense outlives a call. dispatch.py uses it in training only: without autograd the
layer's own call stays (bitsandbytes has a kernel for a few tokens that reads the packed weight directly).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.plugin import weight_format


class QuantizedWeight:
    """Stands where dispatch.py and fused.py read an nn.Linear's weight: `dtype` (the layer's compute dtype now,
    or None where its format offers no dense call), `device`, `shape` [out, in], `numel()`; called, the dense
    weight."""

    __slots__ = ("module", "format", "shape")

    def __init__(self, fmt: Any, module: nn.Module):
        self.module, self.format = module, fmt
        in_features, out_features = fmt.features(module)
        self.shape = torch.Size((out_features, in_features))

    @property
    def dtype(self) -> torch.dtype | None:
        return self.format.compute_dtype(self.module)

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def numel(self) -> int:
        return self.shape.numel()

    def __call__(self) -> torch.Tensor:
        return self.format.compute_weight(self.module)


def quantized_weight(module: nn.Module) -> QuantizedWeight | None:
    """The module's weight as a QuantizedWeight, where its weight format offers a dense call; else None."""
    fmt = weight_format(module)
    if fmt is None or not (hasattr(fmt, "compute_dtype") and hasattr(fmt, "compute_weight")):
        return None
    return QuantizedWeight(fmt, module)
