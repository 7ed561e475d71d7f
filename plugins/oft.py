"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"), as HF PEFT implements it:
a learned block-diagonal orthogonal rotation R of the layer's input,

    y = W (R^T x) + b,   R = diag(R_1, ..., R_r),   R_i = Cayley(Q_i) = (I - Q_i)(I + Q_i)^-1,

Q_i skew-symmetric [b, b] from the b(b-1)/2 learned entries above its diagonal (`oft_R`, one row per block; one
row shared by every block with `block_share`). `use_cayley_neumann` (PEFT's default) uses PEFT's series instead,
R_i = I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1), n = `num_cayley_neumann_terms` (a truncated Neumann series of
(I + Q)(I - Q)^-1, orthogonal up to O(|Q|^(n-1)); PEFT's two forms differ in the sign of Q, and so does this).
`coft` (constrained OFT) clips each Q to norm `eps`/sqrt(blocks) before use, in place, as PEFT does. The entries
start at zero: R = I.

Merging is multiplicative: W <- W R^T (in [out, in]; the bias is untouched); unmerge multiplies by the exact
inverse of R^T and the engine restores the entries that do not round back, so the original bytes come back.
A rotation acts on the whole input, so on a fused projection it adapts every role: selecting some of its roles
(q and v of GPT-2's c_attn) is refused; select the module by path.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

import surgery
from surgery.plugin import (
    Branch,
    Method,
    MethodParams,
    Site,
    SiteError,
    WeightEdit,
    branch_dtype,
    input_of,
    module_device,
)


class OftParams(MethodParams):
    """`block_size` (PEFT's `oft_block_size`) or `r` (blocks per layer): give one, the other is 0 (as PEFT; a size
    that does not divide the input width is moved to the nearest one that does, with a warning, as PEFT does).
    `use_cayley_neumann`, `num_cayley_neumann_terms`: the series instead of the exact inverse. `coft`, `eps`:
    constrained OFT. `block_share`: one rotation for every block. `module_dropout`: in training, this share of the
    blocks is replaced by identity (the multiplicative dropout of PEFT's OFT layer). `init`: `default` (zero, R =
    I) or `random` (normal, std 0.1: PEFT's `init_weights=False`). `dtype`: default the base weight's."""

    block_size: int = Field(32, ge=0)
    r: int = Field(0, ge=0)
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = Field(5, gt=0)
    coft: bool = False
    eps: float = Field(6e-5, gt=0.0)
    block_share: bool = False
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: Literal["default", "random"] = "default"
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None

    @model_validator(mode="after")
    def _one_of_r_and_block_size(self) -> "OftParams":
        if (self.r == 0) == (self.block_size == 0):
            raise ValueError(f"give exactly one of r ({self.r}) and block_size ({self.block_size}); the other is 0, "
                             "since r x block_size is the input width")
        return self


def _nearest_divisor(width: int, wanted: int) -> int:
    """PEFT's adjustment of a block count or size to a divisor of `width` (the lower one on a tie)."""
    if wanted >= width:
        return width
    higher = wanted
    while higher <= width and width % higher:
        higher += 1
    lower = wanted
    while lower > 1 and width % lower:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


def oft_blocks(site: Site, params: OftParams) -> tuple[int, int]:
    """(blocks r, block size b) of the rotation of `site`'s input, r * b = in_features."""
    width = site.in_features
    if width is None:
        raise SiteError(f"oft needs the input width of {site.path!r}, which the analysis did not give")
    wanted = params.block_size or params.r
    given = _nearest_divisor(width, wanted) if width % wanted or wanted > width else wanted
    if given != wanted:
        warnings.warn(f"oft at {site.path!r}: {'block_size' if params.block_size else 'r'} {wanted} does not divide "
                      f"the input width {width}; using {given}", stacklevel=2)
    return (width // given, given) if params.block_size else (given, width // given)


def skew(vector: torch.Tensor, size: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric [n, size, size] matrices from their entries above the diagonal [n, size(size-1)/2]."""
    q = vector.new_zeros(vector.shape[0], size, size)
    q[:, rows, cols] = vector
    return q - q.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """R = (I - Q)(I + Q)^-1 for skew-symmetric Q [n, b, b], or PEFT's series I + 2Q + 2Q^2 + ... + Q^(terms-1)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if terms > 1:
        r = r + 2.0 * q
    if terms > 2:
        power = torch.bmm(q, q)
        r = r + 2.0 * power
        for _ in range(3, terms - 1):
            power = torch.bmm(power, q)
            r = r + 2.0 * power
        r = r + torch.bmm(power, q)
    return r


def constrained(vector: torch.Tensor, blocks: int, eps: float) -> torch.Tensor:
    """COFT: each block's entries scaled down to norm eps/sqrt(blocks) where their skew matrix is longer (PEFT's
    `_project_batch`: the norm of the skew matrix, the entries then taken back from above its diagonal)."""
    bound = eps / math.sqrt(blocks)
    norm = (vector.square().sum(-1, keepdim=True) * 2).sqrt()  # the Frobenius norm of the skew-symmetric matrix
    return torch.where(norm <= bound, vector, bound * (vector / norm)).to(vector.dtype)


class OftBranch(Branch):
    """`oft_R` [blocks (1 with block_share), b(b-1)/2]: the rotation of the site's input, applied before the base."""

    def __init__(self, blocks: int, block_size: int, params: OftParams, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.blocks, self.block_size = blocks, block_size
        self.neumann, self.terms = params.use_cayley_neumann, params.num_cayley_neumann_terms
        self.coft, self.eps, self.dropout = params.coft, params.eps, params.module_dropout
        n = block_size * (block_size - 1) // 2
        self.oft_R = nn.Parameter(torch.zeros(1 if params.block_share else blocks, n, dtype=dtype, device=device))
        if params.init == "random":
            with torch.no_grad():
                nn.init.normal_(self.oft_R, mean=0.0, std=0.1)
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def rotations(self) -> torch.Tensor:
        """R_i, [blocks, b, b]; with `coft`, `oft_R` is first projected in place (as HF PEFT does)."""
        if self.coft:
            with torch.no_grad():
                self.oft_R.copy_(constrained(self.oft_R, self.oft_R.shape[0], self.eps))
        r = cayley(skew(self.oft_R, self.block_size, self.rows, self.cols), self.neumann, self.terms)
        return r.expand(self.blocks, -1, -1) if r.shape[0] != self.blocks else r

    def _dropped(self, r: torch.Tensor) -> torch.Tensor:
        """Multiplicative dropout: int(p * blocks) random blocks replaced by identity (training only)."""
        if not (self.training and self.dropout > 0 and self.oft_R.shape[0] > 1):
            return r
        mask = torch.zeros(self.blocks, device=r.device, dtype=r.dtype)
        mask[torch.randperm(self.blocks, device=r.device)[:int(self.dropout * self.blocks)]] = 1
        mask = mask.view(-1, 1, 1)
        return (1 - mask) * r + mask * torch.eye(self.block_size, device=r.device, dtype=r.dtype)

    def adapt_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = input_of(args, kwargs)
        r = self._dropped(self.rotations())
        blocks = x.to(r.dtype).reshape(*x.shape[:-1], self.blocks, self.block_size)
        rotated = torch.einsum("...rk,rkc->...rc", blocks, r).reshape(x.shape).to(x.dtype)
        if args:
            return (rotated, *args[1:]), kwargs
        return args, {next(iter(kwargs)): rotated}


def _rotated(weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W R^T for W [out, in] and R = diag(r_i), computed in float64 and rounded to the weight's dtype."""
    blocks, b = r.shape[0], r.shape[-1]
    w = weight.to(torch.float64).reshape(weight.shape[0], blocks, b)
    return torch.einsum("orc,rkc->ork", w, r.to(torch.float64)).reshape(weight.shape).to(weight.dtype)


def _check_whole(site: Site, roles: frozenset[str]) -> None:
    sliced = sorted(r for r in roles if r in site.slices)
    if sliced and set(sliced) != set(site.slices):
        raise SiteError(f"oft rotates the input of {site.path!r}, which feeds every role of this fused projection "
                        f"({', '.join(sorted(site.slices))}); it cannot adapt {', '.join(sliced)} only: select the "
                        "module by path (or all its roles) to rotate it")


class Oft(Method):
    name = "oft"
    params = OftParams
    kinds = frozenset({"linear", "conv1d", "quantized_linear"})
    mergeable = True

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        _check_whole(site, roles)
        blocks, size = oft_blocks(site, params)
        return OftBranch(blocks, size, params, branch_dtype(params.dtype, site.dtype), module_device(module))

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        _check_whole(site, roles)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # build warns
            blocks, size = oft_blocks(site, params)
        return (1 if params.block_share else blocks) * size * (size - 1) // 2

    def merge_edit(self, site: Site, module: nn.Module, branch: Branch) -> WeightEdit:
        with torch.no_grad():
            r = branch.rotations().detach().to(torch.float64)
            inverse = torch.linalg.inv(r)
        return WeightEdit(apply=lambda w: _rotated(w, r), revert=lambda w: _rotated(w, inverse), form="transform_input")


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [Oft()]
