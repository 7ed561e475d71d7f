"""Per-sample routing (`surgery.per_sample`) for LoRA: every sample's own pair applied to the whole batch at once,
whatever the number of adapters, instead of the base running once per group of samples.

Two forms of the same sum, out + s_g · B_g(A_g(dropout(x))) for each sample of group g (none: out):

- joined: the groups' pairs side by side, A [R, in] and B [out, R] (R: the sum of the ranks). h = x @ Aᵀ gives
  every pair's h at once; a [samples, R] mask holding each sample's own scale on its pair's columns and zero on
  the others' selects it; out + (h · mask) @ Bᵀ. Three matmul-sized kernels and nothing copied per sample, but
  every token computes all R columns.
- gathered: the pairs stacked, ranks zero-padded and the scale folded into B (formula.folded_b), one zero pair
  last for the samples that take none; each sample gathers its own pair and two batched matmuls apply them. Each
  token computes one pair, but every sample copies its pair and the batched matmuls are more kernels.

In training the joined form is one autograd node (`JoinedLora`); where the base is a plain linear, one node computes
it too (`call`, the Host's `route_call`, by `GroupedJoinedLora`): dx = dy @ W + dh @ A in one update. Each pair's dB
reads only its group's rows of dy where each group's samples are consecutive, as `surgery.jobs` puts them
(`grads_b`): else every pair's product reads all of dy, the groups' times over. In inference
`call` computes the base too, with the update in the order update_first.py takes for the shape.

`joined_pays` chooses per call, by a model of the two costs. Dropout (one rate for every group) is drawn once on
x, before A, in either form; dispatch.py sends the rest (a branch with channels, rates that differ) to the Host's
per-group path.
"""
from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from surgery.plugin import group_numbers
from surgery_plugins.lora import dispatch, formula, reads, update_first

PER_SITE = 2  # GroupedJoinedLora's inputs per site: weight, bias; then its A of every group, its B of every group

# The cost model of `joined_pays`, in units of one element read from memory: a multiply-add costs 1 / INTENSITY
# (a GPU's matmul throughput over its memory bandwidth, in elements: about 400 for bf16 on an H100 or H200), and
# each kernel launch the gathered form adds (the copies and batched matmuls) LAUNCH (a few microseconds of
# host issue time, spent while the GPU idles on the small calls where routing matters most).
INTENSITY = 400.0
LAUNCH = 4 * 12e6


def joined_pays(tokens: int, samples: int, total_rank: int, rank: int, width: int) -> bool:
    """Whether the joined form is cheaper for `tokens` rows of `samples` samples: pairs of ranks summing to
    `total_rank` (the largest `rank`) between `width` = in + out features. Joined: read every pair once and
    compute all of them for every token; gathered: copy, then read, a pair per sample, compute one per token,
    and launch more kernels."""
    joined = total_rank * width * (1 + 2 * tokens / INTENSITY)
    gathered = rank * width * (3 * samples + 2 * tokens / INTENSITY) + LAUNCH
    return joined <= gathered


class Stack:
    """The groups' branches (all LoRA, one per group, none with channels), in the form each call needs, built on
    first use: kept across calls in inference (the Host keeps it until the routing changes or a pair is written in
    place), rebuilt per call while autograd records (the pairs change every step)."""

    def __init__(self, branches: list) -> None:
        self.branches = branches
        a_s, b_s = zip(*map(reads.pair, branches))  # each read once: this runs per call
        self.ranks = tuple(a.shape[0] for a in a_s)
        self.scales = tuple(float(b.scale) for b in branches)
        self.dtype, self.in_features, self.out_features = a_s[0].dtype, a_s[0].shape[1], b_s[0].shape[0]
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None
        self._joined: tuple[torch.Tensor, torch.Tensor] | None = None
        self._joins: dict[tuple[int, int], bool] = {}
        self.pairs = (*a_s, *b_s)  # every A, every B
        self.same_dtype = all(t.dtype == self.dtype for t in self.pairs)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, s·B) of every group stacked, [groups + 1, r, in] and [groups + 1, out, r], the last group zero."""
        if self._gathered is None:
            r, dtype, first = max(self.ranks), self.dtype, self.branches[0]
            a = torch.stack([F.pad(b.lora_A.to(dtype), (0, 0, 0, r - b.lora_A.shape[0])) for b in self.branches]
                            + [first.lora_A.new_zeros((r, self.in_features))])
            b = torch.stack([F.pad(formula.folded_b(b.lora_B.to(dtype), b.scale), (0, r - b.lora_B.shape[1]))
                             for b in self.branches] + [first.lora_B.new_zeros((self.out_features, r))])
            self._gathered = a, b
        return self._gathered

    def joined(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every group's A and B side by side, transposed for the matmuls: Aᵀ [in, R] and Bᵀ [R, out] (the scales
        are in the mask)."""
        if self._joined is None:
            dtype = self.dtype
            self._joined = (torch.cat([b.lora_A.to(dtype) for b in self.branches]).t(),
                            torch.cat([b.lora_B.to(dtype) for b in self.branches], dim=1).t())
        return self._joined

    def joins(self, tokens: int, samples: int) -> bool:
        """Whether this call takes the joined form (`joined_pays`, decided once per shape)."""
        key = (tokens, samples)
        found = self._joins.get(key)
        if found is None:
            found = self._joins[key] = joined_pays(tokens, samples, sum(self.ranks), max(self.ranks),
                                                   self.in_features + self.out_features)
        return found

    def rate(self) -> float:
        """The dropout rate of this call (dispatch.py routes here only when every group's is the same)."""
        return dispatch.rate(self.branches[0])


_masks: dict[int, dict] = {}  # id(group) -> {(ranks, scales, dtype, groups): mask}, dropped when the group dies


@functools.lru_cache(maxsize=256)
def _columns(ranks: tuple[int, ...], scales: tuple[float, ...], dtype: torch.dtype, groups: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column of the joined pairs, its group number and that pair's scale, on `device` (made once). The
    pairs are those of `groups` groups, in group order, repeated for each site of a routed group (routed_group.py)."""
    owner = torch.repeat_interleave(torch.arange(len(ranks)) % groups, torch.tensor(ranks))
    scale = torch.repeat_interleave(torch.tensor(scales, dtype=torch.float64), torch.tensor(ranks))
    return owner.to(device), scale.to(device, dtype)


def mask_of(ranks: tuple[int, ...], scales: tuple[float, ...], dtype: torch.dtype, groups: int,
            group: torch.Tensor) -> torch.Tensor:
    """[samples, 1, R]: sample i's scale on the columns of its group's pairs, zero elsewhere (and on every column
    for the group that takes none), for every token of the sample. Made on the group's device without waiting for
    it, and kept for as long as the `group` tensor lives (the Host keeps one per routing)."""
    masks = _masks.get(id(group))
    if masks is None:
        masks = _masks[id(group)] = {}
        weakref.finalize(group, _masks.pop, id(group), None)
    key = (ranks, scales, dtype, groups)
    found = masks.get(key)
    if found is None:
        owner, scale = _columns(*key, group.device)
        found = masks[key] = torch.where(group[:, None] == owner[None, :], scale, 0)[:, None, :]
    return found


class Rows(NamedTuple):
    """Where each group's samples lie in a batch flattened to [samples · tokens, ...] (`rows_of`): (start, stop)
    rows per group, and `block`, the rows of each where the groups are equal blocks in order covering the whole
    batch (else None): what `grads_b` reads, decided once per routing, not per call."""
    spans: tuple[tuple[int, int], ...]
    block: int | None


_rows: dict[int, dict] = {}  # id(group) -> {(groups, tokens): rows_of(...)}, dropped when the group dies


def spans_of(group: torch.Tensor, groups: int) -> tuple[tuple[int, int], ...] | None:
    """Where each of the `groups` groups' samples lie, (start, stop) per group, where each group's samples are
    consecutive (as `surgery.jobs` routes them); None where they are not, or where the engine did not make `group`
    (read from `surgery.plugin.group_numbers`, on the host)."""
    numbers = group_numbers(group)
    if numbers is None:
        return None
    starts: dict[int, int] = {}
    stops: dict[int, int] = {}
    for i, n in enumerate(numbers):
        starts.setdefault(n, i)
        stops[n] = i + 1
    if any(g not in starts or stops[g] - starts[g] != numbers.count(g) for g in range(groups)):
        return None
    return tuple((starts[g], stops[g]) for g in range(groups))


def rows_from(spans: tuple[tuple[int, int], ...], samples: int, tokens: int) -> Rows:
    """`Rows` of sample `spans` (`spans_of`) in a batch of `samples` samples of `tokens` tokens."""
    size = spans[0][1] - spans[0][0]
    equal = spans == tuple((i * size, (i + 1) * size) for i in range(len(spans))) and len(spans) * size == samples
    return Rows(tuple((start * tokens, stop * tokens) for start, stop in spans), size * tokens if equal else None)


def rows_of(group: torch.Tensor, groups: int, tokens: int) -> Rows | None:
    """`Rows` of `group`'s batch, flattened from `tokens` per sample, where each group's samples are consecutive
    (`spans_of`), else None; kept for as long as `group` lives (the Host keeps one per routing): this runs on
    every routed call."""
    kept = _rows.get(id(group))
    if kept is None:
        kept = _rows[id(group)] = {}
        weakref.finalize(group, _rows.pop, id(group), None)
    key = (groups, tokens)
    if key not in kept:
        spans = spans_of(group, groups)
        kept[key] = None if spans is None else rows_from(spans, group.shape[0], tokens)
    return kept[key]


def grads_b(dy: torch.Tensor, hs: torch.Tensor, ranks: tuple[int, ...], rows: Rows | None, needs: tuple
            ) -> list[torch.Tensor | None]:
    """dB_i = dyᵀ @ hs_i for each group's pair i ([out, r_i], B_i's layout) where needs[i]; hs [T, Σr] holds each
    group's masked h in its own columns, zero on the other groups' rows. With `rows` (`rows_of`), each product
    reads only its group's rows of dy, not all of them: as one batched product where the groups' rows are equal
    blocks covering the batch (`Rows.block`) and their ranks equal (the jobs' usual case)."""
    if rows is not None and rows.block is not None and all(needs) and len(set(ranks)) == 1:
        n, block, r = len(ranks), rows.block, ranks[0]
        own = hs.view(n, block, n, r).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # group i's rows and columns
        return list(torch.bmm(dy.view(n, block, -1).transpose(1, 2), own).unbind())
    out, col = [], 0
    for i, (r, need) in enumerate(zip(ranks, needs)):
        if need:
            part = slice(None) if rows is None else slice(*rows.spans[i])
            out.append(torch.mm(dy[part].t(), hs[part, col:col + r]))
        else:
            out.append(None)
        col += r
    return out


def mask(stack: Stack, group: torch.Tensor) -> torch.Tensor:
    """The mask of `stack`'s pairs (`mask_of`)."""
    return mask_of(stack.ranks, stack.scales, stack.dtype, len(stack.ranks), group)


def joined_h(stack: Stack, group: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The joined form's h = (x @ Aᵀ) · mask for `flat` [samples, tokens, in], and Bᵀ to apply it with."""
    a_t, b_t = stack.joined()
    return torch.matmul(flat, a_t).mul_(mask(stack, group)), b_t  # matmul keeps its inputs for backward, not h


def call(stack: Stack, group: torch.Tensor, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base linear's output and every sample's update at once, without dropout at a plain nn.Linear whose
    weight, x and pairs share one dtype, where the joined form is chosen: in training one autograd node
    (GroupedJoinedLora, the base inside), in inference the update first and the base matmul added onto it
    (update_first.py); else NotImplemented (the Host then runs the base and `output`)."""
    if type(base) is not nn.Linear or not isinstance(x, torch.Tensor):
        return NotImplemented
    weight, bias = reads.weight_bias(base)
    if not x.dtype == weight.dtype == stack.dtype or not stack.same_dtype or stack.rate() > 0 \
            or x.shape[-1] != stack.in_features:
        return NotImplemented
    samples = x.shape[0]
    flat = x if x.dim() == 3 else x.reshape(samples, -1, x.shape[-1])  # no view node where none is needed
    tokens = samples * flat.shape[1]
    if not stack.joins(tokens, samples):
        return NotImplemented
    if not torch.is_grad_enabled():
        h, b_t = joined_h(stack, group, flat)
        y = update_first.linear(flat.reshape(tokens, -1), weight, bias, h.view(tokens, -1), b_t.t())
        return y.view(*x.shape[:-1], y.shape[-1])
    y, = GroupedJoinedLora.apply(flat, mask(stack, group), ((bias is not None, stack.ranks),),
                                 rows_of(group, len(stack.ranks), flat.shape[1]), weight, bias, *stack.pairs)
    return y if flat is x else y.view(*x.shape[:-1], y.shape[-1])


def output(stack: Stack, group: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The base output `out` plus each sample's update (group[i]: sample i's group; len(branches): none). Runs on
    every call of a routed site, decoding included: what it can, it reads from `stack`, made once per routing."""
    samples = x.shape[0]
    flat = x.reshape(samples, -1, x.shape[-1])
    if flat.dtype != stack.dtype:
        flat = flat.to(stack.dtype)
    p = stack.rate()
    if p > 0:
        flat = F.dropout(flat, p, True)
    tokens = samples * flat.shape[1]
    if stack.joins(tokens, samples):
        if torch.is_grad_enabled() and out.dtype == stack.dtype and stack.same_dtype:
            return JoinedLora.apply(flat, out, mask(stack, group), stack.ranks,
                                    rows_of(group, len(stack.ranks), flat.shape[1]), *stack.pairs)
        h, b_t = joined_h(stack, group, flat)
        if out.dtype == stack.dtype:
            if not torch.is_grad_enabled() and out._base is None and out.is_contiguous():
                # inference: the base's own fresh output, updated in place (one read and write of it saved)
                out.view(tokens, -1).addmm_(h.view(tokens, -1), b_t)
                return out
            return torch.addmm(out.reshape(tokens, -1), h.view(tokens, -1), b_t).view(out.shape)
        delta = torch.matmul(h, b_t)
    else:
        a, b = stack.gathered()
        delta = torch.bmm(torch.bmm(flat, a[group].transpose(1, 2)), b[group].transpose(1, 2))
    return out + delta.reshape(out.shape).to(out.dtype)


class JoinedLora(torch.autograd.Function):
    """The joined form in training, as one autograd node: out + (x @ Aᵀ · mask) @ Bᵀ, from the groups' own A_i
    and B_i (joined inside, not recorded), with each pair's gradients computed apart: dA_i as rows of one
    dh.T @ x (kept as is, no copy), dB_i = dy.T @ hs_i each in B_i's own layout, over its group's rows
    (`grads_b`). Autograd would record ten nodes here and copy every group's dA and dB slice out of the joined
    gradients: on a step bound by the host's issue time (several small jobs), those nodes and copies are what the
    joined form costs over one adapter. Inputs: x [samples, tokens, in] (after dropout, if any), the base's output
    `out`, the [samples, 1, R] `mask`, the ranks, each group's rows (`rows_of`, or None), then every A_i and every
    B_i. Where the base is a plain linear, `GroupedJoinedLora` computes it too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, ranks: tuple[int, ...],
                rows: Rows | None, *pairs: torch.Tensor) -> torch.Tensor:
        n = len(ranks)
        a_cat, b_cat = torch.cat(pairs[:n]), torch.cat(pairs[n:], dim=1)
        x2 = x.reshape(-1, x.shape[-1])
        hs = torch.mm(x2, a_cat.t()).view(x.shape[0], -1, a_cat.shape[0]).mul_(mask).view(x2.shape[0], -1)
        ctx.save_for_backward(x2, hs, mask, a_cat, b_cat)
        ctx.ranks, ctx.rows, ctx.x_shape = ranks, rows, x.shape
        return torch.addmm(out.reshape(x2.shape[0], -1), hs, b_cat.t()).view(out.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, hs, mask, a_cat, b_cat = ctx.saved_tensors
        needs, ranks, n = ctx.needs_input_grad, ctx.ranks, len(ctx.ranks)
        dy2 = dy.reshape(x2.shape[0], -1)
        dx = d_a = None
        if needs[0] or any(needs[5:5 + n]):
            dh = torch.mm(dy2, b_cat).view(ctx.x_shape[0], -1, hs.shape[1]).mul_(mask).view(hs.shape)
            if needs[0]:
                dx = torch.mm(dh, a_cat).view(ctx.x_shape)
            if any(needs[5:5 + n]):
                d_a = torch.mm(dh.t(), x2).split(ranks)
        grads_a = [d_a[i] if needs[5 + i] else None for i in range(n)]
        return (dx, dy if needs[1] else None, None, None, None, *grads_a,
                *grads_b(dy2, hs, ranks, ctx.rows, needs[5 + n:]))


class GroupedJoinedLora(torch.autograd.Function):
    """The outputs of one or several routed LoRA linears on one input, their bases computed too (one: `call`;
    several reading one x: routed_group.py): h = x @ [A ...]ᵀ for every site's pairs in one matmul, one mask, each
    site's y_i = x @ W_iᵀ + b_i + (h · mask)_i @ B_iᵀ; in backward dx = Σ dy_i @ W_i + dh @ [A ...] in one
    buffer, every dA a row slice of one product, each dB in its own layout over its group's rows (`grads_b`).
    Inputs: x [samples, tokens, in], the mask of every site's columns [samples, 1, ΣR], the layout ((has bias,
    ranks) per site), each group's rows (`rows_of`, or None), then per site its weight, bias (or None), its A of
    every group, its B of every group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, every: torch.Tensor, layout: tuple, rows: Rows | None,
                *tensors: torch.Tensor | None) -> tuple:
        x2 = x.reshape(-1, x.shape[-1])
        weights, biases, a_s, b_cats, start = [], [], [], [], 0
        for _, ranks in layout:
            n = len(ranks)
            pairs = tensors[start + PER_SITE:start + PER_SITE + 2 * n]
            weights.append(tensors[start])
            biases.append(tensors[start + 1])
            a_s += pairs[:n]
            b_cats.append(torch.cat(pairs[n:], dim=1))
            start += PER_SITE + 2 * n
        a_all = torch.cat(a_s)
        hs = torch.mm(x2, a_all.t()).view(x.shape[0], -1, a_all.shape[0]).mul_(every).view(x2.shape[0], -1)
        outs, col = [], 0
        for w, bias, b_cat in zip(weights, biases, b_cats):
            r = b_cat.shape[1]
            out = update_first.linear(x2, w, bias, hs[:, col:col + r], b_cat)
            outs.append(out.view(*x.shape[:-1], w.shape[0]))
            col += r
        ctx.save_for_backward(x2, hs, every, a_all, *weights, *b_cats)
        ctx.layout, ctx.rows, ctx.x_shape = layout, rows, x.shape
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None):
        x2, hs, every, a_all, *rest = ctx.saved_tensors
        layout, sites = ctx.layout, len(ctx.layout)
        weights, b_cats = rest[:sites], rest[sites:]
        needs = ctx.needs_input_grad
        grads: list = []
        dx = None
        dh = hs.new_empty(hs.shape) if all(dy is not None for dy in dys) else hs.new_zeros(hs.shape)
        col, start = 0, 4  # x, every, layout, rows; then the sites' tensors
        for (has_bias, ranks), dy, w, b_cat in zip(layout, dys, weights, b_cats):
            n, width = len(ranks), sum(ranks)
            site = [None] * (PER_SITE + 2 * n)
            if dy is not None:
                dy2 = dy.reshape(x2.shape[0], -1)
                if needs[0]:
                    dx = torch.mm(dy2, w) if dx is None else dx.addmm_(dy2, w)
                dh[:, col:col + width].addmm_(dy2, b_cat, beta=0)
                if needs[start]:
                    site[0] = torch.mm(dy2.t(), x2)
                if has_bias and needs[start + 1]:
                    site[1] = dy2.sum(0)
                site[PER_SITE + n:] = grads_b(dy2, hs[:, col:col + width], ranks, ctx.rows,
                                              needs[start + PER_SITE + n:start + PER_SITE + 2 * n])
            grads.append(site)
            col += width
            start += PER_SITE + 2 * n
        dh = dh.view(ctx.x_shape[0], -1, dh.shape[1]).mul_(every).view(dh.shape)
        if needs[0]:
            dx = torch.mm(dh, a_all) if dx is None else dx.addmm_(dh, a_all)
        d_a = torch.mm(dh.t(), x2).split([r for _, ranks in layout for r in ranks])
        k, start = 0, 4
        for (_, ranks), site, dy in zip(layout, grads, dys):
            n = len(ranks)
            for j in range(n):
                if dy is not None and needs[start + PER_SITE + j]:
                    site[PER_SITE + j] = d_a[k]
                k += 1
            start += PER_SITE + 2 * n
        return (None if dx is None else dx.view(ctx.x_shape), None, None, None, *(g for site in grads for g in site))
