"""Weight formats (dense views of a site's weight) and reversible in-place weight edits, used by every merge."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from surgery.method import WeightEdit


@runtime_checkable
class WeightFormat(Protocol):
    """How to recognise a module kind and read/write its weight as dense [out_features, in_features].

    `dense(module)` returns either a live view of the stored weight (`is_view = True`: edits are written in
    place, cheaply) or a float copy (quantized formats: `store(module, w)` requantizes it). `snapshot`/`restore`
    keep and put back the exact stored tensors (only used for copy formats, where they are small).
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


@dataclass
class EditRecord:
    """What undoing one applied edit needs: the stored tensors (copy formats), or for a live view the entries
    where `revert(apply(w))` does not round back to `w` (their flat indices and original values)."""

    saved: dict[str, torch.Tensor] | None = None
    fix_index: torch.Tensor | None = None
    fix_value: torch.Tensor | None = None
    report: dict[str, float] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = list((self.saved or {}).values()) + [t for t in (self.fix_index, self.fix_value) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def apply_edit(fmt: WeightFormat, module: nn.Module, edit: WeightEdit, exact: bool = True) -> EditRecord:
    """Apply `edit` to the module's weight; return what `revert_edit` needs to restore the exact original bytes."""
    if not fmt.is_view:
        saved = fmt.snapshot(module)
        before = fmt.dense(module)
        after = edit.apply(before)
        fmt.store(module, after)
        stored = fmt.dense(module)
        rel = float(torch.linalg.norm((stored - after).float()) / torch.linalg.norm(after.float()).clamp_min(1e-30))
        return EditRecord(saved=saved, report={"relative_weight_error": rel})
    weight = fmt.dense(module)
    new = edit.apply(weight)
    if not exact:
        weight.copy_(new)
        return EditRecord()
    back = edit.revert(new)
    wrong = (back != weight).flatten().nonzero().flatten()
    del back
    record = EditRecord(fix_index=wrong.to(torch.int32 if weight.numel() < 2**31 else torch.int64),
                        fix_value=weight.reshape(-1)[wrong])
    weight.copy_(new)
    return record


@torch.no_grad()
def revert_edit(fmt: WeightFormat, module: nn.Module, edit: WeightEdit, record: EditRecord) -> None:
    """Undo an edit applied by `apply_edit`: bit-exact where a record was kept."""
    if record.saved is not None:
        fmt.restore(module, record.saved)
        return
    weight = fmt.dense(module)
    weight.copy_(edit.revert(weight))
    if record.fix_index is not None and record.fix_index.numel():
        index = record.fix_index.long()
        if weight.is_contiguous():
            weight.view(-1)[index] = record.fix_value
        else:  # a transposed view (GPT-2 Conv1D, embeddings): write through its own strides
            rows, cols = index // weight.shape[1], index % weight.shape[1]
            weight[rows, cols] = record.fix_value
