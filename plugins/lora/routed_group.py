"""Per-sample routing at linears that read one input (q/k/v, gate/up), computed together.

Each site of the group routes the batch's samples to their own pairs (routes.py's joined form). Computed site by
site, x is read once per site for h, the pairs of every site are joined apart, and the input's gradient is summed
from one autograd node per site. Here the first site called computes every site's output at once, in one autograd
node (`routes.GroupedJoinedLora`):

- forward: h = x @ [A_site1; A_site2; ...]ᵀ, every group's A at every site joined, in one matmul; one mask holds
  each sample's scale on its own pairs' columns (`routes.mask_of`); y_i = x @ W_iᵀ + b_i + (h · mask)_i @ B_iᵀ;
- backward: dx = Σ dy_i @ W_i + dh @ [A ...] in one buffer; dA of every pair as rows of one dh.T @ x; each dB
  in its own layout, from its group's rows only where the groups' samples are consecutive (routes.grads_b).

The other sites take their output when they are called next, with that very input, unchanged since (version
counters), under the same routing (`shared.SharedInput.keep_routed`/`take_routed`). The group is the one the
first group's branch belongs to (`LoraBranch.shared`); a site joins when it is routed alike, holds a branch of
every group in use, at a plain nn.Linear reading x's width, all in x's dtype, without dropout.

In inference the same function computes the outputs (nothing is recorded) where x is large enough that the reads
of x it saves outweigh the host work it adds (`pays`); a decode step's few tokens are left to each site's own
call (routes.output), which keeps its joined pairs across calls.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery_plugins.lora import dispatch, reads, routes

# In inference, computing the sites together saves each site after the first a read of x (and its own h matmul
# and mask) but adds host work: finding the sites, the version counters of every kept output's tensors. The GPU
# work of the base matmuls should hide that host work from about this many elements of x (2048 tokens of width
# 2048): an estimate; the gain was measured only at 32 × 512 tokens of width 2048 (docs/performance.md).
INFERENCE_ELEMENTS = 1 << 22


def pays(x: torch.Tensor) -> bool:
    """Whether the sites reading `x` compute together: always in training, from INFERENCE_ELEMENTS in inference."""
    return torch.is_grad_enabled() or x.numel() >= INFERENCE_ELEMENTS


def sites(stack: routes.Stack, x: torch.Tensor) -> list[tuple[int, nn.Module, list, tuple]] | None:
    """The sites that compute together with `stack`'s ((member index, base linear, one branch per group in the
    stack's order, and the site's tensors: weight, bias, every group's A, every group's B)), this one included;
    None where fewer than two can."""
    first = stack.branches[0]
    shared, host = first.shared, getattr(first, "host", None)
    if shared is None or host is None or host.routing is None:
        return None
    routing = host.routing
    names = list(dict.fromkeys(n for n in routing if n is not None))  # the groups, in the Host's order
    if len(names) != len(stack.branches):
        return None
    width, dtype, kind = x.shape[-1], x.dtype, type(first)
    found = []
    for i, member in enumerate(shared.members):
        site = getattr(member, "host", None)
        if site is None or site.routing != routing:
            continue
        named = site.branches
        branches = [named[n] if n in named else None for n in names]  # noqa: SIM401 -- a ModuleDict has no get
        base = member.base_module
        if type(base) is not nn.Linear:
            continue
        weight, bias = reads.weight_bias(base)
        if weight.shape[1] != width or weight.dtype != dtype or any(
                type(b) is not kind or reads.channels(b) is not None or dispatch.rate(b) > 0 for b in branches):
            continue
        a_s, b_s = zip(*map(reads.pair, branches))  # each read once: this runs per call
        if any(t.dtype != dtype for t in a_s) or any(t.dtype != dtype for t in b_s):
            continue
        found.append((i, base, branches, (weight, bias, *a_s, *b_s)))
    if len(found) < 2 or all(i != first.shared_index for i, *_ in found):
        return None
    return found


def outputs(stack: routes.Stack, group: torch.Tensor, x: torch.Tensor, found: list) -> dict[int, torch.Tensor]:
    """Every site's output on `x` (member index -> output), by one routes.GroupedJoinedLora."""
    flat = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
    n = len(stack.branches)
    layout, ranks, scales, tensors = [], (), (), []
    for _, _, branches, site in found:
        site_ranks = tuple(a.shape[0] for a in site[routes.PER_SITE:routes.PER_SITE + n])
        layout.append((site[1] is not None, site_ranks))
        ranks += site_ranks
        scales += tuple(float(b.scale) for b in branches)
        tensors += site
    every = routes.mask_of(ranks, scales, x.dtype, n, group)
    outs = routes.GroupedJoinedLora.apply(flat, every, tuple(layout), routes.rows_of(group, n, flat.shape[1]),
                                          *tensors)
    return {i: out if flat is x else out.view(*x.shape[:-1], out.shape[-1]) for (i, *_), out in zip(found, outs)}


def call(stack: routes.Stack, group: torch.Tensor, base: nn.Module, x: Any) -> Any:
    """This site's output, taken from the group's call on `x` or computing the group's (without dropout, where the
    joined form is chosen and grouping `pays`); else NotImplemented."""
    first = stack.branches[0]
    shared = first.shared
    if shared is None or not isinstance(x, torch.Tensor) or not pays(x):
        return NotImplemented
    index = first.shared_index
    done = shared.take_routed(index, x, group, (*reads.weight_bias(base), *stack.pairs))
    if done is not None:
        return done
    samples = x.shape[0]
    if stack.rate() > 0 or not stack.joins(x.numel() // x.shape[-1], samples):
        return NotImplemented
    found = sites(stack, x)
    if found is None or next(b for i, b, *_ in found if i == index) is not base:
        return NotImplemented
    outs = outputs(stack, group, x, found)
    shared.keep_routed(index, x, group, outs, {i: tensors for i, _, _, tensors in found})
    return outs[index]
