"""PEFT type LORA <-> method `lora`.

`target_modules` and the tensor keys give the sites; `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`,
`use_rslora`, `lora_dropout` the params; `fan_in_fan_out` is implied by the site kind (GPT-2 Conv1D). A LoRA on
the slices of a fused projection (e.g. q and v of GPT-2's c_attn) is written exactly as one LoRA of rank n*r with
a block-structured B. `use_dora: true` maps to method `dora` (the magnitude under `<path>.lora_magnitude_vector`);
a DoRA on slices is written as one whole-module DoRA whose other rows keep B = 0 and m = ‖W_row‖ (so g = 1
there). LoRA bias, layer replication and the other options are refused by name. Of quantized layers, only those PEFT
wraps itself (bitsandbytes' 4- and 8-bit, `PEFT_QUANTIZED`) are written: their files are a float layer's.

Stacked MoE experts are PEFT's `target_parameters` (its ParamWrapper): per parameter `lora_A.weight` [r*E, in]
(expert-major: [E, r, in]) and `lora_B.weight` [out, r*E] (expert-minor: [out, r, E]), under the key of the module
holding the parameter; where several parameters of one module are targeted PEFT nests its wrappers, the first
parameter (in the module's registration order) innermost, so the k-th from the last gets k `base_layer.` before
`lora_A`. Per-role pairs (gate, up of a fused gate_up) are written as one pair per expert as above.
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
    matches_target,
    most_common,
    pattern,
    pattern_value,
    refuse,
    target_problems,
)

UNSUPPORTED = {"bias": "none", "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
               "layer_replication": None, "trainable_token_indices": None, "use_qalora": False,
               "alora_invocation_tokens": None, "use_bdlora": None, "megatron_config": None, "arrow_config": None}
"""PEFT options this mapping cannot express, with the value that means "not used"."""

_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<path>.+)\.lora_embedding_(?P<part>A|B)$")
_MAGNITUDE_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<part>magnitude)_vector(\.weight)?$")
MAGNITUDE = "lora_magnitude_vector"
"""PEFT's name of DoRA's magnitude, after the module path."""
_PARAMETER_KINDS = frozenset({"experts", "weight"})
"""Site kinds whose path names a parameter (PEFT's `target_parameters`, not `target_modules`)."""
PEFT_QUANTIZED = frozenset({"bnb_4bit", "bnb_int8"})
"""Quantized weight formats whose layers PEFT adapts itself (bitsandbytes'), so their LoRA can be written."""


class LoraMapping:
    peft_type = "LORA"
    methods = frozenset({"lora", "dora"})

    def read(self, config: dict[str, Any], tensors: dict[str, torch.Tensor], report: Report,
             source: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        refuse(config, UNSUPPORTED, source)
        sites = {s.path: s for s in report.sites if s.kind != "attention"}
        nested = _nested_parameters(config.get("target_parameters") or [], report)
        lora: dict[str, dict[str, torch.Tensor]] = {}
        rest: list[str] = []
        bad: list[str] = []
        for key, tensor in tensors.items():
            short = key.removeprefix(PREFIX)
            m = _LORA_KEY.match(short) or _EMBEDDING_KEY.match(short) or _MAGNITUDE_KEY.match(short)
            if m:
                path = nested.get(m["path"], m["path"])
                if path in sites and sites[path].kind == "experts" and m["part"] != "magnitude":
                    converted = _from_peft_experts(tensor, m["part"][-1], sites[path].num_experts)
                    if converted is None:
                        bad.append(f"site {path!r}: LoRA {m['part']} {list(tensor.shape)} is not a 2-D tensor whose "
                                   f"rank dimension splits into {sites[path].num_experts} experts")
                        continue
                    tensor = converted
                lora.setdefault(path, {})["m" if m["part"] == "magnitude" else m["part"][-1]] = tensor
            else:
                rest.append(short)
        problems = bad + [f"missing site {p!r} (LoRA in the adapter)" for p in lora if p not in sites]
        dora = bool(config.get("use_dora"))
        wanted, what = ({"A", "B", "m"}, "LoRA A, B or DoRA magnitude") if dora else ({"A", "B"}, "LoRA A or B")
        problems += [f"site {p!r}: {what} missing from {source}/{TENSORS}" for p, ab in lora.items() if not wanted <= set(ab)]
        problems += [f"site {p!r}: a DoRA magnitude ({MAGNITUDE}) but use_dora is not set" for p, ab in lora.items()
                     if not dora and "m" in ab]
        if dora:
            problems += [f"site {p!r} is a {sites[p].kind} layer; surgery's dora adapts linear, conv1d and "
                         "quantized_linear layers" for p in lora if p in sites and sites[p].kind == "embedding"]
        if config.get("fan_in_fan_out"):
            problems += [f"site {p!r}: fan_in_fan_out is set but the module is not a transposed (Conv1D) layer"
                         for p in lora if p in sites and sites[p].kind != "conv1d"]
        problems += _shape_problems(config, lora, sites)
        modules = {p: s for p, s in sites.items() if s.kind not in _PARAMETER_KINDS}  # target_parameters: read above
        problems += target_problems(config, {p: ab for p, ab in lora.items() if p not in sites or p in modules},
                                    modules, "LoRA")
        problems += [f"tensor {PREFIX}{k!r} belongs to no LoRA site and no module in modules_to_save" for k in rest]
        if problems:
            raise MismatchError(source, problems)
        groups: dict[tuple, list[str]] = {}
        for path, ab in sorted(lora.items()):
            r = ab["A"].shape[-2]
            alpha = pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
            groups.setdefault((r, float(alpha), dtype_name(ab["A"])), []).append(path)
        rules = [{"select": {"paths": [glob_literal(p) for p in paths]}, "method": "dora" if dora else "lora",
                  "params": {"r": r, "alpha": alpha, "dropout": float(config.get("lora_dropout") or 0.0),
                             "rslora": bool(config.get("use_rslora")), "dtype": dtype}}
                 for (r, alpha, dtype), paths in groups.items()]
        ours = {}
        for path, ab in lora.items():
            ours[f"{path}.lora_A"], ours[f"{path}.lora_B"] = ab["A"], ab["B"]
            if dora:
                ours[f"{path}.magnitude"] = ab["m"]
        return rules, ours

    def write(self, model: nn.Module, attachment: Attachment) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        placements = [p for p in attachment.plan.placements if p.method in self.methods]
        if len({p.method for p in placements}) > 1:
            raise SurgeryError("PEFT format: use_dora is one flag for the whole adapter; this attachment mixes lora "
                               "and dora placements")
        dora = placements[0].method == "dora"
        rslora = {p.params.rslora for p in placements}
        if len(rslora) > 1:
            raise SurgeryError("PEFT format: use_rslora is one flag for the whole adapter; this attachment mixes both")
        rs = rslora.pop()
        experts = [p for p in placements if p.site.kind == "experts"]
        if experts and any(p.params.dropout for p in placements):
            raise SurgeryError("PEFT format: lora_dropout is one value for the whole adapter, and PEFT refuses "
                               f"dropout on target_parameters (the stacked experts {experts[0].site.path!r}); "
                               "this attachment has LoRA dropout")
        depth = _nesting([p.site.path for p in experts])
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for placement in placements:
            path, branch = placement.site.path, attachment.branches[placement.site.path]
            if placement.site.kind == "weight":
                raise SurgeryError(f"PEFT format: LoRA on the weight {path!r} (a linear weight its module reads "
                                   "itself, as nn.MultiheadAttention's) cannot be written: PEFT's MultiheadAttention "
                                   "layer adapts in_proj and out_proj whole, together; save it in surgery's format")
            if placement.site.kind == "quantized_linear" and placement.site.format not in PEFT_QUANTIZED:
                raise SurgeryError(f"PEFT format holds LoRA on float and bitsandbytes layers only: {placement.method} "
                                   f"on quantized_linear site {path!r} (format {placement.site.format}) cannot be "
                                   "written")
            a, b, scale = _dense_lora(branch, placement.site.out_features)
            if dora:
                tensors[f"{PREFIX}{path}.{MAGNITUDE}"] = _dense_magnitude(branch, placement.site.out_features)
            r = a.shape[-2]
            ranks[path], alphas[path] = r, scale * (r ** 0.5 if rs else r)
            if placement.site.kind == "experts":
                key = path.rpartition(".")[0] + ".base_layer" * depth[path]
                tensors[f"{PREFIX}{key}.lora_A.weight"] = a.reshape(-1, a.shape[-1])
                tensors[f"{PREFIX}{key}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], -1)
            elif placement.site.kind == "embedding":
                tensors[f"{PREFIX}{path}.lora_embedding_A"], tensors[f"{PREFIX}{path}.lora_embedding_B"] = a, b
            else:
                tensors[f"{PREFIX}{path}.lora_A.weight"], tensors[f"{PREFIX}{path}.lora_B.weight"] = a, b
        r, alpha = most_common(ranks), most_common(alphas)
        config = {
            "r": r, "lora_alpha": alpha, "lora_dropout": placements[0].params.dropout, "use_rslora": rs,
            "target_modules": sorted(set(ranks) - set(depth)), "target_parameters": sorted(depth) or None,
            "rank_pattern": pattern(ranks, r), "alpha_pattern": pattern(alphas, alpha),
            "fan_in_fan_out": all(p.site.kind == "conv1d" for p in placements),
            "bias": "none", "init_lora_weights": True, "use_dora": dora,
        }
        return config, tensors


def _shape_problems(config: dict[str, Any], lora: dict[str, dict[str, torch.Tensor]], sites: dict) -> list[str]:
    """Each LoRA pair's shapes and dtypes (per expert on stacked experts: A [E, r, in], B [E, out, r]), DoRA's
    magnitude [out], and the rank against the one `r` / `rank_pattern` gives it."""
    problems = []
    for path, ab in lora.items():
        if not {"A", "B"} <= set(ab) or path not in sites:
            continue
        a, b = ab["A"], ab["B"]
        experts = sites[path].kind == "experts"
        dims = 3 if experts else 2
        if a.dim() != dims or b.dim() != dims or a.shape[-2] != b.shape[-1] or (experts and a.shape[0] != b.shape[0]):
            problems.append(f"site {path!r}: LoRA A {list(a.shape)} and B {list(b.shape)} are not a low-rank pair")
            continue
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"site {path!r}: LoRA tensors of dtype {dtype_name(a)}/{dtype_name(b)} (float ones only)")
        if "m" in ab and (ab["m"].dim() != 1 or ab["m"].shape[0] != b.shape[-2] or not ab["m"].is_floating_point()):
            problems.append(f"site {path!r}: DoRA magnitude {list(ab['m'].shape)} ({dtype_name(ab['m'])}) is not a "
                            f"float vector of B's {b.shape[-2]} rows")
        expected = pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
        if a.shape[-2] != expected:
            problems.append(f"site {path!r}: LoRA of rank {a.shape[-2]} in the tensors, {expected} in the config "
                            "(r / rank_pattern)")
    return problems


def _dense_magnitude(branch: nn.Module, out_features: int) -> torch.Tensor:
    """DoRA's magnitude [out] of the whole module: each part's on its channels, elsewhere the row norm of the
    weight (the branch's parts add nothing to those rows, so PEFT computes the same norm there: g = 1)."""
    parts = list(branch.parts.values()) if hasattr(branch, "parts") else [branch]
    if len(parts) == 1 and parts[0].channels is None:
        return parts[0].magnitude.detach()
    with torch.no_grad():
        weight = parts[0].dense_weight()
        m = torch.linalg.norm(weight.to(parts[0].magnitude.dtype).contiguous(), dim=1)
        for p in parts:
            m[p.channels] = p.magnitude.detach()
    return m


def _dense_lora(branch: nn.Module, out_features: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) of one plain LoRA equal to the branch. Per-role parts on a fused projection become one
    LoRA of the summed rank whose B holds each part's B on that part's rows and rank columns (exact)."""
    parts = list(branch.parts.values()) if hasattr(branch, "parts") else [branch]
    if len(parts) == 1 and getattr(parts[0], "channels", None) is None:
        return parts[0].lora_A.detach(), parts[0].lora_B.detach(), parts[0].scale
    scales = {p.scale for p in parts}
    if len(scales) != 1:
        raise SurgeryError("PEFT format: the parts of a fused-projection LoRA have different scales")
    a = torch.cat([p.lora_A.detach() for p in parts], dim=-2)  # stacked experts: [E, r, in], per expert alike
    b = a.new_zeros((*a.shape[:-2], out_features, a.shape[-2]))
    column = 0
    for p in parts:
        r = p.lora_A.shape[-2]
        b[..., p.channels, column:column + r] = p.lora_B.detach()
        column += r
    return a, b, scales.pop()


def _nesting(paths: list[str]) -> dict[str, int]:
    """How many `base_layer.` PEFT puts before each targeted parameter's LoRA keys, for parameter paths in each
    module's parameter order (as sites and placements come): its wrappers nest in that order, the first innermost."""
    by_module: dict[str, list[str]] = {}
    for path in paths:
        by_module.setdefault(path.rpartition(".")[0], []).append(path)
    return {path: len(paths) - 1 - i for paths in by_module.values() for i, path in enumerate(paths)}


def _nested_parameters(targets: list[str], report: Report) -> dict[str, str]:
    """PEFT's key path (module + `.base_layer` per nesting level) -> the experts site it holds, for the stacked
    parameters that `target_parameters` names (PEFT's rule: the path itself or a dotted suffix of it)."""
    targeted = [s.path for s in report.sites if s.kind == "experts" and matches_target(s.path, list(targets))]
    return {path.rpartition(".")[0] + ".base_layer" * level: path for path, level in _nesting(targeted).items()}


def _from_peft_experts(tensor: torch.Tensor, part: str, experts: int) -> torch.Tensor | None:
    """PEFT's 2-D lora_A [r*E, in] / lora_B [out, r*E] of a stacked parameter as ours: [E, r, in] / [E, out, r]
    (None where the tensor has no such shape)."""
    if tensor.dim() != 2 or experts < 1 or tensor.shape[0 if part == "A" else 1] % experts:
        return None
    if part == "A":
        return tensor.reshape(experts, -1, tensor.shape[-1])
    return tensor.reshape(tensor.shape[0], -1, experts).permute(2, 0, 1).contiguous()
