"""LoRA (Hu et al. 2021): a low-rank update `B @ A * scale` beside a frozen linear, Conv1D, quantized linear or
embedding. On a fused projection it acts only on the selected roles' output channels, one (A, B) per role."""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import surgery
from surgery.plugin import Branch, Method, MethodParams, Site, SiteError, WeightEdit, branch_dtype, input_of, module_device
from surgery_plugins.lora_fused import lora_linear
from surgery_plugins.lora_shared import SharedInput


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
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def _init_pair(a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=1.0 / r)
        nn.init.zeros_(b)


class LoraBranch(Branch):
    """`y + B(A(dropout(x))) * scale`, added to all output channels or, with `channels`, to those only."""

    def __init__(self, in_features: int, out_features: int, params: LoraParams, dtype: torch.dtype,
                 device: torch.device, channels: torch.Tensor | None = None):
        super().__init__()
        self.scale = params.scale
        self.lora_A = nn.Parameter(torch.empty(params.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, params.r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(params.dropout) if params.dropout > 0 else nn.Identity()
        self.register_buffer("channels", channels, persistent=False)
        self.input_group: str | None = None  # Site.input_group, for linking with the branches that share x
        self.shared: SharedInput | None = None  # set while linked with them
        _init_pair(self.lora_A, self.lora_B, params.init, params.r)

    def reads_with(self, input_group: str, base: nn.Module) -> None:
        """Mark this branch as one of those whose sites read one input; `base` is its site's module, kept as a
        plain reference (not a submodule: it belongs to the model) so the group can compute this output."""
        self.input_group = input_group
        object.__setattr__(self, "base_module", base)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        delta = self.delta(input_of(args, kwargs)).to(out.dtype)
        if self.channels is None:
            return out + delta
        return out.index_add(-1, self.channels, delta)

    def weight_delta(self) -> torch.Tensor:
        """ΔW = B @ A * scale, [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scale

    def fused_call(self, base: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Base linear and this branch as one autograd function (see lora_fused), where it applies."""
        x = args[0] if args else input_of(args, kwargs)
        if not isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
            return NotImplemented
        if self.shared is not None:  # its members are plain linears without channels; it checks the rest
            out = self.shared.output(self.shared_index, x)
            if out is not NotImplemented:
                return out
        a = self.lora_A
        if self.channels is not None or type(base) is not nn.Linear or not x.dtype == a.dtype == base.weight.dtype:
            return NotImplemented
        dropout = self.dropout
        p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
        return lora_linear(x, base.weight, base.bias, a, self.lora_B, self.scale, p)

    @classmethod
    def prepare_routes(cls, branches: list["LoraBranch"]) -> tuple[torch.Tensor, torch.Tensor]:
        """All groups' A and B (scale folded into B) stacked, ranks zero-padded, plus a zero group for 'none'."""
        if any(b.channels is not None for b in branches) or any(
                b.training and isinstance(b.dropout, nn.Dropout) for b in branches):
            raise NotImplementedError
        r = max(b.lora_A.shape[0] for b in branches)
        first = branches[0]
        dtype, in_features, out_features = first.lora_A.dtype, first.lora_A.shape[1], first.lora_B.shape[0]
        a = torch.stack([F.pad(b.lora_A.to(dtype), (0, 0, 0, r - b.lora_A.shape[0])) for b in branches]
                        + [first.lora_A.new_zeros((r, in_features))])
        b = torch.stack([F.pad(b.lora_B.to(dtype) * b.scale, (0, r - b.lora_B.shape[1])) for b in branches]
                        + [first.lora_B.new_zeros((out_features, r))])
        return a, b

    @classmethod
    def route_output(cls, state: tuple[torch.Tensor, torch.Tensor], group: torch.Tensor, args: tuple, kwargs: dict,
                     out: torch.Tensor) -> torch.Tensor:
        """Every sample's own LoRA in two batched matmuls, whatever the number of adapters."""
        a, b = state
        x = input_of(args, kwargs)
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
        delta = torch.bmm(torch.bmm(flat, a[group].transpose(1, 2)), b[group].transpose(1, 2))
        return out + delta.reshape(*out.shape).to(out.dtype)


class SlicedLoraBranch(Branch):
    """One LoraBranch per selected role of a fused projection (e.g. only q and v of GPT-2's c_attn)."""

    def __init__(self, parts: dict[str, LoraBranch]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        for part in self.parts.values():
            out = part.adapt_output(args, kwargs, out)
        return out


class LoraEmbeddingBranch(Branch):
    """`y + embedding(ids, A.T) @ B.T * scale`, with A [r, num_embeddings] and B [dim, r]."""

    def __init__(self, base: nn.Embedding, params: LoraParams, dtype: torch.dtype):
        super().__init__()
        self.scale = params.scale
        self.padding_idx = base.padding_idx
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(params.r, base.num_embeddings, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(base.embedding_dim, params.r, dtype=dtype, device=device))
        with torch.no_grad():  # as HF PEFT: A zero, B random, so the update starts at zero
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        ids = input_of(args, kwargs)
        after_a = F.embedding(ids, self.lora_A.T, padding_idx=self.padding_idx)
        return out + (after_a @ self.lora_B.T * self.scale).to(out.dtype)

    def weight_delta(self) -> torch.Tensor:
        """ΔW in the dense [dim, num_embeddings] view."""
        return (self.lora_B @ self.lora_A) * self.scale


def _channels(site: Site, role: str, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, device=device) for a, b in site.channels(role)])


def _sliced_roles(site: Site, roles: frozenset[str]) -> list[str]:
    """The selected roles that are slices of a fused projection ([] means: the whole module)."""
    return sorted(r for r in roles if r in site.slices)


class Lora(Method):
    name = "lora"
    params = LoraParams
    kinds = frozenset({"linear", "conv1d", "quantized_linear", "embedding"})
    mergeable = True

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        dtype, device = branch_dtype(params.dtype, site.dtype), module_device(module)
        if site.kind == "embedding":
            return LoraEmbeddingBranch(module, params, dtype)
        sliced = _sliced_roles(site, roles)
        if not sliced:
            branch = LoraBranch(site.in_features, site.out_features, params, dtype, device)
            if site.input_group is not None and site.kind == "linear":
                branch.reads_with(site.input_group, module)
            return branch
        parts = {}
        for role in sliced:
            channels = _channels(site, role, device)
            parts[role.rsplit(".", 1)[-1]] = LoraBranch(site.in_features, channels.numel(), params, dtype, device, channels)
        return SlicedLoraBranch(parts)

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Any:
        """Link the branches at sites that read one input (q/k/v, gate/up) so they are computed together."""
        groups: dict[str, list[LoraBranch]] = {}
        for branch in branches.values():
            if isinstance(branch, LoraBranch) and branch.input_group is not None:
                groups.setdefault(branch.input_group, []).append(branch)
        linked = [SharedInput(members) for members in groups.values() if len(members) > 1]
        for shared in linked:
            for index, branch in enumerate(shared.members):
                branch.shared, branch.shared_index = shared, index

        def unlink() -> None:
            for shared in linked:
                shared.clear()
                for branch in shared.members:
                    branch.shared = None
        return unlink

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        sliced = _sliced_roles(site, roles)
        widths = [sum(b - a for a, b in site.channels(r)) for r in sliced] or [site.out_features]
        limit = min([site.in_features, *widths])
        if params.r > limit:  # checked at plan time, before anything is allocated
            raise SiteError(f"lora at {site.path!r}: r={params.r} is more than min(in, out) = {limit} of the site; "
                            "a larger rank adds parameters but no expressiveness")
        return sum(params.r * (site.in_features + w) for w in widths)

    def merge_edit(self, site: Site, module: nn.Module, branch: Branch) -> WeightEdit:
        parts = list(branch.parts.values()) if isinstance(branch, SlicedLoraBranch) else [branch]

        def shift(weight: torch.Tensor, sign: float) -> torch.Tensor:
            if len(parts) == 1 and getattr(parts[0], "channels", None) is None:  # W ± s·B·A in one matmul
                part = parts[0]
                return torch.addmm(weight, part.lora_B.to(weight.dtype), part.lora_A.to(weight.dtype), alpha=sign * part.scale)
            out = weight.clone()
            for part in parts:
                out.index_add_(0, part.channels, (part.weight_delta() * sign).to(weight.dtype))
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
        return {"r": a.shape[0], "alpha": float(a.shape[0]), "dtype": dtype}, state  # scale 1: folded into B


def _combine_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float],
                   how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) at scale 1 for the weighted combination of LoRA pairs (A_i, B_i, scale_i)."""
    if how == "cat":  # ΔW = Σ w_i s_i B_i A_i exactly, at rank Σ r_i
        return (torch.cat([a for a, _, _ in pairs]),
                torch.cat([b * (w * s) for (_, b, s), w in zip(pairs, weights)], dim=1))
    if how == "linear":  # A = Σ ±sqrt(|w_i| s_i) A_i, B = Σ sqrt(|w_i| s_i) B_i: PEFT's approximation, equal ranks
        if len({a.shape[0] for a, _, _ in pairs}) != 1:
            raise surgery.SurgeryError("linear combination needs LoRAs of one rank; use how='cat'")
        c = [math.sqrt(abs(w) * s) for (_, _, s), w in zip(pairs, weights)]
        return (sum(math.copysign(ci, w) * a for ci, w, (a, _, _) in zip(c, weights, pairs)),
                sum(ci * b for ci, (_, b, _) in zip(c, pairs)))
    raise surgery.SurgeryError(f"unknown combination {how!r}: use 'cat' or 'linear'")


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [Lora()]
