"""LoRA (Hu et al. 2021), the method: a low-rank update s · B @ A beside a frozen linear, Conv1D, quantized linear
or embedding, or one per expert in stacked MoE expert weights (formula.py). On a fused projection it acts only on
the selected roles' output channels, one (A, B) per role. This module is the plugin registered by the `lora` entry point: the `Lora` method (build, count, merge,
combine, and linking the branches of sites that read one input) and its `surgery_methods` hook."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

import surgery
from surgery.plugin import (
    Branch, Method, MethodParams, Site, SiteError, WeightEdit, branch_dtype, check_rank, module_device,
)
from surgery_plugins.lora import formula
from surgery_plugins.lora.branches import LoraBranch, LoraEmbeddingBranch, SlicedLoraBranch, WeightLoraBranch
from surgery_plugins.lora.quantized_base import quantized_weight
from surgery_plugins.lora.shared import SharedInput


class LoraParams(MethodParams):
    """`r`: rank; `alpha`: scale numerator (scale = alpha / r, or alpha / sqrt(r) with `rslora`); `dropout` on the
    branch input; `init`: A kaiming-uniform as HF PEFT does, or gaussian (std 1/r) as in the paper, B zero;
    `dtype`: the branch's parameter dtype (default: the base weight's float dtype)."""

    r: int = Field(8, gt=0)
    alpha: float = 8.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None

    @property
    def scale(self) -> float:
        return formula.scale(self.alpha, self.r, self.rslora)


def _channels(site: Site, role: str, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, device=device) for a, b in site.channels(role)])


def _sliced_roles(site: Site, roles: frozenset[str]) -> list[str]:
    """The selected roles that are slices of a fused projection ([] means: the whole module)."""
    return sorted(r for r in roles if r in site.slices)


class Lora(Method):
    name = "lora"
    params = LoraParams
    kinds = frozenset({"linear", "conv1d", "quantized_linear", "embedding", "experts", "weight"})
    mergeable = True

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        dtype, device = branch_dtype(params.dtype, site.dtype), module_device(module)
        if site.kind == "embedding":
            return LoraEmbeddingBranch(module, params, dtype)
        sliced = _sliced_roles(site, roles)
        if site.kind in ("experts", "weight"):
            return _weight_branch(site, params, sliced, dtype, device)
        if not sliced:
            branch = LoraBranch(site.in_features, site.out_features, params, dtype, device)
            if site.input_group is not None and site.kind in ("linear", "quantized_linear"):
                branch.reads_with(site.input_group, module)
            if site.kind == "quantized_linear":
                branch.over(quantized_weight(module))
            return branch
        parts = {}
        for role in sliced:
            channels = _channels(site, role, device)
            parts[role.rsplit(".", 1)[-1]] = LoraBranch(site.in_features, channels.numel(), params, dtype, device, channels)
        return SlicedLoraBranch(parts)

    def narrow(self, sites: list[Site], params: Any) -> list[Site]:
        """All the selected sites; dropout is refused on stacked experts (their update never sees the input)."""
        experts = [s.path for s in sites if s.kind in ("experts", "weight")]
        if params.dropout and experts:
            raise SiteError(f"LoRA dropout ({params.dropout}) cannot act on stacked expert weights or on weights "
                            f"a module reads itself ({experts[0]}"
                            f"{' and others' if len(experts) > 1 else ''}): their update is folded into the weight, "
                            "which never sees the input; give experts and weight sites a rule of their own with "
                            "dropout: 0")
        return sites

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Any:
        """Link the branches at sites that read one input (q/k/v, gate/up) so they are computed together; each
        member keeps the host at its site, whose public state says whether it runs alone there."""
        groups: dict[str, list[tuple[str, LoraBranch]]] = {}
        for path, branch in branches.items():
            if isinstance(branch, LoraBranch) and branch.input_group is not None:
                groups.setdefault(branch.input_group, []).append((path, branch))
        linked = []
        for members in groups.values():
            hosts = [model.get_submodule(path) for path, _ in members]
            if len(members) > 1 and all(isinstance(host, surgery.Host) for host in hosts):
                shared = SharedInput([branch for _, branch in members])
                for index, ((_, branch), host) in enumerate(zip(members, hosts)):
                    branch.link(shared, index, host)
                linked.append(shared)

        def unlink() -> None:
            for shared in linked:
                shared.clear()
                for branch in shared.members:
                    branch.link(None)
        return unlink

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        sliced = _sliced_roles(site, roles)
        widths = [sum(b - a for a, b in site.channels(r)) for r in sliced] or [site.out_features]
        check_rank("lora", site, params.r, min([site.in_features, *widths]))  # at plan time, before allocating
        per = site.num_experts if site.kind == "experts" else 1  # one pair per expert
        return per * sum(params.r * (site.in_features + w) for w in widths)

    def merge_edit(self, site: Site, module: nn.Module, branch: Branch) -> WeightEdit:
        parts = list(branch.parts.values()) if isinstance(branch, SlicedLoraBranch) else [branch]

        if site.kind == "experts":
            def shift_experts(weight: torch.Tensor, sign: float) -> torch.Tensor:
                for part in parts:
                    weight = formula.expert_weight(weight, part.lora_A, part.lora_B, sign * part.scale, part.channels)
                return weight
            return WeightEdit(apply=lambda w: shift_experts(w, 1.0), revert=lambda w: shift_experts(w, -1.0))

        def shift(weight: torch.Tensor, sign: float) -> torch.Tensor:
            """W ± ΔW: in one addmm for a whole-module pair, else each role's ΔW added to its rows."""
            if len(parts) == 1 and getattr(parts[0], "channels", None) is None:
                part = parts[0]
                return formula.delta_weight(part.lora_A.to(weight.dtype), part.lora_B.to(weight.dtype),
                                            sign * part.scale, weight=weight)
            out = weight.clone()
            for part in parts:
                out.index_add_(0, part.channels, formula.delta_weight(part.lora_A, part.lora_B, sign * part.scale)
                               .to(weight.dtype))
            return out

        return WeightEdit(apply=lambda w: shift(w, 1.0), revert=lambda w: shift(w, -1.0), form="add")

    def combine(self, site: Site, branches: list[Branch], weights: list[float], how: str) -> tuple[dict, dict]:
        keys = list(branches[0].parts) if isinstance(branches[0], SlicedLoraBranch) else [None]
        state: dict[str, torch.Tensor] = {}
        for key in keys:
            parts = [b.parts[key] if key is not None else b for b in branches]
            with torch.no_grad():
                a, b = _combine_pairs([(p.lora_A, p.lora_B, p.scale) for p in parts], weights, how)
            prefix = f"parts.{key}." if key is not None else ""
            state[prefix + "lora_A"], state[prefix + "lora_B"] = a, b
        dtype = str(parts[0].lora_A.dtype).replace("torch.", "")
        return {"r": a.shape[-2], "alpha": float(a.shape[-2]), "dtype": dtype}, state  # scale 1: folded into B


def _combine_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float],
                   how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) at scale 1 for the weighted combination of LoRA pairs (A_i, B_i, scale_i)."""
    if how == "cat":  # ΔW = Σ w_i s_i B_i A_i exactly, at rank Σ r_i (per expert for stacked pairs)
        return (torch.cat([a for a, _, _ in pairs], dim=-2),
                torch.cat([formula.folded_b(b, w * s) for (_, b, s), w in zip(pairs, weights)], dim=-1))
    if how == "linear":  # A = Σ ±sqrt(|w_i| s_i) A_i, B = Σ sqrt(|w_i| s_i) B_i: PEFT's approximation, equal ranks
        if len({a.shape[-2] for a, _, _ in pairs}) != 1:
            raise surgery.SurgeryError("linear combination needs LoRAs of one rank; use how='cat'")
        c = [math.sqrt(abs(w) * s) for (_, _, s), w in zip(pairs, weights)]
        return (sum(math.copysign(ci, w) * a for ci, w, (a, _, _) in zip(c, weights, pairs)),
                sum(ci * b for ci, (_, b, _) in zip(c, pairs)))
    raise surgery.SurgeryError(f"unknown combination {how!r}: use 'cat' or 'linear'")


def _weight_branch(site: Site, params: Any, sliced: list[str], dtype: torch.dtype, device: torch.device) -> Branch:
    """LoRA in weight space (a parameter site): one pair (per expert) on the whole weight, or per selected role of
    a fused gate_up or in_proj."""
    if params.dropout:
        raise SiteError(f"LoRA dropout ({params.dropout}) cannot act on the weight {site.path!r}: the update is "
                        "folded into the weight, which never sees the input; set dropout: 0 there")
    if not sliced:
        return WeightLoraBranch(site.num_experts, site.in_features, site.out_features, params, dtype, device)
    return SlicedLoraBranch({role.rsplit(".", 1)[-1]: WeightLoraBranch(
        site.num_experts, site.in_features, len(channels), params, dtype, device, channels)
        for role in sliced for channels in [_channels(site, role, device)]})


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [Lora()]
