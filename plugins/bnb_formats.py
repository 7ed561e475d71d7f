"""bitsandbytes' `Linear4bit` (NF4/FP4, blockwise) and `Linear8bitLt` (LLM.int8(), per-row) as weight formats.

`torch.export` cannot trace their weights (tensor subclasses), so each format gives the graph analysis a
`TraceStandIn` of the same features to trace in the layer's place. The 4-bit format also dequantizes per call
(`compute_weight`), for LoRA's fused training path.

Without bitsandbytes installed this plugin offers no format; with it, bitsandbytes is never imported here (a
model holding its layers has imported it already). Requantizing after a merge writes the new
bytes into the existing tensors in place (the packed weight and, for 4 bits, the quant state's absmax, offset and
nested absmax; for 8 bits the int8 rows and their SCB), so `snapshot`/`restore` can put the exact bytes back and
no object that bitsandbytes holds a reference to is swapped.
"""
from __future__ import annotations

import importlib.util
import sys

import torch
from torch import nn

import surgery
from surgery.plugin import TraceStandIn


def installed() -> bool:
    """Whether bitsandbytes can be imported (found, not imported: importing it costs seconds)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _bnb():
    """bitsandbytes if something has imported it, else None: a model holding its layers has imported it, so a
    model that has not cannot hold them, and `surgery` never pays for the import itself."""
    return sys.modules.get("bitsandbytes")


def _quant_state_tensors(state) -> dict[str, torch.Tensor]:
    """The tensors of a 4-bit QuantState that a requantization changes (the code book never does)."""
    tensors = {"absmax": state.absmax}
    if state.nested:
        tensors["offset"] = state.offset
        tensors["state2.absmax"] = state.state2.absmax
    return tensors


class Bnb4bitFormat:
    """`bnb.nn.Linear4bit` once quantized (its weight carries a `quant_state`)."""

    name, kind, priority, is_view = "bnb_4bit", "quantized_linear", 10, False

    def matches(self, module: nn.Module) -> bool:
        bnb = _bnb()
        return (bnb is not None and isinstance(module, bnb.nn.Linear4bit)
                and getattr(module.weight, "quant_state", None) is not None)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return tuple(module.weight.quant_state.shape)[1], tuple(module.weight.quant_state.shape)[0]

    def analysis_stand_in(self, module: nn.Module) -> nn.Module:
        return TraceStandIn(*self.features(module), module.bias is not None, module.weight.device)

    @staticmethod
    def _dequantized(module: nn.Module) -> torch.Tensor:
        weight = module.weight
        return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)

    def dense(self, module: nn.Module) -> torch.Tensor:
        return self._dequantized(module).float()

    def compute_dtype(self, module: nn.Module) -> torch.dtype | None:
        """The layer's compute dtype (else its weight's, which it computes in for inputs of that dtype); None
        for a weight repacked for bitsandbytes' CPU inference kernel, or a bias of another dtype."""
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            return None
        dtype = module.compute_dtype or state.dtype
        return dtype if module.bias is None or module.bias.dtype == dtype else None

    def compute_weight(self, module: nn.Module) -> torch.Tensor:
        """The weight dequantized, [out, in], in the compute dtype: what the layer's matmul multiplies by."""
        return self._dequantized(module).to(self.compute_dtype(module))

    def store(self, module: nn.Module, weight: torch.Tensor) -> None:
        param, state = module.weight, module.weight.quant_state
        packed, new_state = _bnb().functional.quantize_4bit(
            weight.to(state.dtype).contiguous(), blocksize=state.blocksize, compress_statistics=state.nested,
            quant_type=state.quant_type, quant_storage=param.data.dtype)
        old, new = _quant_state_tensors(state), _quant_state_tensors(new_state)
        if packed.shape != param.data.shape or any(old[k].shape != new[k].shape for k in old):
            raise ValueError("bitsandbytes returned a 4-bit layout of another shape; cannot requantize in place")
        with torch.no_grad():
            param.data.copy_(packed)
            for key, tensor in old.items():
                tensor.copy_(new[key])

    def snapshot(self, module: nn.Module) -> dict[str, torch.Tensor]:
        saved = {"weight": module.weight.data.clone()}
        saved.update({k: v.clone() for k, v in _quant_state_tensors(module.weight.quant_state).items()})
        return saved

    def restore(self, module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            module.weight.data.copy_(saved["weight"])
            for key, tensor in _quant_state_tensors(module.weight.quant_state).items():
                tensor.copy_(saved[key])


def _row_scales(module: nn.Module) -> torch.Tensor | None:
    """SCB (per-row absmax) of a Linear8bitLt: on the weight before the first forward, on `state` after."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else getattr(module.state, "SCB", None)


class Bnb8bitFormat:
    """`bnb.nn.Linear8bitLt` holding int8 weights (`has_fp16_weights=False`): `w = CB * SCB[:, None] / 127`."""

    name, kind, priority, is_view = "bnb_int8", "quantized_linear", 10, False

    def matches(self, module: nn.Module) -> bool:
        bnb = _bnb()
        return (bnb is not None and isinstance(module, bnb.nn.Linear8bitLt) and module.weight.dtype == torch.int8
                and not module.state.has_fp16_weights and _row_scales(module) is not None)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.weight.shape[1], module.weight.shape[0]

    def analysis_stand_in(self, module: nn.Module) -> nn.Module:
        return TraceStandIn(*self.features(module), module.bias is not None, module.weight.device)

    def dense(self, module: nn.Module) -> torch.Tensor:
        return module.weight.data.float() * (_row_scales(module).float()[:, None] / 127.0)

    def store(self, module: nn.Module, weight: torch.Tensor) -> None:
        rows, scales, _ = _bnb().functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        with torch.no_grad():
            module.weight.data.copy_(rows)
            _row_scales(module).copy_(scales)

    def snapshot(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": module.weight.data.clone(), "SCB": _row_scales(module).clone()}

    def restore(self, module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            module.weight.data.copy_(saved["weight"])
            _row_scales(module).copy_(saved["SCB"])


@surgery.hookimpl
def surgery_weight_formats() -> list:
    if not installed():
        return []
    return [Bnb4bitFormat(), Bnb8bitFormat()]
