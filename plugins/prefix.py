"""Prefix tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022): learned key and value prefixes of length P
at attention sites, prepended to the layer's keys and values *inside* the attention computation, after rotary
embedding and after the cache update, so caches only ever hold real tokens.

Two routes, chosen per site when the branch is built:

- `interface` (transformers models whose attention module calls a function of transformers' `AttentionInterface`
  with its `**kwargs`): the branch adds its prefix to the attention module's call as one extra keyword; the
  module's config is switched (while attached) to a registered attention function `surgery_prefix_<base>` that
  takes the prefixes out of the keywords, prepends them to key and value, pads the attention mask (and T5's
  position bias) with P visible columns and calls the base function (`sdpa`, or the model's own eager one).
- `inputs` (a module of your own whose attention site is a core-attention module called with q, k, v: ChatGLM
  style): the branch prepends the prefix to k and v and P dummy rows to q, so that a core attention which derives
  a square causal (or full) mask from the lengths lets every real query see every prefix position; the dummy rows
  are dropped from the output.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
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
    attachments,
    base_module,
    branch_dtype,
    first_float_dtype,
    module_device,
)

PREFIX_KWARG = "surgery_prefix"
"""The keyword that carries prefixes from a branch to the registered attention function."""
BASES = ("sdpa", "eager")
"""Attention implementations a prefix can wrap."""
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


@dataclass(eq=False)
class PrefixRequest:
    """One branch's prefixes for one attention call: key and value [kv_heads, P, head_dim]. The attention function
    sets `used` so the branch can tell that its prefix really reached the attention computation."""

    key: torch.Tensor
    value: torch.Tensor
    site: str
    used: bool = False


class PrefixBranch(Branch):
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
        request = PrefixRequest(key, value, self.site)
        return args, {**kwargs, PREFIX_KWARG: (*kwargs.get(PREFIX_KWARG, ()), request)}

    def adapt_output(self, args: tuple, kwargs: dict, out: Any) -> Any:
        if self.route == "inputs":
            return _drop_rows(self, args, kwargs, out)
        if not any(r.used for r in kwargs.get(PREFIX_KWARG, ()) if r.site == self.site):
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


# -- route "interface": the registered attention functions -------------------------------------------------------

_EAGER: dict[type, Callable] = {}


def _eager_of(module: nn.Module) -> Callable:
    """The model's own eager attention function (`eager_attention_forward` of its modeling file)."""
    cls = type(module)
    if cls not in _EAGER:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            raise SurgeryError(f"{cls.__module__} has no eager_attention_forward to run under a prefix")
        _EAGER[cls] = fn
    return _EAGER[cls]


def _pad_columns(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Prepend `length` visible key columns to a 4-D mask (True for bool masks, 0 for additive ones)."""
    return F.pad(mask, (length, 0), value=True if mask.dtype == torch.bool else 0.0)


def prefixed_attention(base: str) -> Callable:
    """The attention function registered as `surgery_prefix_<base>`: `base` with the prefixes of the call's
    PREFIX_KWARG prepended to key and value, and the mask (and position bias) widened to match."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        requests = kwargs.pop(PREFIX_KWARG, ())
        function = _eager_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        if requests:
            query, key, value, attention_mask, kwargs = _prepend(base, module, requests, query, key, value,
                                                                  attention_mask, kwargs)
        return function(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"surgery_prefix_{base}"
    return attention


def _prepend(base: str, module: nn.Module, requests: tuple, query, key, value, mask, kwargs):
    batch, real = key.shape[0], key.shape[2]
    keys, values = [], []
    for r in requests:
        if r.key.shape[0] != key.shape[1] or r.key.shape[-1] != key.shape[-1]:
            raise SurgeryError(f"prefix at site {r.site!r} has {r.key.shape[0]} heads of size {r.key.shape[-1]}, the "
                               f"attention call has keys {tuple(key.shape)} [batch, heads, seq, head_dim]")
        keys.append(r.key.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1))
        values.append(r.value.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1))
        r.used = True
    length = sum(k.shape[2] for k in keys)
    key, value = torch.cat([*keys, key], dim=2), torch.cat([*values, value], dim=2)
    q_len = query.shape[2]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape[-1] != real:
            raise SurgeryError(f"prefix at site {requests[0].site!r}: cannot widen an attention mask of "
                               f"{getattr(mask, 'shape', type(mask).__name__)} for {real} keys")
        mask = _pad_columns(mask, length)
    else:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if base == "sdpa" and causal and q_len > 1:  # what sdpa's is_causal means: top-left aligned
            seen = torch.ones(q_len, real, dtype=torch.bool, device=query.device).tril()
            mask = F.pad(seen, (length, 0), value=True)[None, None]
    bias = kwargs.get("position_bias")
    if isinstance(bias, torch.Tensor):  # T5: the prefix gets no relative position bias
        kwargs = {**kwargs, "position_bias": F.pad(bias, (length, 0), value=0.0)}
    return query, key, value, mask, kwargs


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for base in BASES:
        name = f"surgery_prefix_{base}"
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, prefixed_attention(base))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


class SwitchBack:
    """Undo of a prefix attach: give each config its own attention implementation back, unless prefix branches of
    another attachment still run through it. A plain object, not a closure, so it follows the model through
    `copy.deepcopy`."""

    def __init__(self, model: nn.Module, configs: list[Any], branches: list[PrefixBranch]):
        self.model, self.configs, self.branches = model, configs, branches

    def __call__(self) -> None:
        mine = {id(b) for b in self.branches}
        others = [(path, b) for a in attachments(self.model).values() for path, b in a.branches.items()
                  if isinstance(b, PrefixBranch) and b.route == "interface" and id(b) not in mine]
        for config in self.configs:
            still = any(getattr(base_module(self.model, path), "config", None) is config for path, _ in others)
            if not still:
                config._attn_implementation = {"": config._attn_implementation.removeprefix("surgery_prefix_")}


def _switch(config: Any) -> None:
    """Point `config` (only it, not its sub-configs) at the prefixed attention function of its implementation."""
    if not config._attn_implementation.startswith("surgery_prefix_"):
        config._attn_implementation = {"": f"surgery_prefix_{config._attn_implementation}"}


def _interface_config(module: nn.Module, site: str) -> Any | None:
    """The transformers config whose attention implementation the module reads, or None (route `inputs`)."""
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if impl is None:
        return None
    impl = impl.removeprefix("surgery_prefix_")
    if impl not in BASES:
        raise SurgeryError(f"prefix at site {site!r}: attention implementation {impl!r} is not supported "
                           f"(supported: {', '.join(BASES)}); load the model with attn_implementation='sdpa' or 'eager'")
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(module.forward).parameters.values()):
        raise SurgeryError(f"prefix at site {site!r}: {type(module).__name__}.forward takes no **kwargs to pass a "
                           "prefix on to its attention function")
    return config


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
        route = "interface" if _interface_config(module, site.path) is not None else "inputs"
        return PrefixBranch(site.path, route, kv_heads, heads, head_dim, params, branch_dtype(params.dtype, first_float_dtype(module)), module_device(module))

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        kv_heads, _, head_dim = _shape(site)
        width, p = kv_heads * head_dim, params.num_virtual_tokens
        if not params.reparam:
            return 2 * p * width
        h = params.reparam_hidden
        return p * width + (width * h + h) + (h * 2 * width + 2 * width)

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Callable[[], None] | None:
        configs = {}
        for path, branch in branches.items():
            if branch.route == "interface":
                config = _interface_config(base_module(model, path), path)
                configs[id(config)] = config
        if not configs:
            return None
        _register()
        undo = SwitchBack(model, list(configs.values()), list(branches.values()))
        try:
            for config in configs.values():
                _switch(config)
        except BaseException:
            undo()
            raise
        return undo


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
