"""Merge and its undo: fold an attachment into the base weights through each site's weight format, and take it back
out exactly (bit for bit where the ledger kept what rounding lost).

Both are all-or-nothing: every weight written in a pass can be put back bit for bit until the pass completes
(`merge(..., exact=False)` drops those records only then), so a merge refused at its last site, or one that
fails in the middle, leaves every weight as it was.

A merge keeps the model's function only where folding the branch into the weights commutes with the other
attachments' branches that act at the same sites. `fold_conflict` holds the rules; merge, unmerge and attach
refuse, with the reason, whatever would break them.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from surgery.core import progress
from surgery.core.formats import WeightFormat
from surgery.core.method import Branch, WeightEdit
from surgery.core.registry import manager
from surgery.core.sites import PARAMETER_KINDS, Site
from surgery.engine.ledger import Attachment, Ledger, MergedSite, base_module, require_ledger, unwrap
from surgery.engine.transaction import Journal, model_lock, transaction
from surgery.engine.weight_edits import ParameterFormat, apply_edit, bits, merged_float_linear, redo_edit, revert_edit
from surgery.errors import LedgerError, NotMergeableError

MERGE_TARGETS = ("weights", "float")


# ---- which folds keep the function ----------------------------------------------------------------------------

def site_format(site: Site, module: nn.Module) -> WeightFormat | None:
    """The weight format a merge at `site` reads and writes through: the registered one of its module, or the
    parameter's for a site whose path names one (kinds `experts`, `weight`)."""
    if site.kind in PARAMETER_KINDS:
        return ParameterFormat(site.path.rpartition(".")[2], site.transposed)
    return manager().format_of(module)


def _overrides(branch: Branch, hook: str) -> bool:
    return getattr(type(branch), hook, None) is not getattr(Branch, hook)


def edit_form(model: nn.Module, attachment: Attachment, path: str) -> str:
    """The `WeightEdit.form` of the attachment's merge at `path` ("unknown" if its method does not merge)."""
    placement = next(p for p in attachment.plan.placements if p.site.path == path)
    method = manager().method(placement.method)
    if not method.mergeable:
        return "unknown"
    try:
        return method.merge_edit(placement.site, base_module(model, path), attachment.branches[path]).form
    except Exception:  # e.g. an IA3 vector with a zero: it cannot be merged, so nothing can be assumed
        return "unknown"


def fold_conflict(form: str, other: str, branch: Branch, other_form: str, other_first: bool) -> str | None:
    """Why folding an edit of `form` into a site's weights would change what the site computes while attachment
    `other` keeps its unmerged `branch` there (`other_first`: attached earlier, so its output step runs first);
    None if it would not.

    The Host computes `post_n(... post_1(base(pre_n(... pre_1(x)))))` in attachment order, and an output step
    may read the final input. A fold replaces the base weight W by W + D, diag(s) W or W diag(s):
    - W + D (`add`) is the same as adding D x at its place among the output steps if every output step before
      it is also an addition;
    - diag(s) W (`scale_output`) is the same if every output step before it is also a channel scaling;
    - W diag(s) (`scale_input`) removes the scaling from the input every later step sees: it is the same only
      if no later input step depends on it and no output step reads the input (channel scalings do not);
    - W T (`transform_input`, e.g. OFT's rotation) likewise, and it commutes with no later input step at all;
    - a fold of `unknown` form is refused beside any branch that changes the input or the output;
    - nothing folded into the base weights acts while a branch that replaces the base module runs.
    """
    if branch.replaces_base:
        return f"{other!r} replaces the base module there, so folded weights would not be used"
    if branch.reads_base_weight:
        return f"{other!r} reads the base weight there itself, so the fold would change what {other!r} computes"
    changes_output, changes_input = _overrides(branch, "adapt_output"), _overrides(branch, "adapt_call")
    if form in ("add", "scale_output"):
        if other_first and changes_output and other_form != form:
            kind = "an addition" if form == "add" else "a channel scaling"
            return (f"{other!r} (attached earlier) changes the output there before this step, and it is not "
                    f"{kind}: folded into the weights this step would act before {other!r} instead of after it")
        return None
    if form in ("scale_input", "transform_input"):
        commutes = form == "scale_input" and other_form == "scale_input"  # diagonal scalings commute
        if changes_input and not other_first and not commutes:
            return (f"{other!r} (attached later) changes the input there after this step; folded into the "
                    f"weights this step would act after {other!r} instead of before it")
        if changes_output and other_form != "scale_output":
            return f"{other!r} acts on the output there and may read the input, which the fold would no longer reach"
        return None
    if changes_input or changes_output:
        return f"{other!r} acts there too, and this method does not say what form its merge has (WeightEdit.form)"
    return None


def check_folds(model: nn.Module, ledger: Ledger, folded: Attachment, paths: set[str] | None = None,
                extra: dict[str, list[tuple[str, Branch, str]]] | None = None) -> None:
    """Refuse (NotMergeableError) if `folded`'s merge, at `paths` (default: all its sites), would not keep the
    function beside the unmerged branches of the other attachments there (plus `extra`: path -> [(name, branch,
    its edit form)] of branches about to be attached after every existing attachment)."""
    order = list(ledger.attachments)
    position = order.index(folded.name) if folded.name in order else len(order)
    for path in sorted(paths if paths is not None else folded.branches):
        if path in folded.branches and folded.branches[path].kept_when_merged:  # not folded: it runs on
            continue
        host = ledger.hosts.get(path)
        others = [(n, b, None) for n, b in (host.branches.items() if host is not None else ())
                  if n != folded.name and (ledger.attachments[n].merged is None or b.kept_when_merged)]
        others += (extra or {}).get(path, [])
        if not others:
            continue
        form = edit_form(model, folded, path)
        for other, branch, other_form in others:
            if other_form is None:
                other_form = edit_form(model, ledger.attachments[other], path)
            first = other in order and order.index(other) < position
            reason = fold_conflict(form, other, branch, other_form, first)
            if reason:
                raise NotMergeableError(f"{folded.name!r} merged into the weights at {path!r} would not compute what "
                                        f"it computes as a branch: {reason}. Nothing was changed.")


# ---- applying and undoing -------------------------------------------------------------------------------------

def _edits(model: nn.Module, attachment: Attachment) -> list[tuple[str, nn.Module, object, WeightEdit, object]]:
    """Every site's (path, module, weight format, edit, placement), asked of the methods before any weight is
    written, so a method that refuses (e.g. an IA3 vector with a zero) does so while nothing has changed."""
    registry = manager()
    edits = []
    for placement in attachment.plan.placements:
        path = placement.site.path
        if attachment.branches[path].kept_when_merged:  # runs on, merged or not: nothing to edit
            continue
        module = base_module(model, path)
        fmt = site_format(placement.site, module)
        if fmt is None:
            raise NotMergeableError(f"{attachment.name!r} at {path!r}: no weight format recognises "
                                    f"{type(module).__name__}, so nothing can be folded into it")
        edit = registry.method(placement.method).merge_edit(placement.site, module, attachment.branches[path])
        edits.append((path, module, fmt, edit, placement))
    return edits


def _merge(model: nn.Module, ledger: Ledger, attachment: Attachment, exact: bool, into: str, journal: Journal,
           keep_rows: bool = False) -> None:
    """Fold `attachment` in, site by site, each site recorded in `journal` so that a later failure puts every
    weight back bit for bit. The records that make unmerge exact are kept; `exact=False` drops them at the end
    of the whole pass (see `forget_records`)."""
    done: list[MergedSite] = []
    edits = _edits(model, attachment)
    with progress.task("merging", len(edits), "sites") as bar:
        for path, module, fmt, edit, placement in edits:
            if into == "float" and not fmt.is_view:  # a copy format (quantized): swap in a float linear instead
                linear, record = merged_float_linear(fmt, module, edit, placement.site.dtype, path=path)
                host = ledger.hosts[path]
                journal.record(f"merge {attachment.name!r} at {path!r}",
                               lambda h=host, m=module: setattr(h, "base", m))
                host.base = linear
                done.append(MergedSite(path, manager().format_of(linear), edit, record, replaced=module))
            else:
                site = MergedSite(path, fmt, edit, apply_edit(fmt, module, edit, path=path, keep_rows=keep_rows))
                journal.record(f"merge {attachment.name!r} at {path!r}", lambda s=site: _revert(model, ledger, s))
                done.append(site)
            done[-1].branch, done[-1].branch_state = attachment.branches[path], _tensors(attachment.branches[path])
            bar.advance()
    _set_merged(ledger, attachment, done, journal)
    journal.record(f"exactness of {attachment.name!r}", lambda e=attachment.exact: setattr(attachment, "exact", e))
    attachment.exact = exact


def _set_merged(ledger: Ledger, attachment: Attachment, merged: list[MergedSite] | None, journal: Journal) -> None:
    before, order = attachment.merged, list(ledger.merge_order)

    def undo() -> None:
        attachment.merged = before
        ledger.merge_order[:] = order

    journal.record(f"ledger entry of {attachment.name!r}", undo)
    attachment.merged = merged
    if merged is None:
        ledger.merge_order.remove(attachment.name)
    else:
        ledger.merge_order.append(attachment.name)


def forget_records(attachment: Attachment) -> None:
    """After a pass that merged with `exact=False` has completed: drop what made its undo exact."""
    if not attachment.exact:
        for site in attachment.merged or []:
            site.record.forget()


def _tensors(branch: Branch) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in branch.state_dict(keep_vars=True).items()}


@contextlib.contextmanager
def _as_merged(merged: MergedSite) -> Iterator[None]:
    """Inside the block, the site's branch holds the tensors it had when it was merged (an edit's functions may
    read the branch's live parameters); its present ones are put back after."""
    live = merged.branch.state_dict(keep_vars=True) if merged.branch is not None else {}
    changed = [k for k, t in merged.branch_state.items() if k in live and not _same(live[k], t)]
    if not changed:
        yield
        return
    present = {k: live[k].detach().clone() for k in changed}
    with torch.no_grad():
        for k in changed:
            live[k].copy_(merged.branch_state[k])
    try:
        yield
    finally:
        with torch.no_grad():
            for k in changed:
                live[k].copy_(present[k])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(bits(a.detach()), bits(b)))


def _revert(model: nn.Module, ledger: Ledger, merged: MergedSite):
    """Take one site's merge out; return how to put it back exactly."""
    if merged.replaced is not None:
        host = ledger.hosts[merged.path]
        linear, host.base = host.base, merged.replaced
        return lambda: setattr(host, "base", linear)
    module = base_module(model, merged.path)
    with _as_merged(merged):
        redo = revert_edit(merged.fmt, module, merged.edit, merged.record)

    def put_back() -> None:
        with _as_merged(merged):
            redo_edit(merged.fmt, base_module(model, merged.path), merged.edit, redo)

    return put_back


def _take_out(model: nn.Module, ledger: Ledger, attachment: Attachment, journal: Journal) -> None:
    for site in reversed(attachment.merged or []):
        redo = _revert(model, ledger, site)
        journal.record(f"unmerge {attachment.name!r} at {site.path!r}", redo)
    _set_merged(ledger, attachment, None, journal)


def _set_active(ledger: Ledger, names: list[str], journal: Journal) -> None:
    before = list(ledger.active)
    journal.record("active attachments", lambda: ledger.active.__setitem__(slice(None), before))
    ledger.active[:] = [n for n in ledger.attachments if n in names]


def _check_can_merge(model: nn.Module, ledger: Ledger, attachment: Attachment, doing: str = "merge") -> None:
    registry = manager()
    for placement in attachment.plan.placements:
        method = registry.method(placement.method)
        if not method.mergeable and not attachment.branches[placement.site.path].kept_when_merged:
            raise NotMergeableError(f"attachment {attachment.name!r} cannot be merged: method {method.name!r} at "
                                    f"{placement.site.path!r} has no merge (it stays a separate branch)")
    if ledger.disabled or ledger.routing is not None:
        raise LedgerError(f"cannot {doing} {attachment.name!r} inside surgery.disabled() or surgery.per_sample(): "
                          "they run the model without its merged attachments; leave the block first")
    check_folds(model, ledger, attachment)


def merge_in(model: nn.Module, ledger: Ledger, attachment: Attachment, exact: bool, into: str, journal: Journal,
             keep_rows: bool) -> None:
    """The merge pass on a ledger, in `journal` (used by `merge` and `bake`)."""
    _check_can_merge(model, ledger, attachment)
    _merge(model, ledger, attachment, exact, into, journal, keep_rows=keep_rows)
    if attachment.name not in ledger.active:  # a merged attachment acts, so it is active
        _set_active(ledger, [*ledger.active, attachment.name], journal)
    ledger.refresh()


def merge(model: nn.Module, name: str, *, exact: bool = True, into: str = "weights") -> dict[str, dict[str, float]]:
    """Fold attachment `name` into the base weights in place; its branches stop running, except those
    `kept_when_merged` (module copies), which have no weight edit and run on; it counts as active (it acts).
    With `exact`, the ledger keeps what makes `unmerge` restore the weights bit for bit. Returns per-site reports
    (e.g. the requantization error of quantized sites, see `surgery.engine.weight_edits.merge_error`).

    Refused (NotMergeableError, nothing changed) where the merged weights would not compute what the branches
    do: a NaN/inf or overflowing update, or another attachment's branch at the same site that does not commute
    with the fold (see `fold_conflict`).

    `into="float"`: at sites whose weight format is a copy (quantized layers), do not requantize; swap in a
    frozen nn.Linear holding the dequantized weight plus the update, in the site's dtype. Unmerge puts the
    original module object back. Elsewhere it merges as `into="weights"` does.
    """
    if into not in MERGE_TARGETS:
        raise ValueError(f"merge into={into!r}: expected one of {', '.join(map(repr, MERGE_TARGETS))}")
    model = unwrap(model)
    with model_lock(model):
        ledger = require_ledger(model)
        attachment = ledger.get(name)
        if attachment.merged is not None:
            raise LedgerError(f"attachment {name!r} is already merged")
        with transaction() as journal:
            journal.record("hosts' running branches", ledger.refresh)  # recorded first: runs last on rollback
            merge_in(model, ledger, attachment, exact, into, journal, keep_rows=not exact)
        forget_records(attachment)
        return {m.path: m.record.report for m in attachment.merged or [] if m.record.report}


def unmerge_out(model: nn.Module, ledger: Ledger, attachment: Attachment, journal: Journal,
                check: bool = True) -> list[Attachment]:
    """The unmerge pass on a ledger, in `journal`. Attachments merged after it on the same sites are taken out
    first and merged again after. With `check`, refused if the result would not compute what the model
    computes now (see `fold_conflict`). Returns the attachments merged again (for `forget_records`)."""
    name = attachment.name
    if attachment.merged is None:
        raise LedgerError(f"attachment {name!r} is not merged")
    if ledger.disabled or ledger.routing is not None:
        raise LedgerError(f"cannot unmerge {name!r} inside surgery.disabled() or surgery.per_sample(); leave the block first")
    paths = set(attachment.branches)
    later = [ledger.attachments[n] for n in ledger.merge_order[ledger.merge_order.index(name) + 1:]
             if paths & set(ledger.attachments[n].branches)]
    exact = {a.name: a.exact for a in later}
    into = {a.name: "float" if any(m.replaced is not None for m in a.merged or []) else "weights" for a in later}
    if check:
        check_folds(model, ledger, attachment)
        for other in later:  # merged again with `attachment` running as a branch beside it
            shared = paths & set(other.branches)
            _check_with(model, ledger, other, attachment, shared)
    merged_as = {a.name: list(a.merged or []) for a in later}
    for other in reversed(later):
        _take_out(model, ledger, other, journal)
    _take_out(model, ledger, attachment, journal)
    for other in later:  # merged again with the values it was merged with, even if its branches changed since
        with contextlib.ExitStack() as stack:
            for site in merged_as[other.name]:
                stack.enter_context(_as_merged(site))
            _merge(model, ledger, other, exact[other.name], into[other.name], journal)
    ledger.refresh()
    return later


def _check_with(model: nn.Module, ledger: Ledger, folded: Attachment, unmerged: Attachment, paths: set[str]) -> None:
    """check_folds for `folded` at `paths` as if `unmerged` were not merged."""
    merged, unmerged.merged = unmerged.merged, None
    try:
        check_folds(model, ledger, folded, paths)
    finally:
        unmerged.merged = merged


def unmerge(model: nn.Module, name: str) -> None:
    """Take a merged attachment back out of the base weights. Attachments merged after it on the same sites
    are unmerged first and merged again after, so every weight goes back exactly. Refused (nothing changed) if
    the model would then compute something else (see `fold_conflict`); `detach` always works."""
    model = unwrap(model)
    with model_lock(model):
        ledger = require_ledger(model)
        attachment = ledger.get(name)
        with transaction() as journal:
            journal.record("hosts' running branches", ledger.refresh)
            again = unmerge_out(model, ledger, attachment, journal)
        for other in again:
            forget_records(other)
