"""Llama-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init
Attention"), as HF PEFT's adaption prompt: at the attention of the top `adapter_layers` layers, a learned prompt P
[adapter_len, hidden] whose keys and values the layer's own projections make, attended to by the layer's queries
with a separate softmax and a zero-initialised gate g:

    out = attention(q, k, v) + g · softmax(q K_P^T / sqrt(head_dim)) V_P,    K_P = key_proj(P), V_P = value_proj(P)

q after rotary (K_P gets none); the sum then goes through the output projection. With `output_projection: false`
the prompt term is instead added after the attention module's output projection, unprojected: what PEFT does on
GPT-2. The gate starts at zero, so the model starts unchanged.

It reaches the attention computation through surgery's registered attention function (`attention_calls`), so it
works on any transformers model whose attention module calls transformers' attention interface and whose key and
value projections the analysis reads (their role slices on fused projections). It changes no weight: `surgery.merge`
refuses it.
"""
from __future__ import annotations

import math
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
    SiteError,
    SurgeryError,
    branch_dtype,
    first_float_dtype,
    inspect,
    module_device,
)
from surgery_plugins.attention_calls import (
    InterfaceBranch,
    OutputRequest,
    interface_config,
    request,
    requests_of,
    switch_attention,
)


class LlamaAdapterParams(MethodParams):
    """`adapter_len`: prompt tokens per layer; `adapter_layers`: adapt only the top this many of the attention sites
    the rule selects (default: all of them); `output_projection`: add the prompt attention before the output
    projection (the paper, PEFT on Llama and Mistral) or after it, unprojected (PEFT on GPT-2); `dtype`: the
    prompt's and gate's dtype (default: the attention module's)."""

    adapter_len: int = Field(10, gt=0)
    adapter_layers: int | None = Field(None, gt=0)
    output_projection: bool = True
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None


def gated_prompt_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           gate: torch.Tensor) -> torch.Tensor:
    """The formula: g · softmax(q K^T / sqrt(d)) V for q [batch, heads, seq, d] and the prompt's K, V
    [kv_heads, P, d] (repeated to the query heads); the softmax in float32. Returns [batch, seq, heads, d]."""
    heads, kv_heads, d = query.shape[1], key.shape[0], query.shape[-1]
    key = key.repeat_interleave(heads // kv_heads, dim=0).to(query.dtype)
    value = value.repeat_interleave(heads // kv_heads, dim=0)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(d)
    probs = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value.to(probs.dtype)).transpose(1, 2)


@dataclass(eq=False)
class PromptRequest(OutputRequest):
    """One branch's prompt keys and values for one attention call; adds the gated prompt attention to the output
    (or, unprojected, keeps it in `term` for the branch to add after the module)."""

    key: torch.Tensor
    value: torch.Tensor
    gate: torch.Tensor
    site: str
    projected: bool
    term: torch.Tensor | None = None
    used: bool = False

    def after(self, module: nn.Module, query: torch.Tensor, output: Any) -> Any:
        term = gated_prompt_attention(query, self.key, self.value, self.gate)
        if not self.projected:
            self.term = term
            return output
        attn = output[0] if isinstance(output, tuple) else output
        attn = attn + term.to(attn.dtype)
        return (attn, *output[1:]) if isinstance(output, tuple) else attn


@dataclass
class Projection:
    """How the branch reaches a projection of its layer: the live module at `parent.<name>` (its Host, if another
    attachment adapts it) and the output channels of the role, None for all of them."""

    parent: nn.Module
    name: str
    channels: tuple[tuple[int, int], ...] | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = getattr(self.parent, self.name)(x)
        if self.channels is None:
            return out
        return torch.cat([out[..., a:b] for a, b in self.channels], dim=-1)


class LlamaAdapterBranch(InterfaceBranch):
    """`adaption_prompt` [1, adapter_len, hidden] (standard normal, as PEFT and the paper's code) and
    `adaption_gate` [1] (zero) at one attention site."""

    def __init__(self, site: Site, params: LlamaAdapterParams, dtype: torch.dtype, device: torch.device):
        super().__init__()
        info = site.attention
        self.site, self.projected = site.path, params.output_projection
        self.kv_heads, self.head_dim, self.length = info.num_kv_heads, info.head_dim, params.adapter_len
        self.key_path, self.value_path = info.key, info.value
        self.adaption_prompt = nn.Parameter(torch.empty(1, params.adapter_len, info.hidden_size, dtype=dtype,
                                                        device=device).normal_())
        self.adaption_gate = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        self.projections: tuple[Projection, Projection] | None = None  # set by the method's attach_model

    def adapt_call(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.projections is None:
            raise SurgeryError(f"llama-adapter at site {self.site!r} is not linked to its key and value projections")
        key_proj, value_proj = self.projections
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        prompt = self.adaption_prompt.to(hidden.dtype) if isinstance(hidden, torch.Tensor) else self.adaption_prompt
        key = key_proj(prompt).view(self.length, self.kv_heads, self.head_dim).transpose(0, 1)
        value = value_proj(prompt).view(self.length, self.kv_heads, self.head_dim).transpose(0, 1)
        return args, request(kwargs, PromptRequest(key, value, self.adaption_gate, self.site, self.projected))

    def adapt_output(self, args: tuple, kwargs: dict, out: Any) -> Any:
        mine = requests_of(kwargs, self.site)
        if not any(r.used for r in mine):
            raise SurgeryError(f"llama-adapter at site {self.site!r} never reached the attention function: the module "
                               "does not pass its extra keyword arguments to transformers' attention interface (or its "
                               "config's attention implementation was changed after attach)")
        if self.projected:
            return out
        attn = out[0] if isinstance(out, tuple) else out
        attn = attn + next(r.term for r in mine if r.used).reshape(attn.shape).to(attn.dtype)
        return (attn, *out[1:]) if isinstance(out, tuple) else attn


def _checked(site: Site) -> None:
    info = site.attention
    missing = [what for what, value in (("key projection", info and info.key), ("value projection", info and info.value),
                                         ("head count", info and info.num_kv_heads), ("head size", info and info.head_dim),
                                         ("hidden size", info and info.hidden_size)) if not value]
    if missing:
        raise SiteError(f"llama-adapter at site {site.path!r}: the graph gave no {', '.join(missing)} for this attention")


def _projection(model: nn.Module, report: Any, path: str, role: str) -> Projection:
    parent_path, _, name = path.rpartition(".")
    site = report.site(path)
    return Projection(model.get_submodule(parent_path) if parent_path else model, name, site.slices.get(role))


class LlamaAdapter(Method):
    name = "llama-adapter"
    params = LlamaAdapterParams
    kinds = frozenset({"attention"})
    mergeable = False

    def narrow(self, sites: list[Site], params: Any) -> list[Site]:
        if params.adapter_layers is None:
            return sites
        if params.adapter_layers > len(sites):
            raise SurgeryError(f"adapter_layers is {params.adapter_layers}, but the rule selects {len(sites)} attention sites")
        return sites[-params.adapter_layers:]

    def build(self, site: Site, module: nn.Module, params: Any, roles: frozenset[str]) -> Branch:
        _checked(site)
        if interface_config(module, site.path, self.name) is None:
            raise SiteError(f"llama-adapter at site {site.path!r}: {type(module).__name__} is not a transformers "
                            "attention module (it has no config naming an attention implementation)")
        dtype = branch_dtype(params.dtype, first_float_dtype(module))
        return LlamaAdapterBranch(site, params, dtype, module_device(module))

    def count(self, site: Site, params: Any, roles: frozenset[str]) -> int:
        _checked(site)
        return params.adapter_len * site.attention.hidden_size + 1

    def attach_model(self, model: nn.Module, branches: dict[str, Branch]) -> Callable[[], None] | None:
        """Link each branch to its layer's key and value projections, and switch the attention functions."""
        report = inspect(model)
        for branch in branches.values():
            branch.projections = (_projection(model, report, branch.key_path, "attention.key"),
                                  _projection(model, report, branch.value_path, "attention.value"))
        return Unlink(list(branches.values()), switch_attention(model, branches, self.name))


class Unlink:
    """Undo of an attach: switch the attention functions back and forget the projections. A plain object, not a
    closure, so it follows the model through `copy.deepcopy`."""

    def __init__(self, branches: list[LlamaAdapterBranch], switch: Callable[[], None] | None):
        self.branches, self.switch = branches, switch

    def __call__(self) -> None:
        if self.switch is not None:
            self.switch()
        for branch in self.branches:
            branch.projections = None


@surgery.hookimpl
def surgery_methods() -> list[Method]:
    return [LlamaAdapter()]
