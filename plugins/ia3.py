"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors, initialised to ones, that rescale the attention keys and values (the outputs of
the key and value projections) and the MLP's inner activation (the input of its down projection).

An output-scaling branch multiplies the site's output channels, only the selected roles' channels on a fused
projection (k and v of GPT-2's `c_attn`, never q). An input-scaling branch multiplies the site's input.

Under per-sample routing (`surgery.per_sample`), output scaling multiplies the whole batch's base output by each
sample's own vector at once; input scaling, which acts before the base, leaves the Host to run each group of
samples by itself.

Merging folds the vector into the weight: output scaling multiplies the rows of those channels and the bias
entries of those channels; input scaling multiplies the columns (the bias is untouched: W(x * l) + b =
(W diag(l)) x + b). Unmerge divides back, and the engine restores the few entries that do not round back, so
it is bit-exact. A vector with a zero (or non-finite) entry is refused before any weight changes: dividing
by it could not undo the merge.
"""
from __future__ import annotations

import functools
from typing import Any, Literal

import torch
from torch import nn

import surgery
from surgery.plugin import (
    Branch,
    Method,
    MethodParams,
    NotMergeableError,
    Site,
    SiteError,
    WeightEdit,
    branch_dtype,
    input_of,
    module_device,
)

INPUT_SCALED_ROLES = frozenset({"mlp.down"})
"""Roles whose input, not output, IA3 rescales by default (PEFT calls these `feedforward_modules`)."""


class IA3Params(MethodParams):
    """`scale`: which side of the site the vector rescales. `auto` (the paper): the input of MLP down
    projections, the output of every other site. `dtype`: the vector's dtype (default: the base weight's)."""

    scale: Literal["auto", "input", "output"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None


class IA3Branch(Branch):
    """`ia3_l`, a learned vector (ones at first) that multiplies the base module's input (`side="input"`) or
    output (`side="output"`); with `channels`, only those output channels of a `width`-wide output."""

    def __init__(self, size: int, side: Literal["input", "output"], dtype: torch.dtype, device: torch.device,
                 channels: torch.Tensor | None = None, width: int | None = None):
        super().__init__()
        self.side = side
        self.width = width
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.register_buffer("channels", channels, persistent=False)

    def vector(self) -> torch.Tensor:
        """The full scale vector over the scaled side: `ia3_l`, or ones with `ia3_l` at `channels`."""
        if self.channels is None:
            return self.ia3_l
        ones = torch.ones(self.width, dtype=self.ia3_l.dtype, device=self.ia3_l.device)
        return ones.index_copy(0, self.channels, self.ia3_l)

    def adapt_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.side != "input":
            return args, kwargs
        x = input_of(args, kwargs)
        scaled = (x * self.vector()).to(x.dtype)
        if args:
            return (scaled, *args[1:]), kwargs
        return args, {next(iter(kwargs)): scaled}

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        if self.side != "output":
            return out
        return (out * self.vector()).to(out.dtype)

    @classmethod
    def prepare_routes(cls, branches: list["IA3Branch"]) -> torch.Tensor:
        """Output scaling, per sample: every group's full vector stacked, [groups + 1, width], ones last (the
        samples that take no branch), in the vectors' common dtype. Input scaling declines: it changes the base's
        input, and the Host runs the base once for the whole batch before `route_output`."""
        if any(b.side != "output" for b in branches):
            raise NotImplementedError
        vectors = [b.vector() for b in branches]
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in vectors))
        return torch.stack([v.to(dtype) for v in vectors] + [torch.ones_like(vectors[0], dtype=dtype)])

    @classmethod
    def route_output(cls, state: torch.Tensor, group: torch.Tensor, args: tuple, kwargs: dict,
                     out: torch.Tensor) -> torch.Tensor:
        """Each sample's output channels times its own vector, the whole batch in one multiplication."""
        vectors = state[group]  # [batch, width]
        return (out * vectors.view(vectors.shape[0], *[1] * (out.dim() - 2), vectors.shape[1])).to(out.dtype)


def _side(site: Site, params: IA3Params, roles: frozenset[str]) -> Literal["input", "output"]:
    if params.scale != "auto":
        return params.scale
    return "input" if (roles or site.roles) & INPUT_SCALED_ROLES else "output"


def _sliced_roles(site: Site, roles: frozenset[str]) -> list[str]:
    """The selected roles that are slices of a fused projection ([] means: the whole output)."""
    return sorted(r for r in roles if r in site.slices)


def _check(site: Site, side: str, sliced: list[str]) -> None:
    if side == "input" and sliced:
        raise SiteError(f"ia3 cannot scale the input of {site.path!r} for {', '.join(sliced)} only: it is a fused "
                        "projection and its input feeds every role; scale the output, or select it by path")
    features = site.in_features if side == "input" else site.out_features
    if features is None:
        raise SiteError(f"ia3 needs the {side} features of {site.path!r}, which the analysis did not give")


def _scaled(weight: torch.Tensor, vector: torch.Tensor, dim: int, divide: bool) -> torch.Tensor:
    """`weight` with its slices along `dim` (0: rows, 1: columns) multiplied (or divided) by `vector`,
    computed in at least float32 and rounded back to the weight's dtype."""
    wide = torch.promote_types(weight.dtype, torch.float32)
    v = vector.to(wide).unsqueeze(1 - dim) if weight.dim() == 2 else vector.to(wide)
    w = weight.to(wide)
    return (w / v if divide else w * v).to(weight.dtype)


class IA3(Method):
    name = "ia3"
    params = IA3Params
    kinds = frozenset({"linear", "conv1d", "quantized_linear"})
    mergeable = True

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        side, sliced = _side(site, params, roles), _sliced_roles(site, roles)
        _check(site, side, sliced)
        dtype, device = branch_dtype(params.dtype, site.dtype), module_device(module)
        if side == "input":
            return IA3Branch(site.in_features, "input", dtype, device)
        if not sliced:
            return IA3Branch(site.out_features, "output", dtype, device)
        channels = torch.cat([torch.arange(a, b, device=device) for r in sliced for a, b in site.channels(r)])
        return IA3Branch(channels.numel(), "output", dtype, device, channels=channels, width=site.out_features)

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        side, sliced = _side(site, params, roles), _sliced_roles(site, roles)
        _check(site, side, sliced)
        if side == "input":
            return site.in_features
        if not sliced:
            return site.out_features
        return sum(b - a for r in sliced for a, b in site.channels(r))

    def merge_edit(self, site: Site, module: nn.Module, branch: Branch) -> WeightEdit:
        vector = branch.vector().detach().clone()
        bad = (vector == 0) | ~torch.isfinite(vector)
        if bool(bad.any()):
            where = bad.nonzero().flatten().tolist()
            raise NotMergeableError(
                f"ia3 at {site.path!r} cannot be merged: its vector is zero or not finite at {len(where)} "
                f"{'entry' if len(where) == 1 else 'entries'} (index {where[0]}{', ...' if len(where) > 1 else ''}); "
                "a merge there could not be undone. Nothing was changed.")
        if branch.side == "input":  # columns; the bias is untouched
            return WeightEdit(apply=lambda w: _scaled(w, vector, 1, False), revert=lambda w: _scaled(w, vector, 1, True),
                              form="scale_input")
        return WeightEdit(apply=lambda w: _scaled(w, vector, 0, False), revert=lambda w: _scaled(w, vector, 0, True),
                          apply_bias=lambda b: _scaled(b, vector, 0, False), form="scale_output")


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [IA3()]
