"""LoRA's branches: the trainable pair at one site and how the Host runs it. Each computes formula.py's formula:
the plain form in `adapt_output`, the faster ones through dispatch.py (`fused_call` when the branch runs alone at
its site, `prepare_routes`/`route_output` under per-sample routing)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from surgery.plugin import Branch, SlicedBranch, input_of
from surgery_plugins.lora import dispatch, formula, routed_group, routes
from surgery_plugins.lora.quantized_base import QuantizedWeight
from surgery_plugins.lora.shared import SharedInput


def init_pair(a: torch.Tensor, b: torch.Tensor, init: str, r: int) -> None:
    """A kaiming-uniform as HF PEFT does (or gaussian, std 1/r, as in the paper); B zero."""
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=1.0 / r)
        nn.init.zeros_(b)


class LoraBranch(Branch):
    """`y + s · B(A(dropout(x)))`, added to all output channels or, with `channels`, to those only."""

    def __init__(self, in_features: int, out_features: int, params: Any, dtype: torch.dtype,
                 device: torch.device, channels: torch.Tensor | None = None):
        super().__init__()
        self.scale = params.scale  # the scale of every path (formula.scale)
        self.lora_A = nn.Parameter(torch.empty(params.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, params.r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(params.dropout) if params.dropout > 0 else nn.Identity()
        self.register_buffer("channels", channels, persistent=False)
        self.input_group: str | None = None  # Site.input_group, for linking with the branches that share x
        self.shared: SharedInput | None = None  # the group of them, while linked (Lora.attach_model)
        self.shared_index = 0
        self.quantized = None  # a quantized base's weight for the fused path (quantized_base.py), set by `over`
        init_pair(self.lora_A, self.lora_B, params.init, params.r)

    def reads_with(self, input_group: str, base: nn.Module) -> None:
        """Mark this branch as one of those whose sites read one input; `base` is its site's module, kept as a
        plain reference (not a submodule: it belongs to the model) so the group can compute this output."""
        self.input_group = input_group
        object.__setattr__(self, "base_module", base)

    def over(self, quantized: QuantizedWeight | None) -> None:
        """Mark this branch's site as a quantized layer whose weight `quantized` the fused path can read (None:
        the layer's own call only)."""
        self.quantized = quantized

    def link(self, shared: SharedInput | None, index: int = 0, host: nn.Module | None = None) -> None:
        """Join the group `shared` as its member `index` (None: leave it); `host` is the engine's host at this
        branch's site, kept as a plain reference (it is this branch's parent): its `running` and `routing` say
        whether this branch runs alone there (`dispatch.choose`)."""
        self.shared, self.shared_index = shared, index
        object.__setattr__(self, "host", host)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · B(A(dropout(x)))."""
        return formula.update(x, self.lora_A, self.lora_B, self.scale, self.dropout)

    def adapt_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        if isinstance(out, tuple):  # (output, scaling factor): I-BERT's QuantLinear
            return (self.adapt_output(args, kwargs, out[0]), *out[1:])
        return formula.output(out, input_of(args, kwargs), self.lora_A, self.lora_B, self.scale, self.dropout,
                              self.channels)

    def weight_delta(self) -> torch.Tensor:
        """ΔW = s · B @ A, [out, in]."""
        return formula.delta_weight(self.lora_A, self.lora_B, self.scale)

    # The base linear and this branch together, by the path dispatch.py chooses (NotImplemented: the plain formula,
    # through `adapt_output`); dispatch.forward itself, not a wrapper around it: this runs on every call.
    fused_call = dispatch.forward

    @classmethod
    def prepare_routes(cls, branches: list["LoraBranch"]) -> routes.Stack:
        """All groups' pairs (routes.Stack), where dispatch.py routes the batch at once."""
        if dispatch.choose(None, None, None, groups=branches).kind is dispatch.GROUPS:
            raise NotImplementedError
        return routes.Stack(branches)

    @classmethod
    def route_call(cls, state: routes.Stack, group: torch.Tensor, base: nn.Module, args: tuple, kwargs: dict
                   ) -> torch.Tensor:
        """The base linear and every sample's LoRA at once: with the other linears that read the same input
        (routed_group.py; in inference only for large inputs), else alone (routes.call); or NotImplemented, and
        always under autocast, whose casts apply to the Host's base call and to `route_output`'s ops."""
        x = input_of(args, kwargs)
        if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
            return NotImplemented
        out = routed_group.call(state, group, base, x)  # with the linears that read x too, where they can
        return routes.call(state, group, base, x) if out is NotImplemented else out

    @classmethod
    def route_output(cls, state: routes.Stack, group: torch.Tensor, args: tuple, kwargs: dict,
                     out: torch.Tensor) -> torch.Tensor:
        """Every sample's own LoRA at once, whatever the number of adapters (routes.py)."""
        if isinstance(out, tuple):  # (output, scaling factor): I-BERT's QuantLinear
            return (cls.route_output(state, group, args, kwargs, out[0]), *out[1:])
        return routes.output(state, group, input_of(args, kwargs), out)


class WeightLoraBranch(Branch):
    """LoRA in weight space, at a site whose path names a parameter: the module reads W + ΔW. Stacked MoE experts
    (`experts` = E) get one pair per expert, A [E, r, in] and B [E, out, r] (formula.expert_weight); a linear weight
    its module reads itself (nn.MultiheadAttention's) one pair A [r, in], B [out, r] (formula.linear_weight). With
    `channels`, on those output channels only (a role of a fused gate_up or in_proj)."""

    def __init__(self, experts: int | None, in_features: int, out_features: int, params: Any, dtype: torch.dtype,
                 device: torch.device, channels: torch.Tensor | None = None):
        super().__init__()
        self.scale = params.scale
        stack = () if experts is None else (experts,)
        self.lora_A = nn.Parameter(torch.empty(*stack, params.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(*stack, out_features, params.r, dtype=dtype, device=device))
        self.register_buffer("channels", channels, persistent=False)
        pairs = zip(self.lora_A, self.lora_B) if experts is not None else [(self.lora_A, self.lora_B)]
        for a, b in pairs:  # each expert's pair as a linear's (PEFT: kaiming on in)
            init_pair(a, b, params.init, params.r)
        self._update = formula.expert_weight if experts is not None else formula.linear_weight

    def adapt_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._update(weight, self.lora_A, self.lora_B, self.scale, self.channels)


class SlicedLoraBranch(SlicedBranch):
    """One LoraBranch per selected role of a fused projection (e.g. only q and v of GPT-2's c_attn)."""


class LoraEmbeddingBranch(Branch):
    """`y + s · A.T[ids] @ B.T`, with A [r, num_embeddings] and B [dim, r]."""

    def __init__(self, base: nn.Embedding, params: Any, dtype: torch.dtype):
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
        return formula.embedding_output(out, input_of(args, kwargs), self.lora_A, self.lora_B, self.scale,
                                        self.padding_idx)

    def weight_delta(self) -> torch.Tensor:
        """ΔW in the dense [dim, num_embeddings] view."""
        return formula.delta_weight(self.lora_A, self.lora_B, self.scale)
