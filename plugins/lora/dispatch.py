"""Which path computes a LoRA call: `choose`, the one place where every condition of every path is read.

PLAIN is formula.py's formula; every other path is a faster way to the same numbers.

Paths (`Path.kind`), what computes the call, and when:

- PLAIN: `formula.output`, through the Host's `adapt_output`. When x is not a tensor; under torch.compile (which
  fuses the plain composition itself); under autocast (whose casts apply to the plain ops, as HF Trainer's and
  TRL's `bf16`/`fp16` use it); for a role's channels of a fused projection; at a base that is not exactly
  nn.Linear (Conv1D, embedding, a subclass; a quantized layer, except in training where its weight format
  dequantizes per call: quantized_base.py); for x, W (a quantized layer's compute dtype) and A of different
  dtypes. (And wherever the branch is not alone at its site: the Host then does not ask.)
- TAKEN: the output its group computed when the group's first member was called: for a group member called with
  that very input, unchanged since, in the same grad mode (`shared.SharedInput.take`).
- SHARED: `shared.SharedInputLora` over the group's live members. For a member of a group (sites reading one
  input: q/k/v, gate/up) whose live members are two or more and include it: each alone at its site, at an
  nn.Linear (in training also a quantized layer, as FUSED) reading x's width, in x's dtype; one dropout rate for all, and with dropout equal ranks and the
  kernels serving.
- SHARED_INFERENCE: `shared.inference`, the same by plain ops: as SHARED, without autograd and without dropout.
- FUSED: `fused.LoraLinear`, otherwise at a plain nn.Linear, with autograd recording or dropout (training); at a
  quantized layer (in training only, see PLAIN), its weight dequantized in forward and again in backward.
- INFERENCE: `fused.inference`, the same by plain ops, otherwise (no autograd, no dropout).
- ROUTED: `routes.output` (in training without dropout `routes.call`, the base linear inside), every sample's
  own pair at once: per-sample routing, no branch with channels, one dropout rate for all.
- GROUPS: the Host runs each group of samples alone: per-sample routing otherwise.

Within FUSED, SHARED and their inference forms:

- `merged` (merged_weight.py): through W + s·B @ A built per call, where there is no dropout, the weights are on
  MERGED_DEVICES and there are as many tokens as input features (every member's): the inference forms' y, and
  FUSED's dx in backward. Never a training forward's y, which keeps the update in the output's rounding: a bf16
  merged weight made the logits less accurate than PEFT's (fused.py).
- `kernels` (kernels.py): Triton importable, x on KERNEL_DEVICES in KERNEL_DTYPES, rank <= kernels.MAX_RANK.
  FUSED uses them with dropout (the mask drawn in the kernels) or for an input kept as its factors; SHARED for dh
  and dB in one pass over each dy (and for the masks with dropout); the inference forms to build merged weights.
- `saved` (FUSED; saved_input.py): x kept as the two factors autograd keeps anyway, unless saved-tensor hooks
  (checkpointing, offloading) are active.

`choose` reads each condition once per call, cheaply: these paths were tuned for the host's time per call.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from surgery.plugin import input_of
from surgery_plugins.lora import fused, kernels, reads, saved_input

PLAIN, TAKEN, SHARED, SHARED_INFERENCE, FUSED, INFERENCE, ROUTED, GROUPS = (
    "plain", "taken", "shared", "shared inference", "fused", "inference", "routed", "groups")

KERNEL_DEVICES = {"cuda"}  # where the Triton kernels run; the tests add "cpu" under TRITON_INTERPRET=1
KERNEL_DTYPES = {torch.float16, torch.bfloat16}
MERGED_DEVICES = {"cuda"}  # where the merged weight is used; the tests add "cpu" to check it against float64


class Path(NamedTuple):
    """A call's path: `kind` (one of the names above) and what the chosen function is given (the autograd
    functions take the Path itself)."""

    kind: str
    p: float = 0.0  # dropout rate of this call
    merged: bool = False  # through the merged weight built per call: inference's y, FUSED's dx
    kernels: bool = False  # with the Triton kernels (inference forms: merged weights built by the kernel)
    saved: tuple = ()  # FUSED: what to keep of x for backward, (x,) or its factors
    tensors: tuple = ()  # FUSED, INFERENCE: the linear's weight and bias, and the pair A, B
    live: tuple = ()  # SHARED: (index, (weight, bias, A, B)) of each of the group's members that compute together
    taken: Any = None  # TAKEN: the output


_PLAIN, _ROUTED, _GROUPS = Path(PLAIN), Path(ROUTED), Path(GROUPS)
_path = tuple.__new__  # _path(Path, (all fields)): a Path without its constructor's Python call, on every call


def rate(branch: Any) -> float:
    """The branch's dropout rate in this call: its rate while training, else 0."""
    dropout = reads.dropout(branch)
    return dropout.p if branch.training and isinstance(dropout, nn.Dropout) else 0.0


def kernels_serve(x: torch.Tensor, rank: int) -> bool:
    """Whether the Triton kernels serve input `x` and LoRA rank `rank`."""
    return (kernels.AVAILABLE and x.device.type in KERNEL_DEVICES and x.dtype in KERNEL_DTYPES
            and rank <= kernels.MAX_RANK)


def merged_pays(tokens: int, weight: torch.Tensor) -> bool:
    """Whether `tokens` rows through the [out, in] `weight` are cheaper with the merged weight (merged_weight.py)."""
    return weight.device.type in MERGED_DEVICES and tokens >= weight.shape[1]


def kept(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the fused linear keeps of `x` for backward: the factors (u, v) of x = u * v that autograd keeps anyway,
    or (x,); always (x,) under saved-tensor hooks, which manage saved tensors themselves."""
    pair = saved_input.factors(x)
    return (x,) if pair is None or saved_input.hooks_active() else pair


def choose(branch: Any, base: nn.Module | None, x: Any, groups: list | None = None) -> Path:
    """The path of one call (see the module docstring).

    `branch` runs alone at `base` on input `x` (the Host offers it `fused_call`). With `groups` (one branch per
    group of samples, under per-sample routing; `branch`, `base` and `x` unused), the routed path or GROUPS.
    A group member's pending output is taken (or, stale, dropped) here."""
    if groups is not None:
        first = rate(groups[0])
        return _GROUPS if any(reads.channels(b) is not None or rate(b) != first for b in groups) else _ROUTED
    if not isinstance(x, torch.Tensor) or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return _PLAIN
    group = branch.shared
    if group is not None:
        index = branch.shared_index
        done = group.take(index, x)
        if done is not None:
            return _path(Path, (TAKEN, 0.0, False, False, (), (), (), done))
        width, live, rates, caller_live, grad = x.shape[-1], [], set(), False, torch.is_grad_enabled()
        for i, m in enumerate(group.members):
            # alone at its site: the only branch running there, samples not routed (the public state of the
            # engine's host at its site, kept at attach as `m.host`); at an nn.Linear, or in training at a
            # quantized layer whose format dequantizes per call
            host, base_i = m.host, m.base_module
            if m.running and len(host.running) == 1 and host.routing is None \
                    and (type(base_i) is nn.Linear or grad and m.quantized is not None):
                tensors = group.tensors(i)  # weight (a QuantizedWeight at a quantized layer), bias, A, B
                if tensors[0].shape[1] != width:
                    continue
                if tensors[0].dtype == x.dtype == tensors[2].dtype == tensors[3].dtype:
                    live.append((i, tensors))
                    caller_live = caller_live or i == index
                    rates.add(rate(m))
        if len(live) > 1 and caller_live and len(rates) == 1:
            p = rates.pop()
            ranks = {tensors[2].shape[0] for _, tensors in live}
            serve = kernels_serve(x, max(ranks))
            if p == 0 or serve and len(ranks) == 1:
                tokens = x.numel() // width
                kind = SHARED if p > 0 or grad else SHARED_INFERENCE
                merged = kind is SHARED_INFERENCE and all(merged_pays(tokens, tensors[0]) for _, tensors in live)
                return _path(Path, (kind, p, merged, serve, (), (), tuple(live), None))
    a, b = reads.pair(branch)
    linear = type(base) is nn.Linear
    weight, bias = reads.weight_bias(base) if linear else (branch.quantized if torch.is_grad_enabled() else None, None)
    if reads.channels(branch) is not None or weight is None or not x.dtype == a.dtype == weight.dtype:
        return _PLAIN
    p = rate(branch)
    merged = p == 0 and merged_pays(x.numel() // x.shape[-1], weight)
    tensors = (weight, bias if linear else base.bias, a, b)
    if p == 0 and not torch.is_grad_enabled():  # the kernels only build the merged weight
        return _path(Path, (INFERENCE, 0.0, merged, merged and kernels_serve(x, a.shape[0]), (), tensors, (), None))
    saved = kept(x)
    use_kernels = kernels_serve(x, a.shape[0]) and (p > 0 or len(saved) == 2)
    return _path(Path, (FUSED, p, merged, use_kernels, saved, tensors, (), None))


def forward(branch: Any, base: nn.Module, args: tuple, kwargs: dict) -> Any:
    """`LoraBranch.fused_call` (the function itself): the site's output by the path `choose` picks, or
    NotImplemented for the plain formula (the Host then runs `adapt_output`)."""
    x = args[0] if args else input_of(args, kwargs)
    path = choose(branch, base, x)
    kind = path.kind
    if kind is FUSED:
        return fused.LoraLinear.apply(x, *path.tensors, branch.scale, path)
    if kind is INFERENCE:
        return fused.inference(x, *path.tensors, branch.scale, path.merged, path.kernels)
    if kind is TAKEN:
        return path.taken
    if kind is SHARED or kind is SHARED_INFERENCE:
        return branch.shared.compute(branch.shared_index, x, path, kind is SHARED)
    return NotImplemented
