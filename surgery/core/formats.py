"""The format contracts plugins implement: weight formats (a module kind's weight as dense [out, in]) and adapter
file formats (e.g. HF PEFT's directories)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from surgery.engine.ledger import Attachment


@runtime_checkable
class WeightFormat(Protocol):
    """How to recognise a module kind and read/write its weight as dense [out_features, in_features].

    `dense(module)` returns either a live view of the stored weight (`is_view = True`: edits are written in
    place, cheaply) or a float copy (quantized formats: `store(module, w)` requantizes it). `snapshot`/`restore`
    keep and put back the exact stored tensors (only used for copy formats, where they are small).

    Optional: `analysis_stand_in(module) -> nn.Module` for a layer that `torch.export` may not trace (weights that
    are tensor subclasses, a custom CUDA kernel): if the model as it is cannot be traced, the graph analysis
    traces again with the stand-ins in those layers' places (see `TraceStandIn`).
    """

    name: str
    kind: str  # "linear", "conv1d", "embedding" or "quantized_linear"
    priority: int
    is_view: bool

    def matches(self, module: nn.Module) -> bool: ...
    def features(self, module: nn.Module) -> tuple[int, int]: ...  # (in_features, out_features)
    def dense(self, module: nn.Module) -> torch.Tensor: ...
    def store(self, module: nn.Module, weight: torch.Tensor) -> None: ...
    def snapshot(self, module: nn.Module) -> dict[str, torch.Tensor]: ...
    def restore(self, module: nn.Module, saved: dict[str, torch.Tensor]) -> None: ...



class TraceStandIn(nn.Module):
    """What the graph analysis traces in place of a layer it cannot trace: a linear map of the same features on
    the same device, computed in the input's dtype. Its weight and bias take no memory (zero-stride views); the
    analysis never reads their values."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: torch.device):
        super().__init__()
        zero = torch.zeros((), device=device)
        self.weight = nn.Parameter(zero.expand(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(zero.expand(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)



@runtime_checkable
class AdapterFormat(Protocol):
    """An adapter file format other than surgery's own (`surgery_adapter_formats`); see the hook's manual."""

    name: str

    def detect(self, directory: Path) -> bool: ...
    def load(self, model: nn.Module, directory: Path, name: str) -> "Attachment": ...
    def save(self, model: nn.Module, attachment: "Attachment", directory: Path) -> Path: ...
