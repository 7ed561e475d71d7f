"""The format contracts plugins implement: weight formats (a module kind's weight as dense [out, in]) and adapter
file formats (e.g. HF PEFT's directories)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from surgery.analysis.report import Report
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

    Optional, together: `compute_dtype(module) -> torch.dtype | None` and `compute_weight(module) -> Tensor` for
    a quantized layer whose call is `F.linear(x, compute_weight(module), module.bias)` for x of `compute_dtype`
    (None: not now). `compute_weight` dequantizes anew on each call, cheaply enough to be called in every
    forward and backward; methods then compute the layer's map themselves (LoRA's fused path) and keep nothing
    dense between calls.
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


@runtime_checkable
class PeftMapping(Protocol):
    """One HF PEFT adapter type (`peft_type` in `adapter_config.json`) mapped to surgery methods, for the `peft`
    adapter format (`surgery_peft_mappings`; see the hook's manual). The format reads and writes the files and the
    `modules_to_save` copies; a mapping translates the rest.

    - `read(config, tensors, report, source) -> (rules, branch_tensors)`: from the config (a JSON object) and the
      tensors under PEFT's keys, those of `modules_to_save` modules taken out, for the model whose sites `report`
      holds: the rules to attach (dicts as in a rule file: `select`, `method`, `params`) and the branch tensors
      keyed `<site path>.<branch state_dict key>`. Options it cannot map are refused by name (`AdapterFileError`),
      what does not fit the model is listed (`MismatchError`); `source` is the adapter directory, for messages.
    - `write(model, attachment) -> (config, tensors)`: the config fields of this type and the tensors under PEFT's
      keys for the attachment's placements of `methods` (the others are `copy` placements, which the format
      writes). Raise `SurgeryError` naming what PEFT cannot hold.
    """

    peft_type: str
    methods: frozenset[str]

    def read(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], report: "Report",
             source: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]: ...
    def write(self, model: nn.Module, attachment: "Attachment") -> tuple[dict[str, Any], dict[str, torch.Tensor]]: ...
