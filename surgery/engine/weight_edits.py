"""Reversible in-place weight edits through a weight format, used by every merge: apply, and undo bit-exactly."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.core.formats import WeightFormat
from surgery.core.method import WeightEdit
from surgery.engine.host import stored_parameter


@dataclass
class EditRecord:
    """What undoing one applied edit needs: the stored tensors (copy formats), or for a live view the entries
    where `revert(apply(w))` does not round back to `w` (their flat indices and original values)."""

    saved: dict[str, torch.Tensor] | None = None
    fix_index: torch.Tensor | None = None
    fix_value: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # the original bias, where the edit changed it
    report: dict[str, float] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = list((self.saved or {}).values()) + [t for t in (self.fix_index, self.fix_value, self.bias)
                                                       if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def _edited_bias(module: nn.Module, edit: WeightEdit) -> torch.Tensor | None:
    """The module's bias, if `edit` changes biases and the module has one."""
    bias = getattr(module, "bias", None) if edit.apply_bias is not None else None
    return bias.detach() if isinstance(bias, torch.Tensor) else None


PROBE_ROWS = 32


@torch.no_grad()
def merge_error(before: torch.Tensor, after: torch.Tensor, stored: torch.Tensor) -> dict[str, float]:
    """What storing a merge cost, for a weight [out, in] that cannot hold `after` exactly (float32 arithmetic):

    - `relative_weight_error`: ||stored - after|| / ||after|| (Frobenius);
    - `relative_update_error`: ||stored - after|| / ||after - before||, the share of the update that was lost;
    - `max_abs_output_change`: max |x (stored - after)^T| over a seeded standard-normal probe batch x
      [PROBE_ROWS, in], i.e. how far the merged layer's outputs move from the unmerged ones (base + branch).
    """
    before, after, stored = before.float(), after.float(), stored.float()
    error = stored - after
    norm = torch.linalg.norm(error)
    probe = torch.randn(PROBE_ROWS, after.shape[1], generator=torch.Generator().manual_seed(0)).to(after.device)
    return {"relative_weight_error": float(norm / torch.linalg.norm(after).clamp_min(1e-30)),
            "relative_update_error": float(norm / torch.linalg.norm(after - before).clamp_min(1e-30)),
            "max_abs_output_change": float((probe @ error.T).abs().max())}


@torch.no_grad()
def merged_float_linear(fmt: WeightFormat, module: nn.Module, edit: WeightEdit,
                        dtype: torch.dtype | None = None) -> tuple[nn.Linear, EditRecord]:
    """A frozen nn.Linear holding the edited dense weight of `module` (and its `bias`) in `dtype`, for a merge
    that replaces a copy-format module instead of rewriting it. `module` itself is not touched."""
    before = fmt.dense(module)
    after = edit.apply(before)
    in_features, out_features = fmt.features(module)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=after.device,
                       dtype=dtype or after.dtype)
    linear.weight.copy_(after)
    if bias is not None:
        linear.bias.copy_(bias if edit.apply_bias is None else edit.apply_bias(bias.detach()))
    linear.requires_grad_(False)
    return linear, EditRecord(report=merge_error(before, after, linear.weight))


@torch.no_grad()
def apply_edit(fmt: WeightFormat, module: nn.Module, edit: WeightEdit, exact: bool = True) -> EditRecord:
    """Apply `edit` to the module's weight (and bias); return what `revert_edit` needs to restore the exact
    original bytes."""
    bias = _edited_bias(module, edit)
    if bias is None:
        return _apply_weight_edit(fmt, module, edit, exact)
    new_bias = edit.apply_bias(bias).to(bias.dtype)  # computed before anything is written
    record = _apply_weight_edit(fmt, module, edit, exact)
    record.bias = bias.clone()
    bias.copy_(new_bias)
    return record


def _apply_weight_edit(fmt: WeightFormat, module: nn.Module, edit: WeightEdit, exact: bool) -> EditRecord:
    if not fmt.is_view:
        saved = fmt.snapshot(module)
        before = fmt.dense(module)
        after = edit.apply(before)
        fmt.store(module, after)
        return EditRecord(saved=saved, report=merge_error(before, after, fmt.dense(module)))
    weight = fmt.dense(module)
    new = edit.apply(weight)
    if not exact:
        weight.copy_(new)
        return EditRecord()
    back = edit.revert(new).to(weight.dtype)
    wrong = differing_bits(back, weight).flatten().nonzero().flatten()
    del back
    index_dtype = torch.int32 if weight.numel() < 2**31 else torch.int64
    index_size = torch.empty((), dtype=index_dtype).element_size()
    if wrong.numel() * (index_size + weight.element_size()) >= weight.numel() * weight.element_size():
        record = EditRecord(saved=fmt.snapshot(module))  # most entries do not round back: keep the original whole
    else:
        record = EditRecord(fix_index=wrong.to(index_dtype), fix_value=weight.reshape(-1)[wrong])
    weight.copy_(new)
    return record


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def differing_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where two tensors of one float dtype differ in their bytes (so -0.0 differs from 0.0, and a NaN equals
    itself): the mask an exact undo must restore."""
    bits = _BITS[a.element_size()]
    return a.view(bits) != b.view(bits)


class ParameterFormat:
    """The weight format of a site whose path names a parameter (kinds `experts`, `weight`): the parameter `name`
    of a module as a live [experts, out, in] or [out, in] view (through a ParameterHost's parametrization, if
    there is one)."""

    kind, priority, is_view = "parameter", 0, True

    def __init__(self, name: str, transposed: bool):
        self.name, self.transposed = name, transposed

    def matches(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, self.name, None), torch.Tensor)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return int(self.dense(module).shape[-1]), int(self.dense(module).shape[-2])

    def dense(self, module: nn.Module) -> torch.Tensor:
        weight = stored_parameter(module, self.name).detach()
        return weight.transpose(-1, -2) if self.transposed else weight

    def store(self, module: nn.Module, weight: torch.Tensor) -> None:
        self.dense(module).copy_(weight)

    def snapshot(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight": self.dense(module).clone()}

    def restore(self, module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        self.dense(module).copy_(saved["weight"])


@torch.no_grad()
def revert_edit(fmt: WeightFormat, module: nn.Module, edit: WeightEdit, record: EditRecord) -> None:
    """Undo an edit applied by `apply_edit`: bit-exact where a record was kept."""
    if record.bias is not None:
        module.bias.detach().copy_(record.bias)
    if record.saved is not None:
        fmt.restore(module, record.saved)
        return
    weight = fmt.dense(module)
    weight.copy_(edit.revert(weight))
    if record.fix_index is not None and record.fix_index.numel():
        index = record.fix_index.long()
        if weight.is_contiguous():
            weight.view(-1)[index] = record.fix_value
        else:  # a transposed view (GPT-2 Conv1D, embeddings, experts): write through its own strides
            weight[torch.unravel_index(index, weight.shape)] = record.fix_value
