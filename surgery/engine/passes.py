"""The passes: attach, detach, bake, and choosing what runs (merge and unmerge are in `merge.py`).

Each pass either completes or leaves the model exactly as it was: it records the undo of every change in a
journal just before making it (`transaction.py`), and rolls the journal back if anything raises, a plugin's code
included. Passes on one model run one at a time, under the model's lock (`transaction.model_lock`).
"""
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
from surgery.engine.host import (
    Host,
    ParameterHost,
    install_parameter_host,
    reinstall_parameter_host,
    remove_parameter_host,
)
from surgery.engine.ledger import LEDGER_ATTRIBUTE, Attachment, Ledger, base_module, find_ledger, require_ledger, unwrap
from surgery.engine.merge import _set_merged, check_folds, forget_records, merge_in, unmerge_out
from surgery.engine.plain_save import install as install_plain_save
from surgery.engine.plain_save import reinstall as reinstall_plain_save
from surgery.engine.plain_save import uninstall as uninstall_plain_save
from surgery.engine.transaction import TRACE_LOCK, Journal, check_name, current_journal, model_lock, transaction
from surgery.errors import LedgerError, NotMergeableError, SurgeryError
from surgery.rules.plan import Plan, plan_sites
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


def _put(parent: nn.Module, attribute: str, module: nn.Module) -> None:
    """Make `module` the child `attribute` of `parent` (a Host in, or the base module back)."""
    setattr(parent, attribute, module)


def _install(model: nn.Module, ledger: Ledger, site: Site, name: str, branch: Branch,
             homes: dict[int, list[tuple[nn.Module, str]]]) -> None:
    """Put `branch` at `site` (swapping a Host in, or parametrizing a parameter site, where none stands yet),
    recorded in the pass's journal."""
    journal = current_journal()
    path = site.path
    host = ledger.hosts.get(path)
    if host is None and site.kind in PARAMETER_KINDS:  # a parameter: parametrized, not swapped
        module = base_module(model, path)
        made: list[ParameterHost] = []

        def unparametrize() -> None:
            for host in made:
                if ledger.hosts.get(path) is host:
                    del ledger.hosts[path]
                remove_parameter_host(host)

        journal.record(f"parameter host at {path!r}", unparametrize)
        host = install_parameter_host(module, path.rpartition(".")[2], site.transposed)
        made.append(host)
        host.train(module.training)
        ledger.hosts[path] = host
    elif host is None:
        base = model.get_submodule(path)
        places = homes[id(base)]
        host = Host(base)
        host.train(base.training)

        def unhost(host: Host = host) -> None:
            for parent, attribute in places:
                if parent._modules.get(attribute) is host:
                    _put(parent, attribute, base)
            if ledger.hosts.get(path) is host:
                del ledger.hosts[path], ledger.homes[path]

        journal.record(f"host at {path!r}", unhost)
        ledger.hosts[path], ledger.homes[path] = host, places
        for parent, attribute in places:
            _put(parent, attribute, host)
    branch.train(host.training)  # a new branch takes the mode of the model around it (eval: no dropout)
    journal.record(f"branch {name!r} at {path!r}", lambda: host.remove(name) if name in host.branches else None)
    host.add(name, branch)


def _readd(host: Host, name: str, branch: Branch, position: int) -> None:
    """Put a removed branch back at its place in the Host's attachment order."""
    if name in host.branches:
        return
    items = list(host.branches.items())
    items.insert(position, (name, branch))
    for key in list(host.branches):
        del host.branches[key]
    for key, value in items:
        host.branches[key] = value
    host.running = host.running


def _uninstall(ledger: Ledger, path: str, name: str, journal: Journal) -> None:
    host = ledger.hosts[path]
    branch, position = host.branches[name], list(host.branches).index(name)
    journal.record(f"branch {name!r} at {path!r}", lambda: _readd(host, name, branch, position))
    host.remove(name)
    if not len(host.branches) and isinstance(host, ParameterHost):

        def reparametrize() -> None:
            reinstall_parameter_host(host)
            ledger.hosts[path] = host

        journal.record(f"parameter host at {path!r}", reparametrize)
        remove_parameter_host(host)
        del ledger.hosts[path]
    elif not len(host.branches):
        places = ledger.homes[path]

        def rehost() -> None:
            for parent, attribute in places:
                _put(parent, attribute, host)
            ledger.hosts[path], ledger.homes[path] = host, places

        journal.record(f"host at {path!r}", rehost)
        for parent, attribute in places:
            _put(parent, attribute, host.base)
        del ledger.hosts[path], ledger.homes[path]


def _restore(journal: Journal, what: str, container: dict | list) -> None:
    """Record how to give a ledger dict or list back its present contents (order included)."""
    copy = dict(container) if isinstance(container, dict) else list(container)

    def undo() -> None:
        container.clear()
        container.update(copy) if isinstance(container, dict) else container.extend(copy)

    journal.record(what, undo)


def _build(model: nn.Module, name: str, plan: Plan) -> dict[str, Branch]:
    """Every placement's branch, from its method plugin (which never touches the model)."""
    registry = manager()
    branches: dict[str, Branch] = {}
    for placement in plan.placements:
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
    return branches


def _check_beside_merged(model: nn.Module, ledger: Ledger, name: str, plan: Plan, branches: dict[str, Branch]) -> None:
    """Refuse new branches at sites where an attachment is merged whose fold they would not commute with."""
    registry = manager()
    for placement in plan.placements:
        path = placement.site.path
        host = ledger.hosts.get(path)
        merged = [n for n in (host.branches if host is not None else ()) if ledger.attachments[n].merged is not None]
        if not merged:
            continue
        method, branch = registry.method(placement.method), branches[path]
        form = "unknown"
        if method.mergeable:
            try:
                form = method.merge_edit(placement.site, base_module(model, path), branch).form
            except Exception:
                pass
        for other in merged:
            try:
                check_folds(model, ledger, ledger.attachments[other], {path}, extra={path: [(name, branch, form)]})
            except NotMergeableError as err:
                raise NotMergeableError(f"cannot attach {name!r} at {path!r} while {other!r} is merged there: "
                                        f"{str(err).split(': ', 1)[-1]} Unmerge {other!r} first.") from None


def attach(model: nn.Module, rules: RuleSource, name: str = "default", *, freeze: bool = True,
           active: bool = True, args: tuple | None = None, kwargs: dict | None = None,
           task: str | None = None) -> Attachment:
    """Apply a rule set to `model` in place under `name` (see `check_name` for valid names). With `freeze`,
    every base parameter stops requiring grad (restored by the last detach). `task` ("sequence-classification",
    "token-classification", or PEFT's SEQ_CLS/TOKEN_CLS) adds a trainable copy of the task head, found by its
    role (see `surgery.rules.tasks`). If anything fails, the model is left exactly as it was."""
    model = unwrap(model)
    check_name(name)
    refuse_peft(model)
    with model_lock(model):
        ruleset = resolve_ruleset(rules)
        ledger = find_ledger(model)
        if ledger is not None and name in ledger.attachments:
            raise LedgerError(f"an attachment named {name!r} already exists; detach it first or pick another name")
        if ledger is not None:
            report = ledger.report
        else:
            with TRACE_LOCK:
                report = sites_of(model, args, kwargs)
        if task is not None:
            ruleset = with_task(ruleset, task, report)
        plan = plan_sites(ruleset, report, base_parameter_count(model))
        branches = _build(model, name, plan)  # build everything first: plugins never touch the model
        if ledger is not None:
            _check_beside_merged(model, ledger, name, plan, branches)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        fresh = ledger is None
        if fresh:
            ledger = Ledger(report=report, requires_grad=flags)
        with transaction() as journal:
            journal.record("hosts' running branches", ledger.refresh)  # recorded first: runs last on rollback
            if fresh:
                journal.record("the ledger", lambda: model.__dict__.pop(LEDGER_ATTRIBUTE, None))
                model.__dict__[LEDGER_ATTRIBUTE] = ledger
                journal.record("plain save_pretrained", lambda: uninstall_plain_save(model))
                install_plain_save(model)  # save_pretrained writes the plain model's keys, the adapters beside
            homes = _homes(model)
            sites = {p.site.path: p.site for p in plan.placements}
            for path, branch in branches.items():
                _install(model, ledger, sites[path], name, branch, homes)
            attachment = Attachment(name=name, plan=plan, branches=branches)
            journal.record(f"attachment {name!r}", lambda: ledger.attachments.pop(name, None))
            ledger.attachments[name] = attachment
            registry = manager()
            for method_name in dict.fromkeys(p.method for p in plan.placements):
                mine = {p.site.path: branches[p.site.path] for p in plan.placements if p.method == method_name}
                undo = registry.method(method_name).attach_model(model, mine)
                if undo is not None:
                    journal.record(f"{method_name}.attach_model", undo)
                    attachment.undo.append(undo)
                    attachment.undo_methods.append(method_name)
            if active:
                _restore(journal, "active attachments", ledger.active)
                ledger.active.append(name)
            if freeze:
                journal.record("requires_grad flags", _flags_of(model))
                keep = {id(p) for a in ledger.attachments.values() for b in a.branches.values() for p in b.parameters()}
                for p in model.parameters():
                    if id(p) not in keep:
                        p.requires_grad_(False)
            ledger.refresh()
        return attachment


def _set_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    """Put back requires_grad flags recorded by parameter name (names survive deepcopy, ids do not)."""
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


def _flags_of(model: nn.Module):
    """A function that gives every parameter of `model` back its present requires_grad flag (by object: names
    change while Hosts stand in the model)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)

    return restore


def _remove(model: nn.Module, ledger: Ledger, attachment: Attachment, journal: Journal) -> None:
    """Take an (unmerged) attachment off the model: its branches, its ledger entry, then its model-level changes
    (the plugins' undo functions, last: an attachment of one method has one, so if it raises nothing of it has
    been undone and the journal puts the rest back exactly)."""
    name = attachment.name
    for path in reversed(list(attachment.branches)):
        _uninstall(ledger, path, name, journal)
    _restore(journal, "attachments", ledger.attachments)
    _restore(journal, "active attachments", ledger.active)
    del ledger.attachments[name]
    if name in ledger.active:
        ledger.active.remove(name)
    if not ledger.attachments:
        journal.record("requires_grad flags", _flags_of(model))
        _set_requires_grad(model, ledger.requires_grad)
        journal.record("the ledger", lambda: model.__dict__.__setitem__(LEDGER_ATTRIBUTE, ledger))
        del model.__dict__[LEDGER_ATTRIBUTE]
        plain = model.__dict__.get("save_pretrained")
        journal.record("plain save_pretrained", lambda: reinstall_plain_save(model, plain))
        uninstall_plain_save(model)
    ledger.refresh()
    registry = manager()
    methods = attachment.undo_methods + [None] * (len(attachment.undo) - len(attachment.undo_methods))
    for index in reversed(range(len(attachment.undo))):
        attachment.undo[index]()
        method_name = methods[index]
        if method_name is not None:  # undone: if a later undo raises, make this change again

            def redo(index: int = index, method_name: str = method_name) -> None:
                mine = {p.site.path: attachment.branches[p.site.path] for p in attachment.plan.placements
                        if p.method == method_name}
                again = registry.method(method_name).attach_model(model, mine)
                attachment.undo[index] = again if again is not None else (lambda: None)

            journal.record(f"undo of {method_name}.attach_model", redo)


def detach(model: nn.Module, name: str) -> None:
    """Remove attachment `name` (unmerging it first if merged). After the last detach the model holds its
    original module objects, parameters and requires_grad flags again. If anything fails, nothing changes."""
    model = unwrap(model)
    with model_lock(model):
        ledger = require_ledger(model)
        attachment = ledger.get(name)
        again: list[Attachment] = []
        with transaction() as journal:
            journal.record("hosts' running branches", ledger.refresh)
            if attachment.merged is not None:
                again = unmerge_out(model, ledger, attachment, journal, check=False)
            _remove(model, ledger, attachment, journal)
        for other in again:
            forget_records(other)


def bake(model: nn.Module, name: str) -> dict[str, dict[str, float]]:
    """Merge attachment `name` into the base weights for good and remove its branches: the ledger forgets it,
    so it cannot be unmerged. A trained module copy (`kept_when_merged`) takes the original module's place.
    After the last attachment is baked the model is a plain model again (ready for `save_pretrained`). Other
    attachments merged on the same sites must be unmerged first. Refused, with nothing changed, where `merge`
    would be."""
    model = unwrap(model)
    with model_lock(model):
        ledger = require_ledger(model)
        attachment = ledger.get(name)
        paths = set(attachment.branches)
        blocking = [n for n in ledger.merge_order if n != name and paths & set(ledger.attachments[n].branches)]
        if blocking:
            raise LedgerError(f"cannot bake {name!r} while {', '.join(blocking)} is merged on the same sites; unmerge it first")
        with transaction() as journal:
            journal.record("hosts' running branches", ledger.refresh)
            if attachment.merged is None:
                merge_in(model, ledger, attachment, False, "weights", journal, keep_rows=False)
            report = {m.path: m.record.report for m in attachment.merged if m.record.report}
            kept = stand_ins(model, ledger, attachment)
            _set_merged(ledger, attachment, None, journal)  # the weights keep the merge; nothing is left to undo it
            _remove(model, ledger, attachment, journal)
            put_in_place(ledger, kept, journal)
        return report


def set_active(model: nn.Module, names: list[str] | str) -> None:
    """Choose which attachments run (in attachment order); the others stay attached but idle. A merged
    attachment keeps acting, so it must be among `names` (unmerge it first to leave it out)."""
    model = unwrap(model)
    with model_lock(model):
        ledger = require_ledger(model)
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            ledger.get(n)
        merged = [n for n in ledger.merge_order if n not in names]
        if merged:
            raise LedgerError(f"{', '.join(map(repr, merged))} {'is' if len(merged) == 1 else 'are'} merged into the "
                              "weights and keep acting whatever is active; unmerge first to leave it out of set_active")
        previous, ledger.active = ledger.active, [n for n in ledger.attachments if n in names]
        try:
            ledger.refresh()
        except BaseException:  # all or nothing: the previous choice, and every host told again
            ledger.active = previous
            ledger.refresh()
            raise


def active(model: nn.Module) -> list[str]:
    """The names of the attachments that act: the active ones, merged ones included (in attachment order)."""
    model = unwrap(model)
    with model_lock(model):
        ledger = find_ledger(model)
        return list(ledger.active) if ledger else []


@contextlib.contextmanager
def _ledger_setting(ledger: Ledger, attribute: str, value: object, doing: str) -> Iterator[None]:
    """Set one of the ledger's run-time settings inside a block (no attachment may be merged), then put it back."""
    if ledger.merge_order:
        raise LedgerError(f"cannot {doing} while {', '.join(ledger.merge_order)} is merged into the weights; unmerge first")
    previous = getattr(ledger, attribute)
    setattr(ledger, attribute, value)
    try:
        ledger.refresh()
        yield
    finally:
        setattr(ledger, attribute, previous)
        ledger.refresh()


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block: no branch runs. Merged attachments must be unmerged first.
    The block holds the model's lock: other threads' passes on this model wait until it ends."""
    model = unwrap(model)
    with model_lock(model):
        ledger = find_ledger(model)
        if ledger is None:
            yield
            return
        with _ledger_setting(ledger, "disabled", True, "disable adapters"):
            yield


@contextlib.contextmanager
def per_sample(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, sample i of every batch runs only attachment `names[i]` (None: the base model alone),
    whatever is active. A batch of k * len(names) (beam search, several sequences per prompt) routes each run of
    k consecutive samples alike. Works through `model.generate(...)`. The block holds the model's lock."""
    model = unwrap(model)
    with model_lock(model):
        ledger = require_ledger(model)
        if isinstance(names, str):
            raise LedgerError(f"per_sample takes a sequence of names (one per sample), not the string {names!r}")
        names = tuple(names)
        if not names:
            raise LedgerError("per_sample needs one name (or None) per sample; got none")
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
