"""LoRA on linears that read one input (q/k/v of an attention, gate/up of an MLP), computed together.

For members i with frozen-or-not weights W_i, biases b_i and LoRA pairs (A_i, B_i, scale s_i), one autograd
function computes every y_i = formula.linear(x, W_i, b_i, A_i, B_i, s_i) at once:

- forward: one matmul h = x @ [A_1; A_2; ...].T for all branches, scaled in place (hs_i = s_i h_i); then a
  member wider out than in (an MLP's gate/up) takes its update inside the base matmul,
  y_i = [x | hs] @ [W_i | 0 .. B_i .. 0].T, where copying x and its weight per call costs less than the update
  of its wide y_i, and the others add it by update_first.py, y_i = x @ W_i.T + hs_i @ B_i.T (see `_outputs`);
- backward: dx = Σ_i dy_i @ W_i accumulated in place (only where x needs a gradient), and each member's
  columns of dh, dh_i = s_i dy_i @ B_i; then dA = dh.T @ x and dx += dh @ [A_1; A_2; ...] once for all branches;
  dB_i = dy_i.T @ hs_i. On CUDA, up to rank 16, one kernel computes every member's dh_i and dB_i in one pass over
  its dy_i (kernels.up_grads, `_one_pass`), where torch takes two skinny matmuls per member that each read dy_i.
  (Widening the dx matmuls to [dx | dh] instead cost the H100 more than the skinny dh matmuls: cuBLAS runs the
  widened shapes slower, and the widened weights had to be copied again.)

Only `inference` goes through merged weights (without dropout, from as many tokens as inputs on CUDA:
merged_weight.py). In training the outputs keep the update in the output's rounding, as fused.py does and for the
same reason (accuracy), and dx stays Σ dy_i @ W_i + dh @ A: building merged weights in backward would cost the
host more ops than the one update of dx it saves.

With dropout (CUDA, equal ranks: the kernels of kernels.py), every member keeps its own mask: h comes from
one kernel that drops x per member on the fly, and dA with the masked dx update from one kernel in backward,
which draws the masks again; elsewhere the dispatch does not send a group with dropout here, and its branches
compute one by one.

dispatch.py decides when a group computes together, which members take part, and with which of kernels and
merged weights; `SharedInput` keeps the outputs computed for the members that are called next. The choices left here
are layouts of the same products, by the bytes each moves (`_update_inside`, `_one_pass`).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from surgery.plugin import versions
from surgery_plugins.lora import kernels, merged_weight, reads, update_first

PER_MEMBER = 4  # weight, bias, A, B


@functools.lru_cache(maxsize=64)
def _zeros(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, cols] block of zeros, made once per shape (read by torch.cat, never written)."""
    return torch.zeros(rows, cols, dtype=dtype, device=device)


def _scaled(h: torch.Tensor, scales: tuple[float, ...], ranks: list[int]) -> torch.Tensor:
    """h with member i's columns times s_i, in place."""
    if len(set(scales)) == 1:
        return h.mul_(scales[0]) if scales[0] != 1 else h
    col = 0
    for s, r in zip(scales, ranks):
        h[:, col:col + r].mul_(s)
        col += r
    return h


def _update_inside(w: torch.Tensor, tokens: int, members: int) -> bool:
    """Whether a member with weight `w` [out, in], wider out than in, takes its LoRA term inside the base matmul on
    `tokens` rows: where what that copies per call, its share of [x | hs] (tokens · in / members) and its widened
    weight (read and written, 2 · in · out), is less than what the update costs the output (update_first.py: u
    written, tokens · out, or y read and written again, twice that)."""
    out, d_in = w.shape
    update = tokens * out * (1 if update_first.update_first(tokens, out) else 2)
    return out > d_in and tokens * d_in // members + 2 * d_in * out < update


ONE_PASS_RANK = 16  # the largest rank whose dh and dB take one pass over dy (`_one_pass`)


def _one_pass(ranks: list[int]) -> bool:
    """Whether the members' dh_i and dB_i take one pass over each dy_i (kernels.up_grads) rather than two cuBLAS
    matmuls that each read it. The kernel writes dB in float32 parts, one per band of 128 rows, and adds them after:
    8 · rank / 128 bytes per element of dy, against the 2 bytes of the second read it saves, so it pays below rank
    32. On the H100 (bench_lora_kernels.py, docs/performance.md) it took grid row 5's q/k/v and gate/up at rank 16 in
    0.76 and 0.91 × cuBLAS's time, and lost row 6's at rank 64 (1.08 and 1.63 ×)."""
    return max(ranks) <= ONE_PASS_RANK


def _outputs(x: torch.Tensor, hs: torch.Tensor, weights: tuple, biases: tuple, b_s: tuple) -> list[torch.Tensor]:
    """y_i = x @ W_i.T + b_i + hs_i @ B_i.T for every member (hs: h with each member's scale).

    A member wider out than in may take its LoRA term inside the base matmul, y_i = [x | hs] @ [W_i | 0 .. B_i ..
    0].T, instead of the update of update_first.py, where the copies that costs are the smaller (`_update_inside`).
    On the H100 (bench_update_order.py, docs/performance.md) inside took an MLP's gate/up at 8192 tokens × 2048 →
    5632 and × 1536 → 8960 in 1.09-1.20 × the base matmul against 1.15-1.33 for the update, and lost at 4096 × 4096
    → 14336 (1.15-1.16 against 1.09) and 2048 × 8192 → 28672 (1.40 against 1.18), where copying the weight costs
    more than the update's output. q/k/v always take the update: there the two cost the same, and the update needs
    fewer ops."""
    x2 = x.reshape(-1, x.shape[-1])
    inside = [_update_inside(w, x2.shape[0], len(weights)) for w in weights]
    x_ext = torch.cat([x2, hs], dim=1) if any(inside) else None
    outs, col, width = [], 0, hs.shape[1]
    for w, bias, b, ins in zip(weights, biases, b_s, inside):
        out, r = b.shape
        if ins:
            w_ext = torch.cat([w, _zeros(out, col, w.dtype, w.device), b,
                               _zeros(out, width - col - r, w.dtype, w.device)], dim=1)  # the zero blocks are cached
            y = F.linear(x_ext, w_ext, bias)
        else:
            y = update_first.linear(x2, w, bias, hs[:, col:col + r], b)
        outs.append(y.view(*x.shape[:-1], out))
        col += r
    return outs


def inference(x: torch.Tensor, scales: tuple[float, ...], merged: bool, one_pass: bool, *members: torch.Tensor | None
              ) -> tuple[torch.Tensor, ...]:
    """`SharedInputLora`'s outputs without autograd and dropout, by the same plain ops and without the autograd
    function's per-call cost (merged weights built by the kernel with `one_pass`)."""
    weights, biases, a_s, b_s = (members[k::PER_MEMBER] for k in range(PER_MEMBER))
    if merged:  # y_i = x @ (W_i + s_i B_i @ A_i).T + b_i (merged_weight.py)
        built = merged_weight.merged_all(weights, a_s, b_s, scales, one_pass)
        return tuple(F.linear(x, w, bias) for w, bias in zip(built, biases))
    hs = _scaled(x.reshape(-1, x.shape[-1]) @ torch.cat(a_s).t(), scales, [a.shape[0] for a in a_s])
    return tuple(_outputs(x, hs, weights, biases, b_s))


class SharedInputLora(torch.autograd.Function):
    """Outputs of several LoRA-adapted linears on one input; then the dispatch's `path` (dispatch.Path: its `p`
    the dropout rate, > 0 with the kernels only; `kernels` the Triton kernels for dh and dB), and 4 tensors per
    member (weight, bias or None, A, B). A member's weight may be a quantized layer's
    (quantized_base.QuantizedWeight): dequantized in forward, and again in backward where dx is needed, nothing
    dense kept between. See the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scales: tuple[float, ...], path: Any, *members: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        p, use_kernels = path.p, path.kernels
        weights, biases, a_s, b_s = (members[k::PER_MEMBER] for k in range(PER_MEMBER))
        # a quantized layer's weight, dense for this call only: backward dequantizes it again where dx is needed
        ctx.quantized = [None if isinstance(w, torch.Tensor) else w for w in weights]
        weights = tuple(w if q is None else q() for w, q in zip(weights, ctx.quantized))
        kept = [w if q is None else None for w, q in zip(weights, ctx.quantized)]
        ctx.ranks = [a.shape[0] for a in a_s]
        ctx.p, ctx.seed = p, kernels.new_seed(x.device) if p > 0 else 0
        ctx.kernels = use_kernels
        x2, a_cat = x.reshape(-1, x.shape[-1]), torch.cat(a_s)
        h = kernels.dropped_down(x2, a_cat, len(a_s), p, ctx.seed) if p > 0 else x2 @ a_cat.t()
        hs = _scaled(h, scales, ctx.ranks)
        outs = _outputs(x, hs, weights, biases, b_s)
        ctx.save_for_backward(x, hs, *kept, *b_s, a_cat)
        ctx.scales = scales
        ctx.has_bias = [b is not None for b in biases]
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *dys: torch.Tensor | None):
        x, hs, *rest = ctx.saved_tensors
        n = len(dys)
        weights, b_s, a_cat = rest[:n], rest[n:2 * n], rest[2 * n]
        needs = ctx.needs_input_grad[:2] + ctx.needs_input_grad[3:]  # x, scales, then 4 per member
        if all(dy is None for dy in dys):
            return (None, None, None, *[None] * (PER_MEMBER * len(dys)))
        x2 = x.reshape(-1, x.shape[-1])
        grads: list[torch.Tensor | None] = [None] * (PER_MEMBER * len(dys))
        dx = None
        dh = hs.new_empty(hs.shape) if all(dy is not None for dy in dys) else hs.new_zeros(hs.shape)
        one_pass = ctx.kernels and _one_pass(ctx.ranks)  # dh_i and dB_i in one pass over each dy_i
        cols = [sum(ctx.ranks[:i]) for i in range(n)]
        present: list[tuple[int, torch.Tensor]] = []
        for i, (dy, w, b, r, col) in enumerate(zip(dys, weights, b_s, ctx.ranks, cols)):
            if dy is None:
                continue
            base, dy2 = PER_MEMBER * i, dy.reshape(-1, b.shape[0])
            present.append((i, dy2))
            if needs[0]:
                w = w if ctx.quantized[i] is None else ctx.quantized[i]()
                dx = dy2 @ w if dx is None else dx.addmm_(dy2, w)
            if not one_pass:
                dh[:, col:col + r].addmm_(dy2, b, beta=0, alpha=ctx.scales[i])  # dh_i = s_i dy_i @ B_i
                if needs[5 + base]:
                    grads[base + 3] = dy2.t() @ hs[:, col:col + r]  # dB_i = s_i dy_i.T @ h_i
            if needs[2 + base]:
                grads[base] = dy2.t() @ x2
            if needs[3 + base] and ctx.has_bias[i]:
                grads[base + 1] = dy2.sum(0)
        if one_pass:
            d_b = kernels.up_grads([dy2 for _, dy2 in present], [b_s[i] for i, _ in present], hs,
                                   [cols[i] for i, _ in present], dh, [ctx.scales[i] for i, _ in present],
                                   [1.0] * len(present))
            for (i, _), db in zip(present, d_b):
                if needs[5 + PER_MEMBER * i]:
                    grads[PER_MEMBER * i + 3] = db
        if ctx.p > 0:  # dA and the masked dx update in one kernel, which draws the forward's masks again
            da = kernels.input_grads((x2,), dh, a_cat, len(ctx.ranks), ctx.p, ctx.seed, dx).to(a_cat.dtype)
            _split_a_grads(grads, da, ctx.ranks, needs, dys)
        else:
            if any(needs[4::PER_MEMBER]):
                _split_a_grads(grads, dh.t() @ x2, ctx.ranks, needs, dys)
            if dx is not None:
                dx.addmm_(dh, a_cat)
        return (None if dx is None else dx.view(x.shape), None, None, *grads)


def _split_a_grads(grads: list, da: torch.Tensor, ranks: list[int], needs: tuple, dys: tuple) -> None:
    """Hand each member that needs it its rows of dA (none to a member whose output had no gradient)."""
    col = 0
    for i, r in enumerate(ranks):
        if needs[4 + PER_MEMBER * i] and dys[i] is not None:
            grads[PER_MEMBER * i + 2] = da[col:col + r]
        col += r


def _versions(x: torch.Tensor, tensors: tuple) -> tuple:
    """Grad mode and the version counters of `x` and `tensors` (None skipped): an output computed earlier is
    still valid while these are equal. A quantized weight is frozen: not counted."""
    return (torch.is_grad_enabled(), *versions((x, *[t for t in tensors if isinstance(t, torch.Tensor)])))


class SharedInput:
    """The LoRA branches of one attachment at sites that read one input (`Site.input_group`), linked at attach.

    Each member keeps its site's module (`base_module`) and the host at its site (`host`). When the dispatch
    sends a member's call here (`compute`), every live member's output on that input is computed in one
    `SharedInputLora` (or `inference`); each other live member takes its own when it is called next (`take`),
    with that same tensor, unchanged (version counters of the input and of the member's weight, bias, A and B)
    and in the same grad mode.
    """

    def __init__(self, members: list[Any]):
        self.members = members  # LoraBranch objects
        self._pending: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] = {}  # index -> (x, versions, output)
        self._routed: dict[int, tuple] = {}  # index -> (x, group, tensors, versions, output): routed_group.py

    def tensors(self, index: int) -> tuple:
        """Member `index`'s weight (at a quantized layer, its quantized_base.QuantizedWeight), bias (or None), A
        and B."""
        branch = self.members[index]
        base = branch.base_module
        if branch.quantized is not None:
            return branch.quantized, base.bias, *reads.pair(branch)
        return *reads.weight_bias(base), *reads.pair(branch)

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `index`'s output on `x` if the group computed it on this very input, unchanged since; else None.
        Either way the member's pending output is dropped."""
        pending = self._pending.pop(index, None)
        if pending is not None and pending[0] is x and pending[1] == _versions(x, self.tensors(index)):
            return pending[2]
        return None

    def compute(self, index: int, x: torch.Tensor, path: Any, autograd: bool) -> torch.Tensor:
        """Member `index`'s output, computing the outputs of every member in `path.live` ((index, tensors) pairs)
        on `x` at once (by `SharedInputLora`, or by `inference` where the dispatch chose that) and keeping the
        others' for their calls."""
        live = path.live
        scales = tuple(self.members[i].scale for i, _ in live)
        flat = [t for _, tensors in live for t in tensors]
        if autograd:
            outs = SharedInputLora.apply(x, scales, path, *flat)
        else:
            outs = inference(x, scales, path.merged, path.kernels, *flat)
        own = None
        pending = {}
        for (i, tensors), out in zip(live, outs):
            if i == index:
                own = out
            else:
                pending[i] = (x, _versions(x, tensors), out)
        self._pending = pending
        return own

    def keep_routed(self, index: int, x: torch.Tensor, group: torch.Tensor, outs: dict[int, torch.Tensor],
                    tensors: dict[int, tuple]) -> None:
        """Keep the outputs the routed group computed on `x` under routing `group` (routed_group.py) for its other
        sites' calls; `tensors[i]`: site i's weight, bias, every group's A, every group's B."""
        self._routed = {i: (x, group, tensors[i], _versions(x, tensors[i]), out) for i, out in outs.items()
                        if i != index}

    def take_routed(self, index: int, x: torch.Tensor, group: torch.Tensor, tensors: tuple) -> torch.Tensor | None:
        """Site `index`'s kept routed output if it was computed on this very `x` under this routing, from these
        very `tensors`, all unchanged since; else None. Either way it is dropped."""
        pending = self._routed.pop(index, None) if self._routed else None
        if pending is None or pending[0] is not x or pending[1] is not group or len(pending[2]) != len(tensors) \
                or any(a is not b for a, b in zip(pending[2], tensors)) or pending[3] != _versions(x, tensors):
            return None
        return pending[4]

    def clear(self) -> None:
        self._pending = {}
        self._routed = {}
