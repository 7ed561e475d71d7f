"""HF PEFT's adapter directories, both ways: `surgery.load` reads them, `surgery.save(..., format="peft")` writes
them (`peft.PeftModel.from_pretrained` loads the result with the same outputs).

The format reads and writes the files (`adapter_config.json`, `adapter_model.safetensors`; never pickles) and
`modules_to_save` (as `copy` placements); what it writes carries a checksum manifest and a model card
(`surgery.plugin.with_manifest`, `with_model_card`), and `surgery.load` checks the manifest where there is one.
What a `peft_type` means is a mapping's business: one small module per type in this package, and any plugin may
add one through the `surgery_peft_mappings` hook (the VeRA example package does).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors
from torch import nn

import surgery
from surgery.plugin import (
    AdapterFileError,
    Attachment,
    PeftMapping,
    SurgeryError,
    fill_branches,
    inspect,
    parse_ruleset,
    peft_mappings,
    read_json,
    read_tensors,
    task_of,
    with_manifest,
    with_model_card,
    write_directory,
)
from surgery_plugins.peft_format.adaption_prompt import AdaptionPromptMapping
from surgery_plugins.peft_format.common import (
    CONFIG,
    PREFIX,
    TENSORS,
    glob_literal,
    matches_target,
    unprefixed,
    validate_config,
)
from surgery_plugins.peft_format.loha import LohaMapping
from surgery_plugins.peft_format.lokr import LokrMapping
from surgery_plugins.peft_format.lora import LoraMapping
from surgery_plugins.peft_format.oft import OftMapping

MAX_ADAPTER_SHARE = 4
"""A PEFT adapter's tensors are read only if they hold at most this many times the model's parameters (8 bytes
each, plus 1 MiB): the memory a load may take is bounded by the model's own, whatever the file's header says."""


class PeftFormat:
    """HF PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`), of every mapped type."""

    name = "peft"

    def detect(self, directory: Path) -> bool:
        return (directory / CONFIG).is_file()

    # ---- reading -------------------------------------------------------------------------------------------
    def _read_config(self, directory: Path) -> tuple[dict[str, Any], PeftMapping]:
        path = directory / CONFIG
        config = read_json(path)  # a regular file, bounded in size and depth, no duplicate keys or NaN
        if not isinstance(config, dict):
            raise AdapterFileError(f"{path}: not a JSON object")
        mappings = peft_mappings()
        peft_type = config.get("peft_type")
        mapping = mappings.get(peft_type) if isinstance(peft_type, str) else None
        if mapping is None:
            raise AdapterFileError(f"{path}: peft_type {peft_type!r:.80} cannot be mapped "
                                   f"(mapped: {', '.join(sorted(mappings))})")
        validate_config(config, path)
        return config, mapping

    def load(self, model: nn.Module, directory: Path, name: str) -> Attachment:
        config, mapping = self._read_config(directory)
        tensor_path = directory / TENSORS
        if not tensor_path.exists() and (directory / "adapter_model.bin").exists():
            raise AdapterFileError(f"{directory / 'adapter_model.bin'}: pickle files are never loaded; convert it to safetensors")
        # the header is checked against the file's size, and the data's size against the bound, before any data
        bound = MAX_ADAPTER_SHARE * 8 * sum(p.numel() for p in model.parameters()) + (1 << 20)
        tensors = read_tensors(tensor_path, max_bytes=bound)
        report = inspect(model)
        copies, copied, rest = _split_copies(config, tensors, [s.path for s in report.sites if s.kind != "attention"])
        rules, ours = mapping.read(config, rest, report, str(directory))
        if copies:
            rules.append({"select": {"paths": [glob_literal(p) for p in copies]}, "method": "copy"})
            ours.update(copied)
        if not rules:
            raise AdapterFileError(f"{directory / CONFIG}: the adapter holds no {mapping.peft_type} tensors")
        ruleset = parse_ruleset({"name": f"peft-{mapping.peft_type.lower().replace('_', '-')}",
                                 "description": f"an HF PEFT {mapping.peft_type} adapter", "rules": rules},
                                str(directory / CONFIG))
        attachment = surgery.attach(model, ruleset, name=name)
        try:
            fill_branches(attachment, ours, str(tensor_path), strict_dtype=False)
        except BaseException:
            surgery.detach(model, name)
            raise
        return attachment

    # ---- writing -------------------------------------------------------------------------------------------
    def save(self, model: nn.Module, attachment: Attachment, directory: Path) -> Path:
        methods = sorted({p.method for p in attachment.plan.placements} - {"copy"})
        if not methods:
            raise SurgeryError("PEFT format: the attachment has only module copies; PEFT needs an adapter type")
        writers = {m: t for t, mapping in peft_mappings().items() for m in mapping.methods}
        unmapped = [m for m in methods if m not in writers]
        if unmapped:
            raise SurgeryError(f"PEFT format: method {', '.join(map(repr, unmapped))} has no PEFT mapping "
                               f"(mapped: {', '.join(sorted(writers))})")
        types = sorted({writers[m] for m in methods})
        if len(types) > 1:
            raise SurgeryError(f"PEFT format: one PEFT adapter has one type; this attachment mixes {', '.join(types)}")
        fields, tensors = peft_mappings()[types[0]].write(model, attachment)
        copies = []
        for placement in attachment.plan.placements:
            if placement.method == "copy":
                path = placement.site.path
                copies.append(path)
                tensors.update({f"{PREFIX}{path}.{k}": v for k, v in attachment.branches[path].module.state_dict().items()})
        config = {"peft_type": types[0], "task_type": task_of(attachment.plan.ruleset),
                  "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
                  **fields, **({"modules_to_save": _whole_modules(model, copies)} if copies else {}),
                  "inference_mode": True}
        blob = save_tensors({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata={"format": "pt"})
        files = with_model_card(with_manifest({TENSORS: blob}), model, attachment, directory, "peft")
        files[CONFIG] = (json.dumps(config, indent=2) + "\n").encode()  # renamed in last: the adapter's own files
        return write_directory(directory, files)  # are all in place before a reader sees its config


def _whole_modules(model: nn.Module, copies: list[str]) -> list[str]:
    """`modules_to_save` for copied sites: where copies cover every parameter of their parent module (RoBERTa's
    classifier.dense and classifier.out_proj), the parent, as PEFT names it (its SEQ_CLS adds `classifier` itself);
    otherwise the sites. The tensor keys are the same either way."""
    out: list[str] = []
    for parent in dict.fromkeys(p.rpartition(".")[0] for p in copies):
        kids = [p for p in copies if p.rpartition(".")[0] == parent]
        names = [f"{parent}.{n}" for n, _ in model.get_submodule(parent).named_parameters()] if parent else []
        whole = bool(names) and all(any(n.startswith(k + ".") for k in kids) for n in names)
        out += [parent] if whole else kids
    return out


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _split_copies(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  paths: list[str]) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The sites in (or under) `modules_to_save` modules that the file holds tensors of (as `copy` placements),
    their branch tensors, and the other tensors."""
    saved = config.get("modules_to_save") or []
    short = {k: unprefixed(k) for k in tensors}
    copies = sorted({p for p in paths if any(matches_target(a, saved) for a in _ancestors(p))
                     and any(s.startswith(p + ".") for s in short.values())})
    copied, rest = {}, {}
    for key, tensor in tensors.items():
        owner = next((p for p in copies if short[key].startswith(p + ".")), None)
        if owner is None:
            rest[key] = tensor
        else:
            copied[f"{owner}.module.{short[key][len(owner) + 1:]}"] = tensor
    return copies, copied, rest


@surgery.hookimpl
def surgery_adapter_formats() -> list[PeftFormat]:
    return [PeftFormat()]


@surgery.hookimpl
def surgery_peft_mappings() -> list[PeftMapping]:
    return [LoraMapping(), LohaMapping(), LokrMapping(), OftMapping(), AdaptionPromptMapping()]
