"""I-BERT's `QuantLinear` (transformers' ibert), through the `surgery_weight_formats` hook.

The layer keeps a float `weight` [out, in] (the master weight) and, in `quant_mode`, quantizes it on every call
(symmetric, `weight_bit` bits, into the `weight_integer` and `fc_scaling_factor` buffers) and multiplies integers;
it returns `(output, scaling factor)`. So its dense view is the float weight itself: merges edit it in place
(bit-exact undo), and the layer quantizes the merged weight on its next call, as it would any trained weight.
Recognised by signature: a float 2-D `weight`, a `weight_integer` buffer of its shape, a `fc_scaling_factor`
buffer and an integer `weight_bit`. Sites get kind `quantized_linear` (format "ibert_quant"); LoRA adds its
update to the first item of the output. The analysis traces I-BERT with `quant_mode=False` only: in quant mode
its activation quantizers call numpy (`np.frexp`), which torch.export cannot trace (a TraceError says so).
"""
from __future__ import annotations

import torch
from torch import nn

import surgery


class IBertQuantLinearFormat:
    name = "ibert_quant"
    kind = "quantized_linear"
    priority = 10
    is_view = True

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        integer = getattr(module, "weight_integer", None)
        bits = getattr(module, "weight_bit", None)
        return (isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() == 2
                and isinstance(integer, torch.Tensor) and tuple(integer.shape) == tuple(weight.shape)
                and isinstance(getattr(module, "fc_scaling_factor", None), torch.Tensor)
                and isinstance(bits, int) and not isinstance(bits, bool))

    def features(self, module: nn.Module) -> tuple[int, int]:
        return int(module.weight.shape[1]), int(module.weight.shape[0])

    def dense(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach()

    def store(self, module: nn.Module, weight: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.copy_(weight)

    def snapshot(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": module.weight.detach().clone()}

    def restore(self, module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            module.weight.copy_(saved["weight"])


@surgery.hookimpl
def surgery_weight_formats() -> list:
    return [IBertQuantLinearFormat()]
