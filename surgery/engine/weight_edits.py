"""Reversible in-place weight edits through a weight format, used by every merge: apply, undo bit-exactly, redo.

"Bit-exact" compares the stored bits, not the values: -0.0 and +0.0 are different entries, and so are two NaNs
with different payloads. A merge is refused, before this site's weight is written, if it would write a
non-finite entry where the weight had a finite one (a NaN or inf in the update, or an overflow of the weight's
dtype), as HF PEFT's `safe_merge` does, but always.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.core.formats import WeightFormat
from surgery.core.method import WeightEdit
from surgery.engine.host import stored_parameter
from surgery.errors import NotMergeableError

_SAME_SIZE_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """`t` reinterpreted as integers of its element size (floats compared by bits), or `t` itself."""
    if t.is_floating_point() and t.element_size() in _SAME_SIZE_INTEGER:
        return t.view(_SAME_SIZE_INTEGER[t.element_size()])
    return t


def differs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where two tensors of one dtype and shape hold different bits (a bool tensor)."""
    return bits(a) != bits(b)


differing_bits = differs
"""Where two tensors of one float dtype differ in their bytes (so -0.0 differs from 0.0, and a NaN equals
itself): the mask an exact undo must restore."""


@dataclass
class EditRecord:
    """What undoing one applied edit needs: the stored tensors (copy formats), or for a live view the entries
    where `revert(apply(w))` does not give back `w` bit for bit (their flat indices and original values)."""

    saved: dict[str, torch.Tensor] | None = None
    fix_index: torch.Tensor | None = None
    fix_value: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # the original bias, where the edit changed it
    report: dict[str, float] = field(default_factory=dict)
    whole: bool = False  # a live view whose original was kept whole in `saved` (smaller than the entries' fix)

    @property
    def exact(self) -> bool:
        """Whether `revert_edit` gives back the original bits."""
        return self.saved is not None or self.fix_index is not None

    def forget(self) -> None:
        """Drop what makes the undo exact (`merge(..., exact=False)` once the merge has completed)."""
        self.fix_index = self.fix_value = None
        if self.whole:
            self.saved, self.whole = None, False

    def nbytes(self) -> int:
        tensors = list((self.saved or {}).values()) + [t for t in (self.fix_index, self.fix_value, self.bias)
                                                       if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class RedoRecord:
    """What re-applying an edit just reverted needs to give back the merged bits exactly."""

    saved: dict[str, torch.Tensor] | None = None
    fix_index: torch.Tensor | None = None
    fix_value: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _edited_bias(module: nn.Module, edit: WeightEdit) -> torch.Tensor | None:
    """The module's bias, if `edit` changes biases and the module has one."""
    bias = getattr(module, "bias", None) if edit.apply_bias is not None else None
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def check_finite(path: str, what: str, before: torch.Tensor, after: torch.Tensor) -> None:
    """Refuse (NotMergeableError naming the site) if `after` has a non-finite entry where `before` is finite."""
    bad = ~torch.isfinite(after)
    if before.shape == after.shape:
        bad &= torch.isfinite(before)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        count = int(bad.sum())
        raise NotMergeableError(
            f"merge at {path!r} refused: the merged {what} would hold {count} non-finite "
            f"{'entry' if count == 1 else 'entries'} (first at {where}) where the {what} is finite: the update is "
            f"NaN or infinite, or overflows {str(after.dtype).replace('torch.', '')}. Nothing was changed.")


def _lost_rows(path: str, weight: torch.Tensor, back: torch.Tensor) -> None:
    """For `merge(..., exact=False)`: refuse where undoing the merge would lose more than half of a weight row."""
    w, error = weight.float(), (back.float() - weight.float())
    norms, lost = torch.linalg.vector_norm(w, dim=-1), torch.linalg.vector_norm(error, dim=-1)
    bad = (norms > 0) & ~(lost <= 0.5 * norms)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise NotMergeableError(
            f"merge at {path!r} refused: the update is so large next to the weight that an inexact unmerge "
            f"(exact=False) could not give back {int(bad.sum())} of its rows (first: row {row}, relative error "
            f"{float(lost[row] / norms[row]):.3g}); merge with exact=True (the default). Nothing was changed.")


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
                        dtype: torch.dtype | None = None, path: str = "?") -> tuple[nn.Linear, EditRecord]:
    """A frozen nn.Linear holding the edited dense weight of `module` (and its `bias`) in `dtype`, for a merge
    that replaces a copy-format module instead of rewriting it. `module` itself is not touched."""
    before = fmt.dense(module)
    after = edit.apply(before)
    check_finite(path, "weight", before, after)
    in_features, out_features = fmt.features(module)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=after.device,
                       dtype=dtype or after.dtype)
    linear.weight.copy_(after)
    check_finite(path, "weight", after, linear.weight)
    if bias is not None:
        new_bias = bias if edit.apply_bias is None else edit.apply_bias(bias.detach())
        check_finite(path, "bias", bias.detach(), new_bias)
        linear.bias.copy_(new_bias)
    linear.requires_grad_(False)
    return linear, EditRecord(report=merge_error(before, after, linear.weight))


def _flat_write(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """target.flatten()[index] = values, for a contiguous tensor or a strided view (GPT-2 Conv1D, embeddings,
    stacked experts)."""
    index = index.long()
    if target.is_contiguous():
        target.view(-1)[index] = values
    else:  # a transposed view (GPT-2 Conv1D, embeddings, experts): write through its own strides
        target[torch.unravel_index(index, target.shape)] = values


def _fix_of(wrong: torch.Tensor, like: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    index = wrong.flatten().nonzero().flatten()
    return index.to(torch.int32 if like.numel() < 2**31 else torch.int64), values.reshape(-1)[index].clone()


@torch.no_grad()
def apply_edit(fmt: WeightFormat, module: nn.Module, edit: WeightEdit, *, path: str = "?",
               keep_rows: bool = False) -> EditRecord:
    """Apply `edit` to the module's weight (and bias); return what `revert_edit` needs to restore the exact
    original bits. Refused (NotMergeableError) before anything is written if the result is not finite where the
    weight is; with `keep_rows`, also if an undo without the record would lose weight rows (`exact=False`)."""
    bias = _edited_bias(module, edit)
    new_bias = original_bias = None
    if bias is not None:
        new_bias = edit.apply_bias(bias).to(bias.dtype)  # computed and checked before anything is written
        check_finite(path, "bias", bias, new_bias)
        original_bias = bias.clone()
    if not fmt.is_view:
        saved = fmt.snapshot(module)
        before = fmt.dense(module)
        after = edit.apply(before)
        check_finite(path, "weight", before, after)
        try:
            fmt.store(module, after)
            if new_bias is not None:
                bias.copy_(new_bias)
        except BaseException:
            fmt.restore(module, saved)
            raise
        record = EditRecord(saved=saved, report=merge_error(before, after, fmt.dense(module)))
    else:
        weight = fmt.dense(module)
        new = edit.apply(weight)
        check_finite(path, "weight", weight, new)
        back = edit.revert(new).to(weight.dtype)
        if keep_rows:
            _lost_rows(path, weight, back)
        wrong = differs(back, weight)
        del back
        index_size = 4 if weight.numel() < 2**31 else 8
        if int(wrong.sum()) * (index_size + weight.element_size()) >= weight.numel() * weight.element_size():
            # most entries do not round back: keep the original whole (smaller than their indices and values)
            record = EditRecord(saved=fmt.snapshot(module), whole=True)
        else:
            fix_index, fix_value = _fix_of(wrong, weight, weight)
            record = EditRecord(fix_index=fix_index, fix_value=fix_value)
        del wrong
        weight.copy_(new)
        if new_bias is not None:
            try:
                bias.copy_(new_bias)
            except BaseException:
                revert_edit(fmt, module, edit, record)
                raise
    record.bias = original_bias
    return record


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
def revert_edit(fmt: WeightFormat, module: nn.Module, edit: WeightEdit, record: EditRecord) -> RedoRecord:
    """Undo an edit applied by `apply_edit`: bit-exact where a record was kept. Returns what `redo_edit` needs to
    put the merged bits back exactly (for a pass that fails later and rolls back)."""
    bias = getattr(module, "bias", None) if record.bias is not None else None
    redo = RedoRecord(bias=bias.detach().clone() if isinstance(bias, torch.Tensor) else None)
    if record.saved is not None:
        redo.saved = fmt.snapshot(module)
        fmt.restore(module, record.saved)
    else:
        weight = fmt.dense(module)
        old = edit.revert(weight).to(weight.dtype)
        if record.fix_index is not None and record.fix_index.numel():
            _flat_write(old, record.fix_index, record.fix_value)
        again = edit.apply(old).to(weight.dtype)
        redo.fix_index, redo.fix_value = _fix_of(differs(again, weight), weight, weight)
        del again
        weight.copy_(old)
    if redo.bias is not None:
        module.bias.detach().copy_(record.bias)
    return redo


@torch.no_grad()
def redo_edit(fmt: WeightFormat, module: nn.Module, edit: WeightEdit, redo: RedoRecord) -> None:
    """Put back, bit for bit, the merged weight that `revert_edit` took out (it returned `redo`)."""
    if redo.saved is not None:
        fmt.restore(module, redo.saved)
    else:
        weight = fmt.dense(module)
        new = edit.apply(weight)
        if redo.fix_index is not None and redo.fix_index.numel():
            _flat_write(new, redo.fix_index, redo.fix_value)
        weight.copy_(new)
    if redo.bias is not None:
        module.bias.detach().copy_(redo.bias)
