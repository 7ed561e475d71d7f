"""LoRA on linears that read one input (q/k/v of an attention, gate/up of an MLP), computed together.

For members i with frozen-or-not weights W_i, biases b_i and LoRA pairs (A_i, B_i, scale s_i), one autograd
function computes every y_i = x @ W_i.T + b_i + x @ A_i.T @ B_i.T * s_i at once:

- forward: one matmul h = x @ [A_1; A_2; ...].T for all branches, then each
  y_i = [x | h] @ [W_i | 0 .. s_i B_i .. 0].T: the LoRA update rides along in the base matmul instead of a
  separate read and write of y_i;
- backward: [dx | dh] = Σ_i dy_i @ [W_i | 0 .. s_i B_i .. 0], one buffer accumulated in place, so dh comes out
  of the base matmuls and the members' input gradients need no separate sum; then dA = dh.T @ x and
  dx += dh @ [A_1; A_2; ...] once for all branches; dB_i = s_i dy_i.T @ h_i. The returned input gradient is a
  column view of the [dx | dh] buffer.

With dropout (CUDA, equal ranks: the kernels of lora_kernels), every member keeps its own mask: h comes from
one kernel that drops x per member on the fly, and dA with the masked dx update from one kernel in backward,
which draws the masks again; elsewhere a group with dropout declines and its branches compute one by one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from surgery_plugins import lora_kernels


PER_MEMBER = 4  # weight, bias, A, B


def _scaled_blocks(b_s: tuple[torch.Tensor, ...], scales: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
    """block_diag(s_1 B_1, s_2 B_2, ...): row block i, columns [start_i, start_i + r_i) hold s_i B_i."""
    if len(set(scales)) == 1:
        return torch.block_diag(*b_s).to(dtype).mul_(scales[0])
    return torch.block_diag(*(b * s for b, s in zip(b_s, scales))).to(dtype)


class SharedInputLora(torch.autograd.Function):
    """Outputs of several LoRA-adapted linears on one input, dropout `p` (> 0: kernels only); see the module
    docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scales: tuple[float, ...], p: float, *members: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        weights, biases, a_s, b_s = (members[k::PER_MEMBER] for k in range(PER_MEMBER))
        x2 = x.reshape(-1, x.shape[-1])
        a_cat = torch.cat(a_s)
        ctx.p, ctx.seed = p, lora_kernels.new_seed() if p > 0 else 0
        h = lora_kernels.dropped_down(x2, a_cat, len(a_s), p, ctx.seed) if p > 0 else x2 @ a_cat.t()
        blocks = _scaled_blocks(b_s, scales, x.dtype)  # [Σ out_i, Σ r_i]
        x_ext = torch.cat([x2, h], dim=1)
        outs, row = [], 0
        for w, bias in zip(weights, biases):
            w_ext = torch.cat([w, blocks[row:row + w.shape[0]]], dim=1)  # [W_i | 0 .. s_i B_i .. 0]
            outs.append(F.linear(x_ext, w_ext, bias).view(*x.shape[:-1], w.shape[0]))
            row += w.shape[0]
        ctx.save_for_backward(x, h, a_cat, blocks, *weights, *b_s)
        ctx.scales, ctx.ranks = scales, [a.shape[0] for a in a_s]
        ctx.has_bias = [b is not None for b in biases]
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *dys: torch.Tensor | None):
        x, h, a_cat, blocks, *rest = ctx.saved_tensors
        weights, b_s = rest[:len(dys)], rest[len(dys):]
        needs = ctx.needs_input_grad[:2] + ctx.needs_input_grad[3:]  # x, scales, then 4 per member
        x2 = x.reshape(-1, x.shape[-1])
        d_in = x2.shape[1]
        grads: list[torch.Tensor | None] = [None] * (PER_MEMBER * len(dys))
        ext, row, col = None, 0, 0  # [dx | dh]
        for i, (dy, w, r) in enumerate(zip(dys, weights, ctx.ranks)):
            out, base = w.shape[0], PER_MEMBER * i
            if dy is not None:
                dy2 = dy.reshape(-1, out)
                w_ext = torch.cat([w, blocks[row:row + out]], dim=1)
                ext = dy2 @ w_ext if ext is None else ext.addmm_(dy2, w_ext)
                if needs[2 + base]:
                    grads[base] = dy2.t() @ x2
                if needs[3 + base] and ctx.has_bias[i]:
                    grads[base + 1] = dy2.sum(0)
                if needs[5 + base]:
                    grads[base + 3] = torch.addmm(b_s[i], dy2.t(), h[:, col:col + r], beta=0, alpha=ctx.scales[i])
            row, col = row + out, col + r
        if ext is None:
            return (None, None, None, *grads)
        dx = ext[:, :d_in]
        if ctx.p > 0:  # dA and the masked dx update in one kernel, which draws the forward's masks again
            da = lora_kernels.input_grads((x2,), ext[:, d_in:], a_cat, len(ctx.ranks), ctx.p, ctx.seed,
                                          dx if needs[0] else None).to(a_cat.dtype)
            _split_a_grads(grads, da, ctx.ranks, needs, dys)
            return (dx.view(x.shape) if needs[0] else None, None, None, *grads)
        dh = ext[:, d_in:].clone()
        if any(needs[4::PER_MEMBER]):
            _split_a_grads(grads, dh.t() @ x2, ctx.ranks, needs, dys)
        if not needs[0]:
            return (None, None, None, *grads)
        dx.addmm_(dh, a_cat)
        return (dx.view(x.shape), None, None, *grads)


def _split_a_grads(grads: list, da: torch.Tensor, ranks: list[int], needs: tuple, dys: tuple) -> None:
    """Hand each member that needs it its rows of dA (none to a member whose output had no gradient)."""
    col = 0
    for i, r in enumerate(ranks):
        if needs[4 + PER_MEMBER * i] and dys[i] is not None:
            grads[PER_MEMBER * i + 2] = da[col:col + r]
        col += r


def _version(t: torch.Tensor | None) -> int:
    return -1 if t is None or t.is_inference() else t._version


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
        self._pending: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] = {}  # index -> (x, key, output)

    def _tensors(self, index: int) -> tuple:
        branch = self.members[index]
        base = branch.base_module
        return base.weight, base.bias, branch.lora_A, branch.lora_B

    def _key(self, x: torch.Tensor, tensors: tuple) -> tuple:
        return (_version(x), torch.is_grad_enabled(), *(_version(t) for t in tensors))

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | Any:
        """Member `index`'s output for input `x`, or NotImplemented where the shared path does not apply."""
        pending = self._pending.pop(index, None)
        if pending is not None and pending[0] is x and pending[1] == self._key(x, self._tensors(index)):
            return pending[2]
        live = [i for i, b in enumerate(self.members) if b.runs_alone and type(b.base_module) is torch.nn.Linear
                and b.base_module.weight.dtype == x.dtype == b.lora_A.dtype and b.base_module.in_features == x.shape[-1]]
        if index not in live or len(live) < 2:
            return NotImplemented
        per_member = [self._tensors(i) for i in live]
        branches = [self.members[i] for i in live]
        rates = {b.dropout.p if b.training and isinstance(b.dropout, torch.nn.Dropout) else 0.0 for b in branches}
        ranks = {b.lora_A.shape[0] for b in branches}
        p = rates.pop()
        if rates or p > 0 and (len(ranks) > 1 or not lora_kernels.usable(x, ranks.pop())):
            return NotImplemented
        outs = SharedInputLora.apply(x, tuple(b.scale for b in branches), p, *(t for ts in per_member for t in ts))
        self._pending = {i: (x, self._key(x, ts), out) for i, ts, out in zip(live, per_member, outs) if i != index}
        return outs[live.index(index)]

    def clear(self) -> None:
        self._pending = {}
