"""Everything a pass may change on a model, captured so that "nothing changed" can be checked bit for bit: tensor
bits (not values: -0.0 is not 0.0), module and parameter objects, hooks, requires_grad flags, attention
implementations, and the ledger (attachments, what is active, merged, running and routed at every Host)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgery.engine.host import Host
from surgery.engine.ledger import LEDGER_ATTRIBUTE

_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.view(_INTEGER[t.element_size()]) if t.is_floating_point() else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def _hooks(module: nn.Module) -> tuple:
    return tuple(tuple(getattr(module, name, {}).keys()) for name in
                 ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks"))


def _configs(model: nn.Module) -> tuple:
    found = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        impl = getattr(config, "_attn_implementation", None) if config is not None else None
        if impl is not None:
            found.append((name, id(config), impl))
    return tuple(found)


def ledger_summary(model: nn.Module) -> Any:
    ledger = model.__dict__.get(LEDGER_ATTRIBUTE)
    if ledger is None:
        return None
    hosts = {path: (list(h.branches), h.running, h.routing, id(getattr(h, "base", None)), id(h)) for path, h in ledger.hosts.items()}
    attachments = {n: (a.merged is not None, a.exact, len(a.undo), list(a.branches)) for n, a in ledger.attachments.items()}
    return (id(ledger), list(ledger.attachments), list(ledger.active), list(ledger.merge_order), ledger.disabled,
            ledger.routing, attachments, hosts)


@dataclass
class Fingerprint:
    tensors: dict[str, torch.Tensor]
    modules: list[tuple[str, int, str]]
    params: list[tuple[str, int, bool]]
    hooks: list[tuple[str, tuple]]
    configs: tuple
    ledger: Any
    running: list[tuple[str, bool, bool]]

    def differences(self, other: "Fingerprint") -> list[str]:
        found = []
        if list(self.tensors) != list(other.tensors):
            found.append(f"state_dict keys differ: {sorted(set(self.tensors) ^ set(other.tensors))[:5]}")
        for k, v in self.tensors.items():
            if k in other.tensors and not same_bits(v, other.tensors[k]):
                found.append(f"tensor {k} differs")
        for field in ("modules", "params", "hooks", "configs", "ledger", "running"):
            if getattr(self, field) != getattr(other, field):
                found.append(f"{field} differ")
        return found


def fingerprint(model: nn.Module) -> Fingerprint:
    return Fingerprint(
        tensors={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        modules=[(n, id(m), type(m).__name__) for n, m in model.named_modules(remove_duplicate=False)],
        params=[(n, id(p), p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
        hooks=[(n, _hooks(m)) for n, m in model.named_modules(remove_duplicate=False)],
        configs=_configs(model),
        ledger=ledger_summary(model),
        running=[(n, bool(getattr(b, "running", False)), bool(getattr(b, "runs_alone", False)))
                 for h in model.modules() if isinstance(h, Host) for n, b in h.branches.items()],
    )


def assert_unchanged(model: nn.Module, before: Fingerprint, what: str = "") -> None:
    diff = before.differences(fingerprint(model))
    assert not diff, f"{what}: {diff[:6]}"
