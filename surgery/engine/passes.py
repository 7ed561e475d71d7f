"""The passes: attach, detach, bake, and choosing what runs (merge and unmerge are in `merge.py`). Each either completes or leaves the
model exactly as it was."""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Sequence

from torch import nn

from surgery.analysis.report import sites_of
from surgery.core.method import Branch, base_parameter_count
from surgery.core.registry import manager
from surgery.core.sites import PARAMETER_KINDS, Site
from surgery.engine.copies import put_in_place, stand_ins
from surgery.engine.foreign import refuse_peft
from surgery.engine.host import Host, ParameterHost, install_parameter_host, remove_parameter_host
from surgery.engine.ledger import LEDGER_ATTRIBUTE, Attachment, Ledger, base_module, find_ledger, require_ledger, unwrap
from surgery.engine.merge import merge, unmerge
from surgery.engine.plain_save import install as install_plain_save
from surgery.engine.plain_save import uninstall as uninstall_plain_save
from surgery.errors import LedgerError, SurgeryError
from surgery.rules.plan import plan_sites
from surgery.rules.schema import RuleSource, resolve_ruleset
from surgery.rules.tasks import with_task


def _homes(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """For every module (by id): each (parent, attribute name) that refers to it (a shared module has several)."""
    homes: dict[int, list[tuple[nn.Module, str]]] = {}
    parents = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}
    for parent in parents.values():
        for child_name, child in parent._modules.items():
            if child is not None:
                homes.setdefault(id(child), []).append((parent, child_name))
    return homes


def _install(model: nn.Module, ledger: Ledger, site: Site, name: str, branch: Branch,
             homes: dict[int, list[tuple[nn.Module, str]]]) -> None:
    path = site.path
    host = ledger.hosts.get(path)
    if host is None and site.kind in PARAMETER_KINDS:  # a parameter: parametrized, not swapped
        module = base_module(model, path)
        host = install_parameter_host(module, path.rpartition(".")[2], site.transposed)
        host.train(module.training)
        ledger.hosts[path] = host
    elif host is None:
        base = model.get_submodule(path)
        homes = homes[id(base)]
        host = Host(base)
        host.train(base.training)
        for parent, attr in homes:
            setattr(parent, attr, host)
        ledger.hosts[path], ledger.homes[path] = host, homes
    branch.train(host.training)  # a new branch takes the mode of the model around it (eval: no dropout)
    host.add(name, branch)


def _uninstall(ledger: Ledger, path: str, name: str) -> None:
    host = ledger.hosts[path]
    host.remove(name)
    if not len(host.branches) and isinstance(host, ParameterHost):
        remove_parameter_host(host)
        del ledger.hosts[path]
    elif not len(host.branches):
        for parent, attr in ledger.homes.pop(path):
            setattr(parent, attr, host.base)
        del ledger.hosts[path]


def attach(model: nn.Module, rules: RuleSource, name: str = "default", *, freeze: bool = True,
           active: bool = True, args: tuple | None = None, kwargs: dict | None = None,
           task: str | None = None) -> Attachment:
    """Apply a rule set to `model` in place under `name`. With `freeze`, every base parameter stops requiring
    grad (restored by the last detach). `task` ("sequence-classification", "token-classification", or PEFT's
    SEQ_CLS/TOKEN_CLS) adds a trainable copy of the task head, found by its role (see `surgery.rules.tasks`).
    If anything fails, the model is left exactly as it was."""
    model = unwrap(model)
    refuse_peft(model)
    ruleset = resolve_ruleset(rules)
    ledger = find_ledger(model)
    fresh = ledger is None
    if ledger is not None and name in ledger.attachments:
        raise LedgerError(f"an attachment named {name!r} already exists; detach it first or pick another name")
    if fresh:
        ledger = Ledger(report=sites_of(model, args, kwargs))
    if task is not None:
        ruleset = with_task(ruleset, task, ledger.report)
    plan = plan_sites(ruleset, ledger.report, base_parameter_count(model))
    registry = manager()
    branches: dict[str, Branch] = {}
    for placement in plan.placements:  # build everything first: plugins never touch the model
        path = placement.site.path
        try:
            branch = registry.method(placement.method).build(placement.site, base_module(model, path),
                                                             placement.params, placement.roles)
        except Exception as err:
            raise SurgeryError(f"attach {name!r}: method {placement.method!r} failed at site {path!r}: {err}") from err
        if not isinstance(branch, Branch):
            raise SurgeryError(f"attach {name!r}: method {placement.method!r} returned {type(branch).__name__} "
                               f"at site {path!r}, not a surgery.Branch")
        branches[path] = branch
    sites = {p.site.path: p.site for p in plan.placements}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    installed: list[str] = []
    try:
        if fresh:
            ledger.requires_grad = flags
            model.__dict__[LEDGER_ATTRIBUTE] = ledger
            install_plain_save(model)  # save_pretrained writes the plain model's keys, the adapters beside
        homes = _homes(model)
        for path, branch in branches.items():
            _install(model, ledger, sites[path], name, branch, homes)
            installed.append(path)
        attachment = Attachment(name=name, plan=plan, branches=branches)
        ledger.attachments[name] = attachment
        for method_name in dict.fromkeys(p.method for p in plan.placements):
            mine = {p.site.path: branches[p.site.path] for p in plan.placements if p.method == method_name}
            undo = registry.method(method_name).attach_model(model, mine)
            if undo is not None:
                attachment.undo.append(undo)
        if active:
            ledger.active.append(name)
        if freeze:
            keep = {id(p) for a in ledger.attachments.values() for b in a.branches.values() for p in b.parameters()}
            for p in model.parameters():
                if id(p) not in keep:
                    p.requires_grad_(False)
        ledger.refresh()
    except BaseException:
        failed = ledger.attachments.pop(name, None)
        for undo in reversed(failed.undo if failed else []):
            undo()
        for path in reversed(installed):
            _uninstall(ledger, path, name)
        if name in ledger.active:
            ledger.active.remove(name)
        if fresh:
            model.__dict__.pop(LEDGER_ATTRIBUTE, None)
            uninstall_plain_save(model)
        _set_requires_grad(model, flags)
        ledger.refresh()
        raise
    return attachment


def _set_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    """Put back requires_grad flags recorded by parameter name (names survive deepcopy, ids do not)."""
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def detach(model: nn.Module, name: str) -> None:
    """Remove attachment `name` (unmerging it first if merged). After the last detach the model holds its
    original module objects, parameters and requires_grad flags again."""
    model = unwrap(model)
    ledger = require_ledger(model)
    attachment = ledger.get(name)
    if attachment.merged is not None:
        unmerge(model, name)
    for undo in reversed(attachment.undo):
        undo()
    for path in reversed(list(attachment.branches)):
        _uninstall(ledger, path, name)
    del ledger.attachments[name]
    if name in ledger.active:
        ledger.active.remove(name)
    if not ledger.attachments:
        _set_requires_grad(model, ledger.requires_grad)
        del model.__dict__[LEDGER_ATTRIBUTE]
        uninstall_plain_save(model)
    ledger.refresh()


def bake(model: nn.Module, name: str) -> dict[str, dict[str, float]]:
    """Merge attachment `name` into the base weights for good and remove its branches: the ledger forgets it,
    so it cannot be unmerged. A trained module copy (`kept_when_merged`) takes the original module's place.
    After the last attachment is baked the model is a plain model again (ready for `save_pretrained`). Other
    attachments merged on the same sites must be unmerged first."""
    model = unwrap(model)
    ledger = require_ledger(model)
    attachment = ledger.get(name)
    paths = set(attachment.branches)
    blocking = [n for n in ledger.merge_order if n != name and paths & set(ledger.attachments[n].branches)]
    if blocking:
        raise LedgerError(f"cannot bake {name!r} while {', '.join(blocking)} is merged on the same sites; unmerge it first")
    report = merge(model, name, exact=False) if attachment.merged is None else \
        {m.path: m.record.report for m in attachment.merged if m.record.report}
    kept = stand_ins(model, ledger, attachment)
    attachment.merged = None  # the weights keep the merge; nothing is left to undo it
    ledger.merge_order.remove(name)
    detach(model, name)
    put_in_place(ledger, kept)
    return report


def set_active(model: nn.Module, names: list[str] | str) -> None:
    """Choose which attachments run (in attachment order); the others stay attached but idle."""
    ledger = require_ledger(unwrap(model))
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        ledger.get(n)
    ledger.active = [n for n in ledger.attachments if n in names]
    ledger.refresh()


def active(model: nn.Module) -> list[str]:
    """The names of the active attachments."""
    ledger = find_ledger(unwrap(model))
    return list(ledger.active) if ledger else []


@contextlib.contextmanager
def _ledger_setting(ledger: Ledger, attribute: str, value: object, doing: str) -> Iterator[None]:
    """Set one of the ledger's run-time settings inside a block (no attachment may be merged), then put it back."""
    if ledger.merge_order:
        raise LedgerError(f"cannot {doing} while {', '.join(ledger.merge_order)} is merged into the weights; unmerge first")
    previous = getattr(ledger, attribute)
    setattr(ledger, attribute, value)
    ledger.refresh()
    try:
        yield
    finally:
        setattr(ledger, attribute, previous)
        ledger.refresh()


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block: no branch runs. Merged attachments must be unmerged first."""
    ledger = find_ledger(unwrap(model))
    if ledger is None:
        yield
        return
    with _ledger_setting(ledger, "disabled", True, "disable adapters"):
        yield


@contextlib.contextmanager
def per_sample(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, sample i of every batch runs only attachment `names[i]` (None: the base model alone),
    whatever is active. A batch of k * len(names) (beam search, several sequences per prompt) routes each run of
    k consecutive samples alike. Works through `model.generate(...)`."""
    ledger = require_ledger(unwrap(model))
    names = tuple(names)
    for n in names:
        if n is not None:
            ledger.get(n)
    with _ledger_setting(ledger, "routing", names, "route per sample"):
        yield


class TrainableCount(NamedTuple):
    """(trainable, total) parameter counts; prints as `trainable 0.19% (2,359,296 / 1,231,940,608)`."""

    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable {share:.2f}% ({self.trainable:,} / {self.total:,})"


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable parameters of attachment `name` (its branches' parameters that require grad), each once: what
    its optimizer takes."""
    seen: dict[int, nn.Parameter] = {}
    for branch in require_ledger(unwrap(model)).get(name).branches.values():
        for p in branch.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def trainable_parameters(model: nn.Module) -> TrainableCount:
    """How many parameters require grad, out of all (shared parameters counted once)."""
    params = list(unwrap(model).parameters())
    return TrainableCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
