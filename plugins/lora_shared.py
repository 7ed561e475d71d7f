"""LoRA on linears that read one input (q/k/v of an attention, gate/up of an MLP), computed together.

For members i with frozen-or-not weights W_i, biases b_i and LoRA pairs (A_i, B_i, scale s_i), one autograd
function computes every y_i = x @ W_i.T + b_i + x @ A_i.T @ B_i.T * s_i at once:

- forward: one matmul h = x @ [A_1; A_2; ...].T for all branches, scaled in place (hs_i = s_i h_i); then a
  member wider out than in (an MLP's gate/up) takes its update inside the base matmul,
  y_i = [x | hs] @ [W_i | 0 .. B_i .. 0].T, instead of a separate read and write of its wide y_i, and the
  others (q/k/v) add it after, y_i = x @ W_i.T + hs_i @ B_i.T (see `_outputs`);
- backward: dx = Σ_i dy_i @ W_i accumulated in place (only where x needs a gradient), and each member's
  columns of dh, dh_i = s_i dy_i @ B_i; then dA = dh.T @ x and dx += dh @ [A_1; A_2; ...] once for all branches;
  dB_i = dy_i.T @ hs_i. On CUDA one kernel computes every member's dh_i and dB_i in one pass over its dy_i
  (lora_kernels.up_grads), where torch takes two skinny matmuls per member that each read dy_i. (Widening the
  dx matmuls to [dx | dh] instead cost the H100 more than the skinny dh matmuls: cuBLAS runs the widened shapes
  slower, and the widened weights had to be copied again.)

Without dropout, from as many tokens as inputs on CUDA (lora_merged_weight), the forward instead computes
y_i = x @ (W_i + s_i B_i @ A_i).T from merged weights built per call, and h only in backward, where the
gradients need it; the backward is the same. (dx there stays Σ dy_i @ W_i + dh @ A: building the merged
weights again would cost the host more ops than the one update of dx it saves.)

With dropout (CUDA, equal ranks: the kernels of lora_kernels), every member keeps its own mask: h comes from
one kernel that drops x per member on the fly, and dA with the masked dx update from one kernel in backward,
which draws the masks again; elsewhere a group with dropout declines and its branches compute one by one.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from surgery_plugins import lora_kernels
from surgery_plugins.lora_merged_weight import merged_all, pays

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


def _update_inside(w: torch.Tensor) -> bool:
    """Whether a member with weight `w` takes its LoRA term inside the base matmul (wider out than in)."""
    return w.shape[0] > w.shape[1]


def _outputs(x: torch.Tensor, hs: torch.Tensor, weights: tuple, biases: tuple, b_s: tuple) -> list[torch.Tensor]:
    """y_i = x @ W_i.T + b_i + hs_i @ B_i.T for every member (hs: h with each member's scale).

    A member wider out than in takes its LoRA term inside the base matmul, y_i = [x | hs] @ [W_i | 0 .. B_i .. 0].T,
    instead of updating y_i after it: on the H100 that costs an MLP's gate/up pair 0.59 ms against 0.76 ms
    (batch 8 x 1024, 2048 -> 5632), while for q/k/v the two cost the same and the update needs fewer ops."""
    x2 = x.reshape(-1, x.shape[-1])
    x_ext = torch.cat([x2, hs], dim=1) if any(map(_update_inside, weights)) else None
    outs, col, width = [], 0, hs.shape[1]
    for w, bias, b in zip(weights, biases, b_s):
        out, r = b.shape
        if _update_inside(w):
            w_ext = torch.cat([w, _zeros(out, col, w.dtype, w.device), b,
                               _zeros(out, width - col - r, w.dtype, w.device)], dim=1)  # the zero blocks are cached
            y = F.linear(x_ext, w_ext, bias)
        else:
            y = F.linear(x2, w, bias).addmm_(hs[:, col:col + r], b.t())
        outs.append(y.view(*x.shape[:-1], out))
        col += r
    return outs


def shared_outputs(x: torch.Tensor, scales: tuple[float, ...], p: float, *members: torch.Tensor | None
                   ) -> tuple[torch.Tensor, ...]:
    """`SharedInputLora`'s outputs. Where autograd records nothing and there is no dropout (inference) they are
    computed by the same plain ops, without the autograd function's per-call cost."""
    if p > 0 or torch.is_grad_enabled():
        return SharedInputLora.apply(x, scales, p, *members)
    weights, biases, a_s, b_s = (members[k::PER_MEMBER] for k in range(PER_MEMBER))
    if _merged_pays(x, weights):
        return tuple(_merged_outputs(x, scales, weights, biases, a_s, b_s, one_pass=True))
    hs = _scaled(x.reshape(-1, x.shape[-1]) @ torch.cat(a_s).t(), scales, [a.shape[0] for a in a_s])
    return tuple(_outputs(x, hs, weights, biases, b_s))


def _merged_pays(x: torch.Tensor, weights: tuple) -> bool:
    tokens = x.numel() // x.shape[-1]
    return all(pays(tokens, w) for w in weights)


def _merged_outputs(x: torch.Tensor, scales: tuple[float, ...], weights: tuple, biases: tuple, a_s: tuple,
                    b_s: tuple, one_pass: bool) -> list[torch.Tensor]:
    """y_i = x @ (W_i + s_i B_i @ A_i).T + b_i for every member (see lora_merged_weight)."""
    return [F.linear(x, w, bias) for w, bias in zip(merged_all(weights, a_s, b_s, scales, one_pass), biases)]


class SharedInputLora(torch.autograd.Function):
    """Outputs of several LoRA-adapted linears on one input, dropout `p` (> 0: kernels only); see the module
    docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scales: tuple[float, ...], p: float, *members: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        weights, biases, a_s, b_s = (members[k::PER_MEMBER] for k in range(PER_MEMBER))
        ctx.ranks = [a.shape[0] for a in a_s]
        ctx.p, ctx.seed = p, lora_kernels.new_seed() if p > 0 else 0
        ctx.merged = p == 0 and _merged_pays(x, weights)
        if ctx.merged:  # h is only needed for the gradients: computed in backward, off the forward's host time
            outs = _merged_outputs(x, scales, weights, biases, a_s, b_s, one_pass=False)
            ctx.save_for_backward(x, None, *weights, *b_s, *a_s)
        else:
            x2, a_cat = x.reshape(-1, x.shape[-1]), torch.cat(a_s)
            h = lora_kernels.dropped_down(x2, a_cat, len(a_s), p, ctx.seed) if p > 0 else x2 @ a_cat.t()
            hs = _scaled(h, scales, ctx.ranks)
            outs = _outputs(x, hs, weights, biases, b_s)
            ctx.save_for_backward(x, hs, *weights, *b_s, a_cat)
        ctx.scales = scales
        ctx.has_bias = [b is not None for b in biases]
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *dys: torch.Tensor | None):
        x, hs, *rest = ctx.saved_tensors
        n = len(dys)
        weights, b_s = rest[:n], rest[n:2 * n]
        a_cat = torch.cat(rest[2 * n:]) if ctx.merged else rest[2 * n]
        needs = ctx.needs_input_grad[:2] + ctx.needs_input_grad[3:]  # x, scales, then 4 per member
        if all(dy is None for dy in dys):
            return (None, None, None, *[None] * (PER_MEMBER * len(dys)))
        x2 = x.reshape(-1, x.shape[-1])
        if hs is None:  # merged forward
            hs = _scaled(x2 @ a_cat.t(), ctx.scales, ctx.ranks)
        grads: list[torch.Tensor | None] = [None] * (PER_MEMBER * len(dys))
        dx = None
        dh = hs.new_empty(hs.shape) if all(dy is not None for dy in dys) else hs.new_zeros(hs.shape)
        one_pass = lora_kernels.usable(x, max(ctx.ranks))  # dh_i and dB_i in one pass over each dy_i
        cols = [sum(ctx.ranks[:i]) for i in range(n)]
        present: list[tuple[int, torch.Tensor]] = []
        for i, (dy, w, b, r, col) in enumerate(zip(dys, weights, b_s, ctx.ranks, cols)):
            if dy is None:
                continue
            base, dy2 = PER_MEMBER * i, dy.reshape(-1, w.shape[0])
            present.append((i, dy2))
            if needs[0]:
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
            d_b = lora_kernels.up_grads([dy2 for _, dy2 in present], [b_s[i] for i, _ in present], hs,
                                        [cols[i] for i, _ in present], dh, [ctx.scales[i] for i, _ in present],
                                        [1.0] * len(present))
            for (i, _), db in zip(present, d_b):
                if needs[5 + PER_MEMBER * i]:
                    grads[PER_MEMBER * i + 3] = db
        if ctx.p > 0:  # dA and the masked dx update in one kernel, which draws the forward's masks again
            da = lora_kernels.input_grads((x2,), dh, a_cat, len(ctx.ranks), ctx.p, ctx.seed, dx).to(a_cat.dtype)
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
    still valid while these are equal, since counters only grow. Inference tensors have no counter (None)."""
    try:
        return (torch.is_grad_enabled(), x._version, *[t._version for t in tensors if t is not None])
    except RuntimeError:
        return (torch.is_grad_enabled(), *[None if t.is_inference() else t._version for t in (x, *tensors)
                                           if t is not None])


class SharedInput:
    """The LoRA branches of one attachment at sites that read one input (`Site.input_group`).

    The first member called with an input computes every member's output in one `SharedInputLora`; each other
    member takes its own when called with that same tensor, unchanged (version counters of the input and of
    the member's weight, bias, A and B) and in the same grad mode. Only members that run alone at their sites
    (`Branch.runs_alone`) take part; anything else (a member at a non-linear or other-dtype base, dropout in
    training where the kernels do not serve, compile) declines, and the branch computes by itself.
    """

    def __init__(self, members: list[Any]):
        self.members = members  # LoraBranch objects, each with its site's module as `base_module`
        self._pending: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] = {}  # index -> (x, versions, output)

    def _tensors(self, index: int) -> tuple:
        branch = self.members[index]
        base = branch.base_module
        return base.weight, base.bias, branch.lora_A, branch.lora_B

    def _live(self, x: torch.Tensor) -> list[tuple[int, Any, tuple]]:
        """(index, branch, its tensors) of the members that can compute together on `x`."""
        live = []
        for i, branch in enumerate(self.members):
            base = branch.base_module
            if branch.runs_alone and type(base) is torch.nn.Linear and base.in_features == x.shape[-1]:
                tensors = self._tensors(i)
                if tensors[0].dtype == x.dtype == tensors[2].dtype == tensors[3].dtype:
                    live.append((i, branch, tensors))
        return live

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | Any:
        """Member `index`'s output for input `x`, or NotImplemented where the shared path does not apply."""
        pending = self._pending.pop(index, None)
        if pending is not None and pending[0] is x and pending[1] == _versions(x, self._tensors(index)):
            return pending[2]
        live = self._live(x)
        position = next((n for n, (i, _, _) in enumerate(live) if i == index), None)
        if position is None or len(live) < 2:
            return NotImplemented
        rates = {b.dropout.p if b.training and isinstance(b.dropout, torch.nn.Dropout) else 0.0 for _, b, _ in live}
        ranks = {ts[2].shape[0] for _, _, ts in live}
        p = rates.pop()
        if rates or p > 0 and (len(ranks) > 1 or not lora_kernels.usable(x, ranks.pop())):
            return NotImplemented
        outs = shared_outputs(x, tuple(b.scale for _, b, _ in live), p, *(t for _, _, ts in live for t in ts))
        self._pending = {i: (x, _versions(x, ts), out) for (i, _, ts), out in zip(live, outs) if i != index}
        return outs[position]

    def clear(self) -> None:
        self._pending = {}
