"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): learned key and value prefixes of length P
at attention sites, prepended to the layer's keys and values *inside* the attention computation, after rotary
embedding and after the cache update, so caches only ever hold real tokens.

Two routes, chosen per site when the branch is built:

- `interface` (transformers models whose attention module calls a function of transformers' `AttentionInterface`
  with its `**kwargs`): the branch hands its prefix to surgery's registered attention function as a request
  (`attention_calls`), which prepends it to key and value and pads the attention mask (and T5's position bias)
  with P visible columns.
- `inputs` (a module of your own whose attention site is a core-attention module called with q, k, v: ChatGLM
  style): the branch prepends the prefix to k and v and P dummy rows to q, so that a core attention which derives
  a square causal (or full) mask from the lengths lets every real query see every prefix position; the dummy rows
  are dropped from the output.
"""
from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from pydantic import Field
from torch import nn

import surgery
from surgery.plugin import (
    Branch,
    Method,
    MethodParams,
    Site,
    SurgeryError,
    attachment,
    branch_dtype,
    first_float_dtype,
    module_device,
)
from surgery_plugins.attention_calls import (
    InterfaceBranch,
    PrefixRequest,
    interface_config,
    request,
    requests_of,
    switch_attention,
)

LAYOUTS = {"bshd": (0, 1, 2), "bhsd": (0, 2, 1), "sbhd": (1, 0, 2)}
"""For the `inputs` route: (batch, sequence, heads) dims of q, k, v; head_dim is always last."""


class PrefixParams(MethodParams):
    """`num_virtual_tokens`: prefix length P. `reparam`: train the prefixes through an MLP (Li & Liang), per site
    `inputs [P, kv_heads*head_dim] -> Linear(reparam_hidden) -> tanh -> Linear(2*kv_heads*head_dim)`; fold it
    with `freeze_reparam`. `init_std`: std of the normal init of plain prefixes (or of the MLP inputs).
    `qkv_layout`: for core-attention sites of your own modules, how q/k/v are laid out (`auto` reads it from the
    head count and head size). `dtype`: the parameters' dtype (default: the attention module's)."""

    num_virtual_tokens: int = Field(20, gt=0)
    reparam: bool = True
    reparam_hidden: int = Field(512, gt=0)
    init_std: float = Field(0.02, gt=0.0)
    qkv_layout: Literal["auto", "bshd", "bhsd", "sbhd"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None


class PTuningV2Params(PrefixParams):
    """P-tuning v2: the same deep prefixes, without reparameterisation by default."""

    reparam: bool = False


class PrefixBranch(InterfaceBranch):
    """Learned key/value prefixes of one attention site (plain tensors, or an MLP over learned inputs)."""

    def __init__(self, site: str, route: str, kv_heads: int, heads: int, head_dim: int, params: PrefixParams,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.site, self.route, self.layout = site, route, params.qkv_layout
        self.kv_heads, self.heads, self.head_dim = kv_heads, heads, head_dim
        self.length = params.num_virtual_tokens
        width = kv_heads * head_dim
        if params.reparam:
            self.inputs = nn.Parameter(torch.randn(self.length, width, dtype=dtype, device=device) * params.init_std)
            self.mlp = nn.Sequential(nn.Linear(width, params.reparam_hidden, dtype=dtype, device=device), nn.Tanh(),
                                     nn.Linear(params.reparam_hidden, 2 * width, dtype=dtype, device=device))
            self.key = self.value = None
        else:
            self.inputs, self.mlp = None, None
            shape = (kv_heads, self.length, head_dim)
            self.key = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * params.init_std)
            self.value = nn.Parameter(torch.randn(shape, dtype=dtype, device=device) * params.init_std)

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value prefixes, each [kv_heads, P, head_dim]."""
        if self.mlp is None:
            return self.key, self.value
        out = self.mlp(self.inputs).view(self.length, 2, self.kv_heads, self.head_dim)
        key, value = out.permute(1, 2, 0, 3).unbind(0)
        return key, value

    @torch.no_grad()
    def fold_reparam(self) -> bool:
        """Replace the MLP by the plain prefixes it produces now (same outputs; irreversible). False if none."""
        if self.mlp is None:
            return False
        key, value = self.prefixes()
        trainable = self.inputs.requires_grad
        del self.inputs, self.mlp
        self.inputs, self.mlp = None, None
        self.key = nn.Parameter(key.detach().clone(), requires_grad=trainable)
        self.value = nn.Parameter(value.detach().clone(), requires_grad=trainable)
        return True

    # -- per call: `interface` hands the prefix to the registered attention function, `inputs` pads q, k, v
    def adapt_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        key, value = self.prefixes()
        if self.route == "inputs":
            return _pad_qkv(self, args, kwargs, key, value)
        return args, request(kwargs, PrefixRequest(key, value, self.site))

    def adapt_output(self, args: tuple, kwargs: dict, out: Any) -> Any:
        if self.route == "inputs":
            return _drop_rows(self, args, kwargs, out)
        if not any(r.used for r in requests_of(kwargs, self.site)):
            raise SurgeryError(f"prefix at site {self.site!r} never reached the attention function: the module does "
                               "not pass its extra keyword arguments to transformers' attention interface (or its "
                               f"config's attention implementation was changed after attach)")
        return out


# -- route "inputs": q, k, v are inputs of the site's module --------------------------------------------------------

def _qkv_slots(args: tuple, kwargs: dict, head_dim: int, site: str) -> list[tuple[str, Any]]:
    """Where q, k and v are: the first three 4-D tensor inputs with head_dim last, as ('arg', i) or ('kw', name)."""
    slots = [("arg", i) for i, a in enumerate(args) if _is_qkv(a, head_dim)]
    slots += [("kw", k) for k, v in kwargs.items() if _is_qkv(v, head_dim)]
    if len(slots) < 3:
        raise SurgeryError(f"prefix at site {site!r}: the module is not called with q, k, v (4-D tensors with "
                           f"head_dim {head_dim} last); prefix methods need an attention module of transformers or "
                           "a core-attention module taking q, k, v")
    return slots[:3]


def _is_qkv(value: Any, head_dim: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] == head_dim


def _layout(branch: PrefixBranch, q: torch.Tensor) -> tuple[int, int, int]:
    if branch.layout != "auto":
        return LAYOUTS[branch.layout]
    one, two = q.shape[1] == branch.heads, q.shape[2] == branch.heads
    if one == two:
        raise SurgeryError(f"prefix at site {branch.site!r}: cannot tell the sequence dim of q {tuple(q.shape)} "
                           f"with {branch.heads} heads; set `qkv_layout` (bshd, bhsd or sbhd) in the rule's params")
    return LAYOUTS["bhsd"] if one else LAYOUTS["bshd"]


def _place(prefix: torch.Tensor, like: torch.Tensor, dims: tuple[int, int, int], site: str) -> torch.Tensor:
    """[kv_heads, P, head_dim] -> `like`'s layout and batch, its heads repeated for grouped attention."""
    batch_dim, seq_dim, head_dim_ = dims
    heads = like.shape[head_dim_]
    if heads != prefix.shape[0]:
        if heads % prefix.shape[0]:
            raise SurgeryError(f"prefix at site {site!r}: {prefix.shape[0]} key/value heads do not divide the "
                               f"{heads} heads the attention is called with")
        prefix = prefix.repeat_interleave(heads // prefix.shape[0], dim=0)
    shaped = prefix.to(like.dtype).unsqueeze(0).expand(like.shape[batch_dim], -1, -1, -1)
    return _to_layout(shaped, dims)


def _to_layout(bhsd: torch.Tensor, dims: tuple[int, int, int]) -> torch.Tensor:
    """[batch, heads, seq, head_dim] -> the layout whose (batch, seq, heads) dims are `dims`."""
    batch_dim, seq_dim, head_dim_ = dims
    source = {batch_dim: 0, head_dim_: 1, seq_dim: 2, 3: 3}
    return bhsd.permute(*[source[d] for d in range(4)])


def _pad_qkv(branch: PrefixBranch, args: tuple, kwargs: dict, key: torch.Tensor, value: torch.Tensor):
    slots = _qkv_slots(args, kwargs, branch.head_dim, branch.site)
    args, kwargs = list(args), dict(kwargs)

    def get(slot):
        return args[slot[1]] if slot[0] == "arg" else kwargs[slot[1]]

    def put(slot, tensor):
        if slot[0] == "arg":
            args[slot[1]] = tensor
        else:
            kwargs[slot[1]] = tensor

    q, k, v = (get(s) for s in slots)
    dims = _layout(branch, q)
    seq = dims[1]
    dummy = q.new_zeros(q.shape[:seq] + (branch.length,) + q.shape[seq + 1:])
    put(slots[0], torch.cat([dummy, q], dim=seq))
    put(slots[1], torch.cat([_place(key, k, dims, branch.site), k], dim=seq))
    put(slots[2], torch.cat([_place(value, v, dims, branch.site), v], dim=seq))
    return tuple(args), kwargs


def _drop_rows(branch: PrefixBranch, args: tuple, kwargs: dict, out: Any) -> Any:
    slots = _qkv_slots(args, kwargs, branch.head_dim, branch.site)
    q = args[slots[0][1]] if slots[0][0] == "arg" else kwargs[slots[0][1]]
    seq = _layout(branch, q)[1]
    rows = q.shape[seq]

    def drop(t: torch.Tensor) -> torch.Tensor:
        dim = seq if t.dim() > seq and t.shape[seq] == rows else next(
            (d for d in range(t.dim()) if t.shape[d] == rows), None)
        if dim is None:
            raise SurgeryError(f"prefix at site {branch.site!r}: no dim of the output {tuple(t.shape)} has the "
                               f"padded query length {rows}")
        return t.narrow(dim, branch.length, rows - branch.length)

    if isinstance(out, torch.Tensor):
        return drop(out)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return (drop(out[0]), *out[1:])
    raise SurgeryError(f"prefix at site {branch.site!r}: cannot read the attention output ({type(out).__name__})")


def _shape(site: Site) -> tuple[int, int, int]:
    info = site.attention
    if info is None or not info.num_kv_heads or not info.head_dim or not info.num_heads:
        raise SurgeryError(f"site {site.path!r}: the graph gave no head count and head size for this attention")
    return info.num_kv_heads, info.num_heads, info.head_dim


class PrefixTuning(Method):
    name = "prefix"
    params = PrefixParams
    kinds = frozenset({"attention"})
    mergeable = False

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        kv_heads, heads, head_dim = _shape(site)
        route = "interface" if interface_config(module, site.path, self.name) is not None else "inputs"
        return PrefixBranch(site.path, route, kv_heads, heads, head_dim, params, branch_dtype(params.dtype, first_float_dtype(module)), module_device(module))

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        kv_heads, _, head_dim = _shape(site)
        width, p = kv_heads * head_dim, params.num_virtual_tokens
        if not params.reparam:
            return 2 * p * width
        h = params.reparam_hidden
        return p * width + (width * h + h) + (h * 2 * width + 2 * width)

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Callable[[], None] | None:
        return switch_attention(model, branches, self.name)


class PTuningV2(PrefixTuning):
    name = "p-tuning-v2"
    params = PTuningV2Params


def freeze_reparam(model: nn.Module, name: str) -> int:
    """Fold the reparameterisation of attachment `name` (prefix MLPs, P-tuning prompt encoders) into plain tensors
    for inference: outputs stay the same, the MLPs are dropped. Returns how many branches were folded. This is the
    'merge' of prefix and prompt methods: `surgery.merge` refuses them, as no base weight changes."""
    return sum(bool(branch.fold_reparam()) for branch in attachment(model, name).branches.values() if hasattr(branch, "fold_reparam"))


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [PrefixTuning(), PTuningV2()]
