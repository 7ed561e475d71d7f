"""PEFT type LORA <-> method `lora`.

`target_modules` and the tensor keys give the sites; `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`,
`use_rslora`, `lora_dropout` the params; `fan_in_fan_out` is implied by the site kind (GPT-2 Conv1D). A LoRA on
the slices of a fused projection (e.g. q and v of GPT-2's c_attn) is written exactly as one LoRA of rank n*r with
a block-structured B. DoRA, LoRA bias, layer replication and the other options are refused by name.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from surgery.plugin import Attachment, MismatchError, Report, SurgeryError
from surgery_plugins.peft_format.common import (
    PREFIX,
    TENSORS,
    dtype_name,
    glob_literal,
    most_common,
    pattern,
    pattern_value,
    refuse,
    target_problems,
)

UNSUPPORTED = {"use_dora": False, "bias": "none", "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
               "layer_replication": None, "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
               "alora_invocation_tokens": None, "use_bdlora": None, "megatron_config": None, "arrow_config": None}
"""PEFT options this mapping cannot express, with the value that means "not used"."""

_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<path>.+)\.lora_embedding_(?P<part>A|B)$")


class LoraMapping:
    peft_type = "LORA"
    methods = frozenset({"lora"})

    def read(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], report: Report,
             source: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        refuse(config, UNSUPPORTED, source)
        sites = {s.path: s for s in report.sites if s.kind != "attention"}
        lora: dict[str, dict[str, torch.Tensor]] = {}
        rest: list[str] = []
        for key, tensor in tensors.items():
            short = key[len(PREFIX):] if key.startswith(PREFIX) else key
            m = _LORA_KEY.match(short) or _EMBEDDING_KEY.match(short)
            if m:
                lora.setdefault(m["path"], {})[m["part"][-1]] = tensor
            else:
                rest.append(short)
        problems = [f"missing site {p!r} (LoRA in the adapter)" for p in lora if p not in sites]
        problems += [f"site {p!r}: LoRA A or B missing from {source}/{TENSORS}" for p, ab in lora.items() if set(ab) != {"A", "B"}]
        if config.get("fan_in_fan_out"):
            problems += [f"site {p!r}: fan_in_fan_out is set but the module is not a transposed (Conv1D) layer"
                         for p in lora if p in sites and sites[p].kind != "conv1d"]
        problems += _shape_problems(config, lora, sites)
        problems += target_problems(config, lora, sites, "LoRA")
        problems += [f"tensor {PREFIX}{k!r} belongs to no LoRA site and no module in modules_to_save" for k in rest]
        if problems:
            raise MismatchError(source, problems)
        groups: dict[tuple, list[str]] = {}
        for path, ab in sorted(lora.items()):
            r = ab["A"].shape[0]
            alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
            groups.setdefault((r, float(alpha), dtype_name(ab["A"])), []).append(path)
        rules = [{"select": {"paths": [glob_literal(p) for p in paths]}, "method": "lora",
                  "params": {"r": r, "alpha": alpha, "dropout": float(config.get("lora_dropout") or 0.0),
                             "rslora": bool(config.get("use_rslora")), "dtype": dtype}}
                 for (r, alpha, dtype), paths in groups.items()]
        ours = {}
        for path, ab in lora.items():
            ours[f"{path}.lora_A"], ours[f"{path}.lora_B"] = ab["A"], ab["B"]
        return rules, ours

    def write(self, model: nn.Module, attachment: Attachment) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        placements = [p for p in attachment.plan.placements if p.method == "lora"]
        rslora = {p.params.rslora for p in placements}
        if len(rslora) > 1:
            raise SurgeryError("PEFT format: use_rslora is one flag for the whole adapter; this attachment mixes both")
        rs = rslora.pop()
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for placement in placements:
            path, branch = placement.site.path, attachment.branches[placement.site.path]
            if placement.site.kind == "quantized_linear":
                raise SurgeryError(f"PEFT format holds LoRA on float layers only: lora on quantized_linear site "
                                   f"{path!r} cannot be written")
            a, b, scale = _dense_lora(branch, placement.site.out_features)
            r = a.shape[0]
            ranks[path], alphas[path] = r, scale * (r ** 0.5 if rs else r)
            if placement.site.kind == "embedding":
                tensors[f"{PREFIX}{path}.lora_embedding_A"], tensors[f"{PREFIX}{path}.lora_embedding_B"] = a, b
            else:
                tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"] = a, b
        r, alpha = most_common(ranks), most_common(alphas)
        config = {
            "r": r, "lora_alpha": alpha, "lora_dropout": placements[0].params.dropout, "use_rslora": rs,
            "target_modules": sorted(ranks), "rank_pattern": pattern(ranks, r), "alpha_pattern": pattern(alphas, alpha),
            "fan_in_fan_out": all(p.site.kind == "conv1d" for p in placements),
            "bias": "none", "init_lora_weights": True,
        }
        return config, tensors


def _shape_problems(config: dict[str, Any], lora: dict[str, dict[str, torch.Tensor]], sites: dict) -> list[str]:
    """Each LoRA pair's shapes and dtypes, and its rank against the one `r` / `rank_pattern` gives it."""
    problems = []
    for path, ab in lora.items():
        if set(ab) != {"A", "B"} or path not in sites:
            continue
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"site {path!r}: LoRA A {list(a.shape)} and B {list(b.shape)} are not a low-rank pair")
            continue
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"site {path!r}: LoRA tensors of dtype {dtype_name(a)}/{dtype_name(b)} (float ones only)")
        expected = pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
        if a.shape[0] != expected:
            problems.append(f"site {path!r}: LoRA of rank {a.shape[0]} in the tensors, {expected} in the config "
                            "(r / rank_pattern)")
    return problems


def _dense_lora(branch: nn.Module, out_features: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) of one plain LoRA equal to the branch. Per-role parts on a fused projection become one
    LoRA of the summed rank whose B holds each part's B on that part's rows and rank columns (exact)."""
    parts = list(branch.parts.values()) if hasattr(branch, "parts") else [branch]
    if len(parts) == 1 and getattr(parts[0], "channels", None) is None:
        return parts[0].lora_A.detach(), parts[0].lora_B.detach(), parts[0].scale
    scales = {p.scale for p in parts}
    if len(scales) != 1:
        raise SurgeryError("PEFT format: the parts of a fused-projection LoRA have different scales")
    a = torch.cat([p.lora_A.detach() for p in parts])
    b = torch.zeros(out_features, a.shape[0], dtype=a.dtype, device=a.device)
    column = 0
    for p in parts:
        r = p.lora_A.shape[0]
        b[p.channels, column:column + r] = p.lora_B.detach()
        column += r
    return a, b, scales.pop()
