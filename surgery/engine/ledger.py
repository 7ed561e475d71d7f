"""The ledger: what has been done to a model, kept on the model so every pass can be undone."""
from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from surgery.analysis.report import Report
from surgery.core.formats import WeightFormat
from surgery.core.method import Branch, WeightEdit
from surgery.engine.host import Host, ParameterHost
from surgery.engine.weight_edits import EditRecord
from surgery.errors import LedgerError
from surgery.rules.plan import Plan

LEDGER_ATTRIBUTE = "_surgery_ledger"


@dataclass
class MergedSite:
    """One site's applied merge: how to undo it exactly. `replaced` is the original base module where the merge
    swapped in a float copy instead of rewriting it (`merge(..., into="float")`); unmerge puts it back.
    `branch_state` holds the branch's tensors as they were merged: the edit is undone with those values even if
    the branch was changed while merged (e.g. a state dict loaded into it)."""

    path: str
    fmt: WeightFormat
    edit: WeightEdit
    record: EditRecord
    replaced: nn.Module | None = None
    branch: Branch | None = None
    branch_state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Attachment:
    """One named attach: its plan, its branches by site path, and its merge (if merged)."""

    name: str
    plan: Plan
    branches: dict[str, Branch]
    merged: list[MergedSite] | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)  # model-level changes, undone in reverse
    undo_methods: list[str] = field(default_factory=list)  # the method whose `attach_model` gave each undo
    exact: bool = True  # whether the merge keeps what makes unmerge bit-exact

    def __deepcopy__(self, memo: dict) -> "Attachment":
        """A copy for a copied model: the undo functions a plugin returned as closures get copies of what they
        close over (the copied model's branches and hooks), so detaching the copy leaves the original alone."""
        copied = Attachment.__new__(Attachment)
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            copied.__dict__[name] = [_copy_callable(u, memo) for u in value] if name == "undo" else \
                copy.deepcopy(value, memo)
        return copied


def _copy_callable(function: Callable, memo: dict) -> Callable:
    """`function` with its closure deep-copied (through `memo`); objects and plain functions by deepcopy."""
    if not isinstance(function, types.FunctionType):
        return copy.deepcopy(function, memo)
    if not function.__closure__:
        return function
    cells = []
    for cell in function.__closure__:
        try:
            contents = cell.cell_contents
        except ValueError:  # an empty cell
            cells.append(types.CellType())
            continue
        cells.append(types.CellType(_copy_callable(contents, memo) if isinstance(contents, types.FunctionType)
                                    else copy.deepcopy(contents, memo)))
    twin = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              tuple(cells))
    twin.__kwdefaults__, twin.__dict__ = function.__kwdefaults__, dict(function.__dict__)
    return twin


@dataclass
class Ledger:
    """Everything surgery has changed on one model.

    `report` holds the sites of the model as it was before the first attach; `hosts` the Host swapped in at
    each adapted path (a ParameterHost at a parameter's path: kinds experts, weight) and `homes` every (parent,
    attribute) that held the original module (a shared module has several); `requires_grad` the parameters'
    flags before the first attach.
    """

    report: Report
    attachments: dict[str, Attachment] = field(default_factory=dict)
    hosts: dict[str, Host | ParameterHost] = field(default_factory=dict)
    homes: dict[str, list[tuple[nn.Module, str]]] = field(default_factory=dict)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    merge_order: list[str] = field(default_factory=list)
    disabled: bool = False
    routing: tuple[str | None, ...] | None = None  # per-sample attachment names (surgery.per_sample)

    def get(self, name: str) -> Attachment:
        if name not in self.attachments:
            known = ", ".join(self.attachments) or "none"
            raise LedgerError(f"no attachment named {name!r} on this model (attached: {known})")
        return self.attachments[name]

    def refresh(self) -> None:
        """Tell every host which of its branches run: active, not merged, not disabled; or, while routing per
        sample, which branch each sample takes."""
        # runs twice per per_sample block (every training step of surgery.jobs): what every host shares is read once
        merged = {n for n, a in self.attachments.items() if a.merged is not None}
        active, disabled = set(self.active), self.disabled
        routing = None if disabled else self.routing
        for host in self.hosts.values():
            branches = host._modules["branches"]._modules  # not through nn.Module.__getattr__: hosts × 2 per step
            unmerged = [n for n, b in branches.items() if n not in merged or b.kept_when_merged] if merged \
                else list(branches)
            running = () if disabled else tuple(n for n in unmerged if n in active)
            if running != host.running:
                host.running = running
            host.set_routing(routing, unmerged)
            alone = running[0] if len(running) == 1 and host.routing is None else None
            for n, branch in branches.items():
                flags = (n in running, n == alone)
                state = branch.__dict__
                if (state.get("running"), state.get("runs_alone")) != flags:
                    branch.running, branch.runs_alone = flags


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP/FSDP-style wrappers (`.module`) and `torch.compile` (`._orig_mod`)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (model.module if type(model).__name__ in
                                                      ("DistributedDataParallel", "DataParallel") else None)
        if inner is None:
            return model
        model = inner


def find_ledger(model: nn.Module) -> Ledger | None:
    return unwrap(model).__dict__.get(LEDGER_ATTRIBUTE)


def require_ledger(model: nn.Module) -> Ledger:
    ledger = find_ledger(model)
    if ledger is None:
        raise LedgerError("nothing is attached to this model")
    return ledger


def base_module(model: nn.Module, path: str) -> nn.Module:
    """The original module at `path`, whether or not a Host stands there now. For the path of a parameter (a site
    of kind `experts`), the module holding it."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        parent, _, name = path.rpartition(".")
        module = model.get_submodule(parent) if parent else model
        module = module.base if isinstance(module, Host) else module
        if name not in module._parameters and name not in getattr(module, "parametrizations", {}):
            raise
        return module
    return module.base if isinstance(module, Host) else module
