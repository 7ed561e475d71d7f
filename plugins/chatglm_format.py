"""The ChatGLM INT4/INT8 weight format, through the `surgery_weight_formats` hook.

Any module with the signature is recognised, whatever its class is called (ChatGLM's own `QuantizedLinear`, ours
in `quantized_linear.py`, a copy in a user's code): an int8 `weight` [out, in * bits / 8], a float `weight_scale`
[out] and an integer `weight_bit_width` of 4 or 8. The engine also checks that the graph shows the module as a
linear map of these features before it becomes a `quantized_linear` site. ChatGLM's own layer runs custom CUDA
kernels that torch.export cannot trace: for a model that cannot be traced as it is, the analysis traces a
`TraceStandIn` of the same features in the layer's place (then the graph cannot check the features).
"""
from __future__ import annotations

import torch
from torch import nn

import surgery
from surgery.plugin import TraceStandIn
from surgery_plugins.quantized_linear import BIT_WIDTHS, dequantize_weight, quantize_weight


class ChatGLMQuantFormat:
    """Dense view: the dequantized float32 weight; `store` requantizes per row with the module's own bit width
    and scale dtype; `snapshot`/`restore` keep the exact int8 bytes and scales (a merge's undo)."""

    name = "chatglm_int"
    kind = "quantized_linear"
    priority = 10
    is_view = False

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        scale = getattr(module, "weight_scale", None)
        bits = getattr(module, "weight_bit_width", None)
        return (isinstance(weight, torch.Tensor) and weight.dtype == torch.int8 and weight.dim() == 2
                and isinstance(scale, torch.Tensor) and scale.is_floating_point()
                and tuple(scale.shape) == (weight.shape[0],)
                and isinstance(bits, int) and not isinstance(bits, bool) and bits in BIT_WIDTHS)

    def features(self, module: nn.Module) -> tuple[int, int]:
        rows, cols = module.weight.shape
        return cols * 8 // module.weight_bit_width, rows

    def analysis_stand_in(self, module: nn.Module) -> nn.Module:
        """ChatGLM's own layer dequantizes with custom kernels (cpm_kernels) that torch.export cannot trace."""
        return TraceStandIn(*self.features(module), getattr(module, "bias", None) is not None, module.weight.device)

    def dense(self, module: nn.Module) -> torch.Tensor:
        return dequantize_weight(module.weight, module.weight_scale, module.weight_bit_width, torch.float32)

    def store(self, module: nn.Module, weight: torch.Tensor) -> None:
        qweight, scale = quantize_weight(weight, module.weight_bit_width, module.weight_scale.dtype)
        with torch.no_grad():
            module.weight.copy_(qweight)
            module.weight_scale.copy_(scale)

    def snapshot(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": module.weight.detach().clone(), "weight_scale": module.weight_scale.detach().clone()}

    def restore(self, module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            module.weight.copy_(saved["weight"])
            module.weight_scale.copy_(saved["weight_scale"])


@surgery.hookimpl
def surgery_weight_formats() -> list:
    return [ChatGLMQuantFormat()]
