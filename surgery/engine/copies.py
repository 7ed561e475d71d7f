"""Branches that stand in for their base module whole (`Branch.kept_when_merged`, e.g. trained module copies): on
bake, the branch's `baked_module()` takes the original module's place for good."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from surgery.core.method import Branch
from surgery.engine.ledger import Attachment, Ledger, base_module
from surgery.engine.transaction import Journal


@dataclass
class StandIn:
    """One kept branch of an attachment being baked: where its original module lives."""

    path: str
    branch: Branch
    original: nn.Module
    homes: list[tuple[nn.Module, str]]


def stand_ins(model: nn.Module, ledger: Ledger, attachment: Attachment) -> list[StandIn]:
    """The attachment's kept branches, read before its detach (which forgets where the originals live)."""
    return [StandIn(path, branch, base_module(model, path), list(ledger.homes[path]))
            for path, branch in attachment.branches.items() if branch.kept_when_merged]


def put_in_place(ledger: Ledger, found: list[StandIn], journal: Journal | None = None) -> None:
    """After the attachment's detach: each kept branch's module replaces the original, taking the requires_grad
    flags the original has now. Where a Host of another attachment still stands, it becomes that Host's base.
    With `journal` (a pass in progress), each change is recorded so that a rollback puts the original back."""
    for s in found:
        module = s.branch.baked_module()
        if journal is not None:
            journal.record(f"module copy at {s.path!r}", _undo_of(ledger, s, module))
        flags = {n: p.requires_grad for n, p in s.original.named_parameters()}
        for n, p in module.named_parameters():
            p.requires_grad_(flags.get(n, False))
        module.train(s.original.training)
        host = ledger.hosts.get(s.path)
        if host is not None:
            host.base = module
        else:
            for parent, attr in s.homes:
                setattr(parent, attr, module)


def _undo_of(ledger: Ledger, s: StandIn, module: nn.Module) -> Callable[[], None]:
    """How to take the baked `module` out again: the original back where it was, the module's flags and mode."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    modes = [(m, m.training) for m in module.modules()]
    host = ledger.hosts.get(s.path)

    def undo() -> None:
        if host is not None:
            if host.base is module:
                host.base = s.original
        else:
            for parent, attr in s.homes:
                if parent._modules.get(attr) is module:
                    setattr(parent, attr, s.original)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode

    return undo
