"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), as HF PEFT implements it: LoRA's pair
(A [r, in], B [out, r], scale s: `surgery_plugins.lora.formula`) plus a learned magnitude m [out], one per output
channel, that rescales each row of the adapted weight to its own length:

    ΔW = s · B @ A
    n  = ‖W + ΔW‖ per output row, detached (paper §4.3: the norm is treated as a constant, no gradient)
    g  = m / n
    y  = g ⊙ (W x + ΔW x) + bias                                  `output` (the bias is not rescaled)

m starts as n (B starts at zero, so m = ‖W‖ per row): g = 1 and the model starts unchanged. With dropout in training,
as PEFT: y = W x + bias + (g - 1) ⊙ W x̃ + g ⊙ s · B A x̃ for x̃ = dropout(x), which is the line above when x̃ = x.

On a fused projection each selected role gets its own A, B and m on that role's output channels only (the row
norm is per row, so this is exactly a whole-module DoRA whose other rows keep m = ‖W_row‖ and B = 0).

`output` is the plain formula, with W x computed from the dense weight. Two cheaper forms compute the same:
`row_norm_by_parts` gets n without building W + ΔW [out, in] (one pass over W: W Aᵀ), and `fused_call` (the
branch alone at its site, no dropout in training) takes W x + bias from the base module's own output instead of a
second matmul. Both are tested against `row_norm` and `output` in float64.

Merging writes W' = g ⊙ (W + ΔW) (n from the weight as it is then); unmerge restores the original bytes (the
engine keeps what does not round back). The method reads the base weight in its forward through the site's weight
format (`surgery.plugin.weight_format`), so it also runs on quantized linears (dequantized per call, as PEFT).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import surgery
from surgery.plugin import (
    Branch,
    Method,
    NotMergeableError,
    Site,
    SiteError,
    SlicedBranch,
    WeightEdit,
    branch_dtype,
    input_of,
    module_device,
    weight_format,
)
from surgery_plugins.lora import formula
from surgery_plugins.lora.branches import init_pair
from surgery_plugins.lora.plugin import LoraParams


class DoraParams(LoraParams):
    """As LoRA's: `r`, `alpha` (s = alpha / r, alpha / sqrt(r) with `rslora`), `dropout`, `init` (of A; B starts at
    zero), `dtype` (of A, B and m; default the base weight's)."""


# ---- the formula ---------------------------------------------------------------------------------------------------
def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype the norm is computed in: float32, or the weight's if wider."""
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def row_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """n = ‖W + s · B @ A‖ per output row [out], detached; in `wide` precision."""
    dtype = wide(weight.dtype)
    return torch.linalg.norm(weight.to(dtype) + formula.delta_weight(a.to(dtype), b.to(dtype), s), dim=1)


@torch.no_grad()
def row_norm_by_parts(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """`row_norm` without building W + ΔW: ‖W_i‖² + B_i · (2s · W Aᵀ + s² · B A Aᵀ)_i per row i, so W is
    read twice (its row norms, W Aᵀ) and nothing of size [out, in] is written. A bf16/fp16 weight is not widened: W Aᵀ
    runs in its dtype (wide accumulation) and its row norms accumulate wide."""
    dtype = wide(weight.dtype)
    a_wide, b_wide = a.to(dtype), b.to(dtype)
    if weight.dtype == dtype:
        wa = weight @ a_wide.T
    else:
        wa = (weight @ a.to(weight.dtype).T).to(dtype)
    cross = torch.addmm(wa, b_wide, a_wide @ a_wide.T, beta=2 * s, alpha=s * s)
    squared = torch.linalg.vector_norm(weight, dim=1, dtype=dtype).square() + torch.linalg.vecdot(b_wide, cross)
    return squared.clamp_min(0).sqrt()


def scale_by_row(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """g = m / n, in m's dtype (n is detached: m gets the gradient, the norm none)."""
    return magnitude / norm.to(magnitude.dtype)


def output(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
           magnitude: torch.Tensor, dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
           channels: torch.Tensor | None = None, norm: Callable = row_norm) -> torch.Tensor:
    """The plain formula: the base output `out` (W x + bias) plus (g - 1) ⊙ W x̃ + g ⊙ s · B A x̃, x̃ = dropout(x),
    in out's dtype. `weight` is the dense [out, in] weight, or the rows of `channels` (a role's slice of a fused
    projection, whose output channels are the only ones changed)."""
    x = x.to(a.dtype)
    if dropout is not None:
        x = dropout(x)
    g = scale_by_row(magnitude, norm(weight, a, b, s))
    delta = change(F.linear(x, weight.to(a.dtype)), F.linear(F.linear(x, a), b), g, s).to(out.dtype)
    return out + delta if channels is None else out.index_add(-1, channels, delta)


def change(wx: torch.Tensor, bax: torch.Tensor, g: torch.Tensor, s: float) -> torch.Tensor:
    """(g - 1) ⊙ W x + g · s ⊙ B A x, from W x and the unscaled B A x: the scale rides on g (a vector) and the
    sum is one `addcmul`, two element-wise ops on [tokens, out] where the term-by-term sum takes four."""
    return torch.addcmul((g - 1) * wx, g * s, bax)


def rescaled(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
             s: float, g: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
    """`output` without dropout, from the base output alone: out + (g - 1) ⊙ (out - bias) + g ⊙ s · B A x, where
    `out` is exactly W x + bias (the branch runs alone at its site). At g = 1 and B = 0 it is `out`, bit for bit."""
    wx = (out if channels is None else out.index_select(-1, channels)).to(a.dtype)
    if bias is not None:
        wx = wx - (bias if channels is None else bias.index_select(0, channels)).to(a.dtype)
    delta = change(wx, F.linear(F.linear(x.to(a.dtype), a), b), g, s).to(out.dtype)
    return out + delta if channels is None else out.index_add(-1, channels, delta)


# ---- the branches --------------------------------------------------------------------------------------------------
class DoraPart(Branch):
    """A, B and m of one weight (or of one role's output channels of a fused one). The base module is read for W
    (through its weight format) and its bias: the module given at build, or, once attached, the Host's base."""

    reads_base_weight = True

    def __init__(self, module: nn.Module, in_features: int, out_features: int, params: DoraParams,
                 dtype: torch.dtype, device: torch.device, channels: torch.Tensor | None = None):
        super().__init__()
        self.scale = params.scale
        self.lora_A = nn.Parameter(torch.empty(params.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, params.r, dtype=dtype, device=device))
        self.magnitude = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        self.dropout = nn.Dropout(params.dropout) if params.dropout > 0 else None
        self.register_buffer("channels", channels, persistent=False)
        object.__setattr__(self, "format_ref", (None, None))  # (module, its weight format), looked up once
        self.bind(module)
        init_pair(self.lora_A, self.lora_B, params.init, params.r)
        with torch.no_grad():
            # the forward's own norm, so that g = m / n is exactly 1 and the model starts unchanged bit for bit
            self.magnitude.copy_(row_norm_by_parts(self.weight(), self.lora_A, self.lora_B, self.scale))

    def bind(self, module: nn.Module | None = None, host: nn.Module | None = None) -> None:
        """Read the base weight from `host.base` (the engine's Host at the site) or else from `module`; kept as
        plain references, not submodules (they belong to the model)."""
        if module is not None:
            object.__setattr__(self, "module_ref", module)
        object.__setattr__(self, "host_ref", host)

    def base(self) -> nn.Module:
        return self.host_ref.base if self.host_ref is not None else self.module_ref

    def dense_weight(self, base: nn.Module | None = None) -> torch.Tensor:
        """The base module's whole dense weight [out, in], detached (through its weight format)."""
        base = self.base() if base is None else base
        module, fmt = self.format_ref
        if module is not base:
            fmt = weight_format(base)
            if fmt is None:
                raise SiteError(f"dora: no weight format reads {type(base).__name__}")
            object.__setattr__(self, "format_ref", (base, fmt))
        return fmt.dense(base)

    def weight(self, base: nn.Module | None = None) -> torch.Tensor:
        """The rows of the dense weight this part adapts: all, or those of `channels` on a fused projection."""
        w = self.dense_weight(base)
        return w if self.channels is None else w.index_select(0, self.channels)

    def dropping(self) -> bool:
        return self.dropout is not None and self.training

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        return output(out, input_of(args, kwargs), self.weight(), self.lora_A, self.lora_B, self.scale,
                      self.magnitude, self.dropout, self.channels, norm=row_norm_by_parts)

    def rescale(self, base: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`rescaled` for this part, on the base's output `out` of x."""
        g = scale_by_row(self.magnitude, row_norm_by_parts(self.weight(base), self.lora_A, self.lora_B, self.scale))
        bias = getattr(base, "bias", None)
        return rescaled(out, x, bias if isinstance(bias, torch.Tensor) else None, self.lora_A, self.lora_B,
                        self.scale, g, self.channels)

    def fused_call(self, base: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.dropping():
            return NotImplemented
        out = base(*args, **kwargs)
        return self.rescale(base, input_of(args, kwargs), out)


class SlicedDoraPart(SlicedBranch):
    """One DoraPart per selected role of a fused projection (e.g. only q and v of GPT-2's c_attn)."""

    reads_base_weight = True

    def fused_call(self, base: nn.Module, args: tuple, kwargs: dict) -> Any:
        if any(part.dropping() for part in self.parts.values()):
            return NotImplemented
        out = base(*args, **kwargs)
        x = input_of(args, kwargs)
        for part in self.parts.values():  # disjoint channels: each reads only the base's output on its own
            out = part.rescale(base, x, out)
        return out


def parts_of(branch: Branch) -> list[DoraPart]:
    return list(branch.parts.values()) if isinstance(branch, SlicedDoraPart) else [branch]


# ---- the method ----------------------------------------------------------------------------------------------------
def _sliced_roles(site: Site, roles: frozenset[str]) -> list[str]:
    return sorted(r for r in roles if r in site.slices)


def _channels(site: Site, role: str, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b, device=device) for a, b in site.channels(role)])


class Dora(Method):
    name = "dora"
    params = DoraParams
    kinds = frozenset({"linear", "conv1d", "quantized_linear"})
    mergeable = True

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        dtype, device = branch_dtype(params.dtype, site.dtype), module_device(module)
        sliced = _sliced_roles(site, roles)
        if not sliced:
            return DoraPart(module, site.in_features, site.out_features, params, dtype, device)
        parts = {}
        for role in sliced:
            channels = _channels(site, role, device)
            parts[role.rsplit(".", 1)[-1]] = DoraPart(module, site.in_features, channels.numel(), params, dtype,
                                                      device, channels)
        return SlicedDoraPart(parts)

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        sliced = _sliced_roles(site, roles)
        widths = [sum(b - a for a, b in site.channels(r)) for r in sliced] or [site.out_features]
        return sum(params.r * (site.in_features + out) + out for out in widths)

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Callable[[], None]:
        """Read each site's weight from its Host's base from now on (a merge into a float copy swaps it)."""
        bound = []
        for path, branch in branches.items():
            host = model.get_submodule(path)
            if isinstance(host, surgery.Host):
                for part in parts_of(branch):
                    part.bind(host=host)
                    bound.append(part)

        def unbind() -> None:
            for part in bound:
                part.bind(host=None)
        return unbind

    def merge_edit(self, site: Site, module: nn.Module, branch: Branch) -> WeightEdit:
        """W' = g ⊙ (W + ΔW) on each part's rows, g from the weight as it is now; the undo W = W' / g - ΔW."""
        with torch.no_grad():
            weight = weight_format(module).dense(module)
            dtype = wide(weight.dtype)
            folds = []
            for part in parts_of(branch):
                rows = weight if part.channels is None else weight.index_select(0, part.channels)
                delta = formula.delta_weight(part.lora_A.to(dtype), part.lora_B.to(dtype), part.scale)
                g = part.magnitude.detach().to(dtype) / torch.linalg.norm(rows.to(dtype) + delta, dim=1)
                if not bool(torch.isfinite(g).all()) or bool((g == 0).any()):
                    raise NotMergeableError(f"dora at {site.path!r}: a zero or non-finite magnitude / norm; the "
                                            "merge could not be undone")
                folds.append((part.channels, delta, g[:, None]))

        def fold(w: torch.Tensor, forward: bool) -> torch.Tensor:
            out = w.to(dtype)
            for channels, delta, g in folds:
                rows = out if channels is None else out.index_select(0, channels)
                rows = g * (rows + delta) if forward else rows / g - delta
                out = rows if channels is None else out.index_copy(0, channels, rows)
            return out.to(w.dtype)

        # W' = W + ((g - 1) W + g ΔW): the branch adds a term linear in the site's input (it reads W, not the
        # base output), so the fold is an addition
        return WeightEdit(apply=lambda w: fold(w, True), revert=lambda w: fold(w, False), form="add")


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [Dora()]
