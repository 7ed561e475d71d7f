"""Merge and its undo: fold an attachment into the base weights through each site's weight format, and take it back
out exactly (bit for bit where the ledger kept what rounding lost)."""
from __future__ import annotations

from torch import nn

from surgery.core import progress
from surgery.core.formats import WeightFormat
from surgery.core.registry import manager
from surgery.core.sites import PARAMETER_KINDS, Site
from surgery.engine.ledger import Attachment, Ledger, MergedSite, base_module, require_ledger, unwrap
from surgery.engine.weight_edits import ParameterFormat, apply_edit, merged_float_linear, revert_edit
from surgery.errors import LedgerError, NotMergeableError

MERGE_TARGETS = ("weights", "float")


def site_format(site: Site, module: nn.Module) -> WeightFormat:
    """The weight format a merge at `site` reads and writes through: the registered one of its module, or the
    parameter's for a site whose path names one (kinds `experts`, `weight`)."""
    if site.kind in PARAMETER_KINDS:
        return ParameterFormat(site.path.rpartition(".")[2], site.transposed)
    return manager().format_of(module)


def _merge(model: nn.Module, ledger: Ledger, attachment: Attachment, exact: bool, into: str = "weights") -> None:
    registry = manager()
    done: list[MergedSite] = []
    try:
        with progress.task("merging", len(attachment.plan.placements), "sites") as bar:
            for placement in attachment.plan.placements:
                path = placement.site.path
                if attachment.branches[path].kept_when_merged:  # runs on, merged or not: nothing to edit
                    bar.advance()
                    continue
                module = base_module(model, path)
                method = registry.method(placement.method)
                fmt = site_format(placement.site, module)
                edit = method.merge_edit(placement.site, module, attachment.branches[path])
                if into == "float" and not fmt.is_view:  # a copy format (quantized): swap in a float linear instead
                    linear, record = merged_float_linear(fmt, module, edit, placement.site.dtype)
                    ledger.hosts[path].base = linear
                    done.append(MergedSite(path, registry.format_of(linear), edit, record, replaced=module))
                else:
                    done.append(MergedSite(path, fmt, edit, apply_edit(fmt, module, edit, exact=exact)))
                bar.advance()
    except BaseException:
        for merged in reversed(done):
            _revert(model, ledger, merged)
        raise
    attachment.merged = done
    ledger.merge_order.append(attachment.name)



def _revert(model: nn.Module, ledger: Ledger, merged: MergedSite) -> None:
    if merged.replaced is not None:
        ledger.hosts[merged.path].base = merged.replaced
    else:
        revert_edit(merged.fmt, base_module(model, merged.path), merged.edit, merged.record)



def _unmerge(model: nn.Module, ledger: Ledger, attachment: Attachment) -> None:
    for merged in reversed(attachment.merged or []):
        _revert(model, ledger, merged)
    attachment.merged = None
    ledger.merge_order.remove(attachment.name)



def merge(model: nn.Module, name: str, *, exact: bool = True, into: str = "weights") -> dict[str, dict[str, float]]:
    """Fold attachment `name` into the base weights in place; its branches stop running, except those
    `kept_when_merged` (module copies), which have no weight edit and run on. With `exact`, the
    ledger keeps what makes `unmerge` restore the weights bit for bit. Returns per-site reports (e.g. the
    requantization error of quantized sites, see `surgery.engine.weight_edits.merge_error`).

    `into="float"`: at sites whose weight format is a copy (quantized layers), do not requantize; swap in a
    frozen nn.Linear holding the dequantized weight plus the update, in the site's dtype. Unmerge puts the
    original module object back. Elsewhere it merges as `into="weights"` does.
    """
    if into not in MERGE_TARGETS:
        raise ValueError(f"merge into={into!r}: expected one of {', '.join(map(repr, MERGE_TARGETS))}")
    model = unwrap(model)
    ledger = require_ledger(model)
    attachment = ledger.get(name)
    if attachment.merged is not None:
        raise LedgerError(f"attachment {name!r} is already merged")
    registry = manager()
    for placement in attachment.plan.placements:
        method = registry.method(placement.method)
        if not method.mergeable and not attachment.branches[placement.site.path].kept_when_merged:
            raise NotMergeableError(f"attachment {name!r} cannot be merged: method {method.name!r} at "
                                    f"{placement.site.path!r} has no merge (it stays a separate branch)")
    _merge(model, ledger, attachment, exact, into)
    ledger.refresh()
    return {m.path: m.record.report for m in attachment.merged or [] if m.record.report}



def unmerge(model: nn.Module, name: str) -> None:
    """Take a merged attachment back out of the base weights. Attachments merged after it on the same sites
    are unmerged first and merged again after, so every weight goes back exactly."""
    model = unwrap(model)
    ledger = require_ledger(model)
    attachment = ledger.get(name)
    if attachment.merged is None:
        raise LedgerError(f"attachment {name!r} is not merged")
    paths = set(attachment.branches)
    later = [ledger.attachments[n] for n in ledger.merge_order[ledger.merge_order.index(name) + 1:]
             if paths & set(ledger.attachments[n].branches)]
    exact = {a.name: all(m.record.fix_index is not None or m.record.saved is not None or m.replaced is not None
                         for m in a.merged or []) for a in later}
    into = {a.name: "float" if any(m.replaced is not None for m in a.merged or []) else "weights" for a in later}
    for other in reversed(later):
        _unmerge(model, ledger, other)
    _unmerge(model, ledger, attachment)
    for other in later:
        _merge(model, ledger, other, exact[other.name], into[other.name])
    ledger.refresh()
