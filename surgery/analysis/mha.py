"""`torch.nn.MultiheadAttention` for the analysis: its projections are parameters it reads itself (`in_proj_weight`,
q, k and v side by side; `out_proj.weight`, a Linear it never calls), so the graph shows one module owning two
matmuls and no linear-like modules. While tracing, each is replaced by a stand-in computing the same attention
through two leaf modules (`in_proj`, the original `out_proj`) and SDPA; the facts read then (q/k/v slices of
in_proj by the probe, the output projection) are renamed to the parameters' paths (`<mha>.in_proj_weight`,
`<mha>.out_proj.weight`): sites of kind `weight`, adapted in weight space.

The functional form, `F.multi_head_attention_forward` given the weights of Linear modules it never calls (WavLM's
q_proj/k_proj/v_proj/out_proj), is traced the same way (`functional_mha`): the stand-in calls those modules, and the
facts are renamed to their weights (`<module>.weight`, sites of kind `weight`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _InProj(nn.Module):
    """The fused q/k/v projection of one nn.MultiheadAttention, as a leaf linear (its own parameters)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.weight, self.bias = mha.in_proj_weight, mha.in_proj_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _mask(heads: int, batch: int, lq: int, lk: int, key_padding_mask: Any, attn_mask: Any,
          dtype: torch.dtype) -> torch.Tensor | None:
    """One additive mask [B, 1 or H, Lq, Lk] from MHA's key_padding_mask [B, Lk] and attn_mask [Lq, Lk] or
    [B*H, Lq, Lk] (bool: True = not attended; float: added)."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, torch.finfo(dtype).min)
        return m.to(dtype)

    out = None
    if key_padding_mask is not None:
        out = additive(key_padding_mask).view(batch, 1, 1, lk)
    if attn_mask is not None:
        m = additive(attn_mask)
        m = m.view(1, 1, lq, lk) if m.dim() == 2 else m.view(batch, heads, lq, lk)
        out = m if out is None else out + m
    return out


class MhaStandIn(nn.Module):
    """What the analysis traces in place of an nn.MultiheadAttention: the same attention (no dropout, weights not
    returned) through `in_proj` and `out_proj` called as modules and one SDPA call."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.in_proj = _InProj(mha)
        self.out_proj = mha.out_proj
        self.heads, self.width, self.batch_first = mha.num_heads, mha.embed_dim, mha.batch_first
        object.__setattr__(self, "mha", mha)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        same = query is key and key is value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e = self.width
        if same:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:  # one call over the three sequences, so that one node holds the projection the probe reads
            lq, lk = query.shape[1], key.shape[1]
            proj = self.in_proj(torch.cat([query, key, value], dim=1))
            q, k, v = proj[:, :lq, :e], proj[:, lq:lq + lk, e:2 * e], proj[:, lq + lk:, 2 * e:]
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        mask = _mask(self.heads, batch, lq, lk, key_padding_mask, attn_mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=bool(is_causal) and mask is None)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, lq, e))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _replaceable(module: nn.Module) -> bool:
    """An nn.MultiheadAttention of the common layout: packed q/k/v weights, no bias_k/bias_v, no zero attention."""
    return isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim \
        and module.bias_k is None and not module.add_zero_attn


@contextlib.contextmanager
def mha_stand_ins(model: nn.Module) -> Iterator[list[str]]:
    """Inside the block, every nn.MultiheadAttention of the common layout is replaced (at every parent holding it)
    by a MhaStandIn; on exit the original modules are put back. Yields their paths."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    stand_ins: dict[int, nn.Module] = {}
    paths = [p for p, m in model.named_modules() if _replaceable(m)]
    try:
        for _, parent in list(model.named_modules(remove_duplicate=False)):
            for name, child in list(parent._modules.items()):
                if child is not None and _replaceable(child):
                    stand_ins.setdefault(id(child), MhaStandIn(child))
                    parent._modules[name] = stand_ins[id(child)]
                    swapped.append((parent, name, child))
        yield paths
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def parameter_paths(paths: list[str]) -> dict[str, str]:
    """Stand-in module paths -> the parameters they stand for, for the nn.MultiheadAttention at `paths`."""
    names: dict[str, str] = {}
    for path in paths:
        names[f"{path}.in_proj"] = f"{path}.in_proj_weight"
        names[f"{path}.out_proj"] = f"{path}.out_proj.weight"
    return names


def renamed(facts: Any, names: dict[str, str]) -> Any:
    """GraphFacts with the stand-ins' module paths replaced by the parameters' paths (`parameter_paths`), and their
    attention computations' implementation called "mha"."""
    if not names:
        return facts

    def key(table: dict[str, Any]) -> dict[str, Any]:
        return {names.get(p, p): v for p, v in table.items()}

    def one(path: str | None) -> str | None:
        return names.get(path, path) if path is not None else None

    attention = {p: dataclasses.replace(info, query=one(info.query), key=one(info.key), value=one(info.value),
                                        output=one(info.output),
                                        implementation="mha" if f"{p}.in_proj" in names else info.implementation)
                 for p, info in facts.attention.items()}
    return dataclasses.replace(facts, linears=key(facts.linears), roles=key(facts.roles), slices=key(facts.slices),
                               attention=attention,
                               input_groups={names.get(p, p): one(g) for p, g in facts.input_groups.items()})


@contextlib.contextmanager
def functional_mha(model: nn.Module) -> Iterator[list[str]]:
    """Inside the block, `F.multi_head_attention_forward` called with separate q/k/v weights that are the weights of
    Linear modules of `model` (the out_proj weight too; no bias_k/bias_v, zero attention or static k/v) calls those
    modules and SDPA instead, computing the same attention (no dropout, weights not returned) on the assumption
    that the biases passed are the modules' own, as WavLM passes them; any other call runs as it is. Yields the
    paths of the modules so called (filled while tracing)."""
    original = F.multi_head_attention_forward
    called: list[str] = []

    def stand_in(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, embed_dim_to_check: int,
                 num_heads: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        bound = _bound(original, query, key, value, embed_dim_to_check, num_heads, *args, **kwargs)
        weights = [bound.get(n) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj_weight")]
        linears = {id(m.weight): (n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        if not bound.get("use_separate_proj_weight") or any(id(w) not in linears for w in weights) \
                or bound.get("bias_k") is not None or bound.get("add_zero_attn") \
                or bound.get("static_k") is not None or bound.get("static_v") is not None:
            return original(query, key, value, embed_dim_to_check, num_heads, *args, **kwargs)
        (qn, qm), (kn, km), (vn, vm), (on, om) = (linears[id(w)] for w in weights)
        called.extend(n for n in (qn, kn, vn, on) if n not in called)
        lq, batch, lk = query.shape[0], query.shape[1], key.shape[0]
        q, k, v = (m(t).reshape(t.shape[0], batch, num_heads, -1).permute(1, 2, 0, 3)
                   for m, t in ((qm, query), (km, key), (vm, value)))
        mask = _mask(num_heads, batch, lq, lk, bound.get("key_padding_mask"), bound.get("attn_mask"), q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             is_causal=bool(bound.get("is_causal")) and mask is None)
        return om(out.permute(2, 0, 1, 3).reshape(lq, batch, -1)), None

    F.multi_head_attention_forward = stand_in
    try:
        yield called
    finally:
        F.multi_head_attention_forward = original


def _bound(function: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The arguments of a call to `function` by parameter name, defaults included."""
    import inspect

    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def weight_paths(paths: list[str]) -> dict[str, str]:
    """Module paths -> their weights' paths, for the Linear modules `functional_mha` called in the trace."""
    return {path: f"{path}.weight" for path in paths}
