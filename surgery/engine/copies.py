"""Branches that stand in for their base module whole (`Branch.kept_when_merged`, e.g. trained module copies): on
bake, the branch's `baked_module()` takes the original module's place for good."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from surgery.core.method import Branch
from surgery.engine.ledger import Attachment, Ledger, base_module


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


def put_in_place(ledger: Ledger, found: list[StandIn]) -> None:
    """After the attachment's detach: each kept branch's module replaces the original, taking the requires_grad
    flags the original has now. Where a Host of another attachment still stands, it becomes that Host's base."""
    for s in found:
        module = s.branch.baked_module()
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
