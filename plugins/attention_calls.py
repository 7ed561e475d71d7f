"""Reaching inside the attention computation of transformers models, for branches at `attention` sites.

A transformers attention module calls a function of transformers' `AttentionInterface` with its `**kwargs`. While
such a branch is attached, the module's config names a function surgery registers there, `surgery_prefix_<base>`
(base: `sdpa`, or the model's own `eager` one); the branch adds a request to the module's call as one extra keyword
(`ATTENTION_KWARG`), which the module passes on. The registered function takes the requests out and:

- prepends the keys and values of every `PrefixRequest` (prefix tuning), widening the mask (and T5's position bias)
  with visible columns;
- runs the base function;
- hands its output to every `OutputRequest` (`after(module, query, output)`, Llama-Adapter's gated prompt attention).

This happens after rotary embedding and after the cache update, so caches only ever hold real tokens. A request
sets `used` so that its branch can tell that it reached the attention computation.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from surgery.plugin import Branch, SurgeryError, attachments, base_module

ATTENTION_KWARG = "surgery_prefix"
"""The keyword that carries requests from branches to the registered attention function."""
BASES = ("sdpa", "eager")
"""Attention implementations the registered functions wrap."""
NAME = "surgery_prefix_"
"""The registered functions' names are this plus the base's."""


@dataclass(eq=False)
class PrefixRequest:
    """Key and value prefixes [kv_heads, P, head_dim] of one branch, for one attention call."""

    key: torch.Tensor
    value: torch.Tensor
    site: str
    used: bool = False


class OutputRequest:
    """A change of the attention function's output for one call: `after(module, query, output)` gets the module,
    the query [batch, heads, seq, head_dim] (after rotary) and the base function's output (attention output
    [batch, seq, heads, head_dim], weights) and returns the new output."""

    site: str
    used: bool = False

    def after(self, module: nn.Module, query: torch.Tensor, output: Any) -> Any:
        raise NotImplementedError


class InterfaceBranch(Branch):
    """A branch that reaches the attention computation through the registered function while `route` is
    "interface" (the config switch is undone only when no such branch of any attachment is left)."""

    route: str = "interface"


def request(kwargs: dict, item: PrefixRequest | OutputRequest) -> dict:
    """The module call's keywords with `item` added to the requests."""
    return {**kwargs, ATTENTION_KWARG: (*kwargs.get(ATTENTION_KWARG, ()), item)}


def requests_of(kwargs: dict, site: str) -> list[Any]:
    """The requests of the branches of `site` among a call's keywords."""
    return [r for r in kwargs.get(ATTENTION_KWARG, ()) if r.site == site]


# -- the registered functions -------------------------------------------------------------------------------------

_EAGER: dict[type, Callable] = {}


def eager_of(module: nn.Module) -> Callable:
    """The model's own eager attention function (`eager_attention_forward` of its modeling file)."""
    cls = type(module)
    if cls not in _EAGER:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            raise SurgeryError(f"{cls.__module__} has no eager_attention_forward to run under surgery's attention function")
        _EAGER[cls] = fn
    return _EAGER[cls]


def _pad_columns(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Prepend `length` visible key columns to a 4-D mask (True for bool masks, 0 for additive ones)."""
    return F.pad(mask, (length, 0), value=True if mask.dtype == torch.bool else 0.0)


def registered_attention(base: str) -> Callable:
    """The attention function registered as `surgery_prefix_<base>`: `base` run with the call's requests."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        requests = kwargs.pop(ATTENTION_KWARG, ())
        function = eager_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        prefixes = [r for r in requests if isinstance(r, PrefixRequest)]
        if prefixes:
            query, key, value, attention_mask, kwargs = _prepend(base, module, prefixes, query, key, value,
                                                                  attention_mask, kwargs)
        output = function(module, query, key, value, attention_mask, *args, **kwargs)
        for r in requests:
            if isinstance(r, OutputRequest):
                output = r.after(module, query, output)
                r.used = True
        return output

    attention.__name__ = f"{NAME}{base}"
    return attention


def _prepend(base: str, module: nn.Module, requests: list[PrefixRequest], query, key, value, mask, kwargs):
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
        name = f"{NAME}{base}"
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, registered_attention(base))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


# -- switching a model's configs to them, and back -------------------------------------------------------------------

class SwitchBack:
    """Undo of a switch: give each config its own attention implementation back, unless branches of another
    attachment still run through it. A plain object, not a closure, so it follows the model through `copy.deepcopy`."""

    def __init__(self, model: nn.Module, configs: list[Any], branches: list[Branch]):
        self.model, self.configs, self.branches = model, configs, branches

    def __call__(self) -> None:
        mine = {id(b) for b in self.branches}
        others = [(path, b) for a in attachments(self.model).values() for path, b in a.branches.items()
                  if isinstance(b, InterfaceBranch) and b.route == "interface" and id(b) not in mine]
        for config in self.configs:
            still = any(getattr(base_module(self.model, path), "config", None) is config for path, _ in others)
            if not still:
                config._attn_implementation = {"": config._attn_implementation.removeprefix(NAME)}


def interface_config(module: nn.Module, site: str, method: str) -> Any | None:
    """The transformers config whose attention implementation the module reads, or None (not a transformers
    attention module). Refuses implementations other than sdpa and eager, and modules that take no **kwargs."""
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if impl is None:
        return None
    impl = impl.removeprefix(NAME)
    if impl not in BASES:
        raise SurgeryError(f"{method} at site {site!r}: attention implementation {impl!r} is not supported "
                           f"(supported: {', '.join(BASES)}); load the model with attn_implementation='sdpa' or 'eager'")
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(module.forward).parameters.values()):
        raise SurgeryError(f"{method} at site {site!r}: {type(module).__name__}.forward takes no **kwargs to pass a "
                           "request on to its attention function")
    return config


def switch_attention(model: nn.Module, branches: dict[str, Branch], method: str) -> Callable[[], None] | None:
    """Point the configs of the attention modules of `branches` (those routed "interface") at the registered
    functions; return the undo (None if there was nothing to switch)."""
    configs = {}
    for path, branch in branches.items():
        if getattr(branch, "route", None) == "interface":
            config = interface_config(base_module(model, path), path, method)
            configs[id(config)] = config
    if not configs:
        return None
    _register()
    undo = SwitchBack(model, list(configs.values()), list(branches.values()))
    try:
        for config in configs.values():
            if not config._attn_implementation.startswith(NAME):  # only this config, not its sub-configs
                config._attn_implementation = {"": f"{NAME}{config._attn_implementation}"}
    except BaseException:
        undo()
        raise
    return undo
