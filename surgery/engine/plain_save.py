"""`model.save_pretrained(...)` of an adapted model (directly, or by an HF `Trainer` checkpoint): the model's files
hold the plain model's keys, so `from_pretrained` gives the base model exactly, and each attachment is saved beside
it in `<directory>/adapters/<name>/` (by `surgery.io.pretrained`, which registers itself in `COMPANIONS`).

Attach puts a `PlainSave` on the model (an instance attribute over the class's `save_pretrained`) and a
`load_state_dict` pre-hook that reads the plain model's keys into the base modules (a Trainer resuming from such a
checkpoint, after `surgery.load` of its adapter); the last detach takes both away. Without them the wrapped keys
(`...q_proj.base.weight`) would be written, and loading them into a plain model would leave those weights at their
random initialisation without a word."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.engine.ledger import LEDGER_ATTRIBUTE, Ledger, require_ledger
from surgery.errors import LedgerError

ADAPTERS = "adapters"
"""The folder of a saved model directory that holds its attachments, one folder each."""
COMPANIONS: list[Callable[[nn.Module, str, Path], None]] = []
"""Writers of one attachment (model, name, folder) beside a saved model; `surgery.io.pretrained` adds `surgery.save`."""


def plain_state_dict(model: nn.Module, ledger: Ledger, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """`state_dict` (default: the model's own) with every Host's base tensors under the original module's keys
    and no branch tensors: the keys and tensors of the model as it was before the first attach."""
    state = model.state_dict() if state_dict is None else state_dict
    plain: dict[str, Any] = {}
    for key, value in state.items():
        for marker in (".base.", ".branches."):
            at = key.find(marker)
            while at != -1 and key[:at] not in ledger.hosts:
                at = key.find(marker, at + 1)
            if at != -1:
                break
        if at == -1:
            plain[key] = value
        elif marker == ".base.":
            plain[key[:at] + "." + key[at + len(marker):]] = value
    return plain


class PlainSave:
    """Stands in for `model.save_pretrained` while something is attached (see the module's docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.load_hook = model.register_load_state_dict_pre_hook(_plain_keys_to_base)

    def __call__(self, save_directory: str | Path, *args: Any, state_dict: dict | None = None,
                 is_main_process: bool = True, **kwargs: Any) -> Any:
        model = self.model
        ledger = require_ledger(model)
        if ledger.merge_order:
            raise LedgerError(f"save_pretrained: {', '.join(map(repr, ledger.merge_order))} is merged into the weights, "
                              "so they are not the base model's: unmerge first (the base model is saved, each adapter "
                              "beside it), or surgery.bake to save the fine-tuned model as a plain one")
        names = list(ledger.attachments)
        odd = [n for n in names if not n or n != Path(n).name or n.startswith(".")]
        if odd:
            raise LedgerError(f"save_pretrained: attachment name(s) {', '.join(map(repr, odd))} cannot name a folder; "
                              f"save them with surgery.save(model, directory, name)")
        with torch.no_grad():
            plain = plain_state_dict(model, ledger, state_dict)
        result = type(model).save_pretrained(model, save_directory, *args, state_dict=plain,
                                             is_main_process=is_main_process, **kwargs)
        if is_main_process:
            for name in names:
                for write in COMPANIONS:
                    write(model, name, Path(save_directory) / ADAPTERS / name)
        return result


def _plain_keys_to_base(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """A plain model's key `<site>.<rest>` becomes `<site>.base.<rest>` where a Host stands at the site and the
    state dict does not hold that key already (the model's own state_dict loads as before)."""
    ledger = module.__dict__.get(LEDGER_ATTRIBUTE)
    if ledger is None or prefix != "":
        return
    for key in list(state_dict):
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            path = ".".join(parts[:cut])
            if path in ledger.hosts:
                if parts[cut] not in ("base", "branches"):
                    moved = f"{path}.base.{'.'.join(parts[cut:])}"
                    if moved not in state_dict:
                        state_dict[moved] = state_dict.pop(key)
                break


def install(model: nn.Module) -> None:
    """Put a PlainSave on an HF model (one with a `save_pretrained` method) that has none of its own."""
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        model.__dict__["save_pretrained"] = PlainSave(model)


def uninstall(model: nn.Module) -> None:
    plain = model.__dict__.get("save_pretrained")
    if isinstance(plain, PlainSave):
        hooks = model._load_state_dict_pre_hooks
        plain.stored_hook = hooks.get(plain.load_hook.id)  # for `reinstall`: the same hook under the same id
        plain.load_hook.remove()
        del model.__dict__["save_pretrained"]


def reinstall(model: nn.Module, plain: PlainSave | None) -> None:
    """Put back a PlainSave that `uninstall` took off (a pass rolled back), with its hook under its old id."""
    if plain is None or model.__dict__.get("save_pretrained") is plain:
        return
    stored = getattr(plain, "stored_hook", None)
    if stored is not None:
        model._load_state_dict_pre_hooks[plain.load_hook.id] = stored
    model.__dict__["save_pretrained"] = plain
