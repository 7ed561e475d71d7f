"""PEFT type VERA <-> method `vera`, for surgery's `peft` adapter format (a `surgery.plugin.PeftMapping`).

PEFT's file holds `vera_lambda_b` and `vera_lambda_d` per module and, with `save_projection` (its default), the
shared `base_model.vera_A` and `base_model.vera_B`; without it they are drawn again from `projection_prng_key`, as
PEFT does. `r`, `projection_prng_key`, `d_initial` and `vera_dropout` map to the params; `fan_in_fan_out` follows the
site kind (GPT-2 Conv1D). A VeRA bias and layer selection are refused by name. A VeRA on role slices of a fused
projection is written exactly as one on the whole module, with Λ_b zero on the other channels.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.plugin import AdapterFileError, Attachment, MismatchError, Report, SurgeryError
from surgery_vera.method import projections

PREFIX = "base_model.model."
SHARED = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
NAMES = ("vera_lambda_b", "vera_lambda_d")
UNSUPPORTED = {"bias": "none", "layers_to_transform": None, "layers_pattern": None}
KINDS = ("linear", "conv1d")


def _refuse(config: dict[str, Any], source: str) -> None:
    refused = [f"{k}={config[k]!r}" for k, unused in UNSUPPORTED.items() if k in config and config[k] != unused]
    if refused:
        raise AdapterFileError(f"{source}/adapter_config.json: PEFT options surgery cannot map: {', '.join(refused)}")


def _one(placements: list[Any], field: str) -> Any:
    values = {getattr(p.params, field) for p in placements}
    if len(values) != 1:
        raise SurgeryError(f"PEFT format: VeRA holds one {field} for the whole adapter; this attachment has "
                           f"{', '.join(map(repr, sorted(values)))}")
    return values.pop()


class VeraMapping:
    peft_type = "VERA"
    methods = frozenset({"vera"})

    def read(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], report: Report,
             source: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        _refuse(config, source)
        sites = {s.path: s for s in report.sites if s.kind != "attention"}
        found: dict[str, dict[str, torch.Tensor]] = {}
        shared: dict[str, torch.Tensor] = {}
        problems = []
        for key, tensor in tensors.items():
            name = next((n for n in NAMES if key.startswith(PREFIX) and key.endswith("." + n)), None)
            if name is not None:
                found.setdefault(key[len(PREFIX):-len(name) - 1], {})[name] = tensor
            elif key in SHARED.values():
                shared[key] = tensor
            else:
                problems.append(f"tensor {key!r} belongs to no VeRA site and no module in modules_to_save")
        problems += [f"missing site {p!r} (VeRA in the adapter)" for p in found if p not in sites]
        problems += [f"site {p!r} is a {sites[p].kind} layer; PEFT's VeRA adapts linear and Conv1D layers"
                     for p in found if p in sites and sites[p].kind not in KINDS]
        problems += [f"site {p!r}: {', '.join(n for n in NAMES if n not in parts)} missing" for p, parts in found.items()
                     if set(parts) != set(NAMES)]
        if config.get("save_projection", True) and set(shared) != set(SHARED.values()):
            problems.append("save_projection is set but base_model.vera_A / base_model.vera_B are missing")
        if problems:
            raise MismatchError(source, problems)
        if not found:
            return [], {}
        order = [s.path for s in report.sites if s.path in found]  # the plan's order: its first site holds A and B
        r = int(config.get("r", 256))
        key = int(config.get("projection_prng_key", 0))
        if not shared:  # drawn again from the key, as PEFT does without save_projection
            a, b = projections(r, max(sites[p].in_features for p in order), max(sites[p].out_features for p in order), key)
            shared = {SHARED["vera_A"]: a, SHARED["vera_B"]: b}
        dtype = str(found[order[0]]["vera_lambda_d"].dtype).replace("torch.", "")
        rules = [{"select": {"paths": order}, "method": "vera",
                  "params": {"r": r, "projection_prng_key": key, "d_initial": float(config.get("d_initial", 0.1)),
                             "dropout": float(config.get("vera_dropout") or 0.0), "dtype": dtype}}]
        ours = {f"{p}.{n}": t for p, parts in found.items() for n, t in parts.items()}
        ours.update({f"{order[0]}.{name}": shared[key] for name, key in SHARED.items()})
        return rules, ours

    def write(self, model: nn.Module, attachment: Attachment) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        placements = [p for p in attachment.plan.placements if p.method in self.methods]
        tensors: dict[str, torch.Tensor] = {}
        for p in placements:
            if p.site.kind not in KINDS:
                raise SurgeryError(f"PEFT format: PEFT's VeRA adapts linear and Conv1D layers; vera on "
                                   f"{p.site.kind} site {p.site.path!r} cannot be written")
            branch = attachment.branches[p.site.path]
            lambda_b = branch.vera_lambda_b.detach()
            if branch.channels is not None:  # the whole module, zero on the channels it does not adapt
                lambda_b = lambda_b.new_zeros(p.site.out_features).index_copy(0, branch.channels, lambda_b)
            tensors[f"{PREFIX}{p.site.path}.vera_lambda_b"] = lambda_b
            tensors[f"{PREFIX}{p.site.path}.vera_lambda_d"] = branch.vera_lambda_d.detach()
        owner = attachment.branches[placements[0].site.path]
        tensors.update({key: getattr(owner, name).detach() for name, key in SHARED.items()})
        config = {"r": _one(placements, "r"), "projection_prng_key": _one(placements, "projection_prng_key"),
                  "d_initial": _one(placements, "d_initial"), "vera_dropout": _one(placements, "dropout"),
                  "target_modules": sorted(p.site.path for p in placements), "save_projection": True,
                  "fan_in_fan_out": all(p.site.kind == "conv1d" for p in placements), "bias": "none",
                  "init_weights": True}
        return config, tensors
