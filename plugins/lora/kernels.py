"""Triton kernels for the two LoRA steps that read the whole layer input: h = drop(x) @ A.T in forward, and
dA = dh.T @ drop(x) with dx += drop'(dh @ A) in backward, each in one pass over x; one for the backward step
that reads the output gradient, dh = dy @ B with dB = dy.T @ h in one pass over dy (for the groups of
shared.py); and one that builds merged weights W + s·B @ A in one pass over W (for merged_weight.py).

With dropout, every member i of a group reading one x gets its own keep mask, a pure function of (seed + i,
row, column): the forward kernel draws it, the backward kernel draws it again, so no mask and no dropped copy of
x is ever stored. The seed is a one-element tensor on the device (`new_seed`), read by the kernels there, so a step
with dropout can be captured in a CUDA graph and draws new masks at every replay. The mask uses 16-bit uniforms
from Philox-4x32 (7 rounds; 8 uniforms per draw): an element is kept when its uniform is at least
round(p * 65536), and kept values are scaled by 65536 / (65536 - that), the exact inverse of the keep
probability, so the dropout stays unbiased (its drop rate is p to within 2**-17).

The backward kernel can also read x as the product of two saved tensors (see saved_input.py), so a layer
input such as an MLP's act(gate) * up need not be kept. The kernels run where dispatch.py sends them (CUDA,
float16 and bfloat16: `KERNEL_DEVICES`, `KERNEL_DTYPES`); the functions here decide nothing. With
TRITON_INTERPRET=1 they run on the CPU too (the tests check them so against float64). Each wrapper keeps its
launch per shape (triton_launch.Launch), which launches the compiled kernel directly after the first call, with
the tiles tuned for that shape (tiles.py). Where few tiles of rows would leave most multiprocessors idle, the
forward kernel and the dy kernel cut their sums into column ranges and add the parts after (`_splits`; a tile
candidate with "waves" does): a down projection's 2048 x 28672 input is 32 tiles of 64 rows.
"""
from __future__ import annotations

import functools
import itertools
import os

import torch

from surgery_plugins.lora import tiles
from surgery_plugins.lora.triton_launch import Launch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (CPU-only torch): the dispatch takes the plain-torch paths
    triton = None

AVAILABLE = triton is not None
MAX_RANK = 128  # the largest LoRA rank the kernels take (tl.dot tiles of the padded rank)
MAX_GROUP = 3  # members per launch (backward, merged weights); larger groups take several launches
# Default tile sizes and launch shapes (the H100's fastest at rank 16), taken where no tuning runs; on a GPU each
# shape's tiles are timed once among tiles.CANDIDATES and kept. "waves": programs per multiprocessor that the
# backward kernel's row ranges, and the column ranges of the forward and dy kernels (`_splits`), are cut to.
CONFIGS = {kind: configs[0] for kind, configs in tiles.CANDIDATES.items()}
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=64)
def threshold(p: float) -> tuple[int, float]:
    """(t, scale): keep where the 16-bit uniform is >= t; kept values are multiplied by scale."""
    t = round(p * 65536)
    return t, 65536.0 / (65536 - t)


def new_seed(device: torch.device) -> torch.Tensor:
    """A seed for one call's masks: a one-element int64 tensor drawn on `device` by torch's generator there, which
    the kernels read on the device. So torch.manual_seed makes runs repeatable, nothing waits for the device, and a
    CUDA graph that captured the draw draws a new seed at every replay (torch's generator is graph-safe)."""
    return torch.randint(0, 2 ** 31 - 1, (1,), device=device)


def _seed(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`seed` as the kernels read it: a one-element int64 tensor on `device` (an int, as the tests give, is copied
    there)."""
    return seed if isinstance(seed, torch.Tensor) else torch.tensor([seed], dtype=torch.int64, device=device)


if triton is not None:

    @triton.jit
    def _keep(seed, rows, col0, K: tl.constexpr, T16: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        """[BM, BK] keep mask for rows `rows` and columns col0 .. col0 + BK (col0 a multiple of 8)."""
        groups = col0 // 8 + tl.arange(0, BK // 8)
        offsets = rows[:, None].to(tl.int64) * ((K + 7) // 8) + groups[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, offsets, 7)
        lo = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
        hi = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
        return tl.reshape(tl.join(lo, hi), [BM, BK]) >= T16

    @triton.jit
    def _mask_kernel(out_ptr, M, seed_ptr, K: tl.constexpr, T16: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
        seed = tl.load(seed_ptr)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        col0 = tl.program_id(1) * BK
        cols = col0 + tl.arange(0, BK)
        keep = _keep(seed, rows, col0, K, T16, BM, BK)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8), mask=inside)

    @triton.jit
    def _down_kernel(x_ptr, a_ptr, h_ptr, part_ptr, M, seed_ptr, SX: tl.constexpr, SH: tl.constexpr, K: tl.constexpr,
                     T16: tl.constexpr, SCALE: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr,
                     BK: tl.constexpr, KS: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr):
        """h[:, i*R:(i+1)*R] = (x * keep_i) @ A_i.T * SCALE for member i = program_id(0); with SPLIT > 1, the sum over
        columns program_id(2) * KS .. + KS only, in ACC, to part[program_id(2)] (the wrapper adds the parts)."""
        seed = tl.load(seed_ptr)
        member = tl.program_id(0)
        rows = tl.program_id(1) * BM + tl.arange(0, BM)
        rr = tl.arange(0, RP)
        acc = tl.zeros([BM, RP], ACC)
        first = tl.program_id(2) * KS
        for col0 in range(first, tl.minimum(first + KS, K), BK):
            cols = col0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rows[:, None] * SX + cols[None, :],
                        mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
            x = tl.where(_keep(seed + member, rows, col0, K, T16, BM, BK), x, 0.0)
            a = tl.load(a_ptr + (member * R + rr[:, None]) * K + cols[None, :],
                        mask=(rr[:, None] < R) & (cols[None, :] < K), other=0.0)
            acc += tl.dot(x, tl.trans(a), out_dtype=ACC)
        inside = (rows[:, None] < M) & (rr[None, :] < R)
        if SPLIT == 1:
            tl.store(h_ptr + rows[:, None] * SH + member * R + rr[None, :],
                     (acc * SCALE).to(h_ptr.dtype.element_ty), mask=inside)
        else:
            tl.store(part_ptr + (tl.program_id(2) * M + rows[:, None]) * SH + member * R + rr[None, :], acc * SCALE,
                     mask=inside)

    @triton.jit
    def _member_grads(acc, upd, x, member, rows, col0, cols, rr, dh_ptr, a_ptr, M, seed, SDH: tl.constexpr,
                      K: tl.constexpr, T16: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                      DROPOUT: tl.constexpr, UPDATE_DX: tl.constexpr, ACC: tl.constexpr):
        dh = tl.load(dh_ptr + rows[:, None] * SDH + member * R + rr[None, :],
                     mask=(rows[:, None] < M) & (rr[None, :] < R), other=0.0)
        if DROPOUT:
            keep = _keep(seed + member, rows, col0, K, T16, BM, BK)
            acc += tl.dot(tl.trans(dh), tl.where(keep, x, 0.0), out_dtype=ACC)
        else:
            acc += tl.dot(tl.trans(dh), x, out_dtype=ACC)
        if UPDATE_DX:
            a = tl.load(a_ptr + (member * R + rr[:, None]) * K + cols[None, :],
                        mask=(rr[:, None] < R) & (cols[None, :] < K), other=0.0)
            d = tl.dot(dh, a, out_dtype=ACC)
            if DROPOUT:
                d = tl.where(keep, d, 0.0)
            upd += d
        return acc, upd

    @triton.jit
    def _grads_kernel(x_ptr, y_ptr, dh_ptr, a_ptr, dx_ptr, part_ptr, M, rows_per_program, seed_ptr, SX: tl.constexpr,
                      SDH: tl.constexpr, SDX: tl.constexpr, SP: tl.constexpr, K: tl.constexpr, T16: tl.constexpr,
                      SCALE: tl.constexpr, FIRST: tl.constexpr, N: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, PRODUCT: tl.constexpr, DROPOUT: tl.constexpr,
                      UPDATE_DX: tl.constexpr, STORE_DX: tl.constexpr, ACC: tl.constexpr):
        """For columns col0 .. col0 + BK and one range of rows: partial dA_i of members FIRST .. FIRST + N - 1,
        and dx updated with their terms (STORE_DX: dx written with them, not read)."""
        if DROPOUT:
            seed = tl.load(seed_ptr)
        else:
            seed = 0
        col0 = tl.program_id(0) * BK
        group = tl.program_id(1)
        cols = col0 + tl.arange(0, BK)
        rr = tl.arange(0, RP)
        acc0 = tl.zeros([RP, BK], ACC)
        acc1 = tl.zeros([RP, BK], ACC)
        acc2 = tl.zeros([RP, BK], ACC)
        first_row = group * rows_per_program
        for start in range(first_row, first_row + rows_per_program, BM):
            rows = start + tl.arange(0, BM)
            inside = (rows[:, None] < M) & (cols[None, :] < K)
            x = tl.load(x_ptr + rows[:, None] * SX + cols[None, :], mask=inside, other=0.0)
            if PRODUCT:  # x = x * y, rounded as torch.mul rounds it
                y = tl.load(y_ptr + rows[:, None] * SX + cols[None, :], mask=inside, other=0.0)
                if x.dtype == tl.float64:
                    x = x * y
                else:
                    x = (x.to(tl.float32) * y.to(tl.float32)).to(x.dtype)
            upd = tl.zeros([BM, BK], ACC)
            acc0, upd = _member_grads(acc0, upd, x, FIRST, rows, col0, cols, rr, dh_ptr, a_ptr, M, seed, SDH, K,
                                      T16, R, BM, BK, DROPOUT, UPDATE_DX, ACC)
            if N > 1:
                acc1, upd = _member_grads(acc1, upd, x, FIRST + 1, rows, col0, cols, rr, dh_ptr, a_ptr, M, seed, SDH,
                                          K, T16, R, BM, BK, DROPOUT, UPDATE_DX, ACC)
            if N > 2:
                acc2, upd = _member_grads(acc2, upd, x, FIRST + 2, rows, col0, cols, rr, dh_ptr, a_ptr, M, seed, SDH,
                                          K, T16, R, BM, BK, DROPOUT, UPDATE_DX, ACC)
            if UPDATE_DX:
                dx_ptrs = dx_ptr + rows[:, None] * SDX + cols[None, :]
                if STORE_DX:
                    tl.store(dx_ptrs, (upd * SCALE).to(dx_ptr.dtype.element_ty), mask=inside)
                else:
                    dx = tl.load(dx_ptrs, mask=inside, other=0.0)
                    tl.store(dx_ptrs, (dx.to(ACC) + upd * SCALE).to(dx_ptr.dtype.element_ty), mask=inside)
        out = part_ptr + group * SP + rr[:, None] * K + cols[None, :]
        store_mask = (rr[:, None] < R) & (cols[None, :] < K)
        tl.store(out, acc0 * SCALE, mask=store_mask)
        if N > 1:
            tl.store(out + R * K, acc1 * SCALE, mask=store_mask)
        if N > 2:
            tl.store(out + 2 * R * K, acc2 * SCALE, mask=store_mask)

    @triton.jit
    def _merged_tile(w_ptr, a_ptr, b_ptr, out_ptr, OUT: tl.constexpr, IN: tl.constexpr, SW: tl.constexpr,
                     SCALE: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     ACC: tl.constexpr):
        """One [BM, BN] tile of W + SCALE * B @ A (A, B contiguous), written to a contiguous [OUT, IN] output."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        if tl.program_id(0) * BM < OUT:  # the grid covers the group's widest member
            cols = tl.program_id(1) * BN + tl.arange(0, BN)
            rr = tl.arange(0, RP)
            b = tl.load(b_ptr + rows[:, None] * R + rr[None, :], mask=(rows[:, None] < OUT) & (rr[None, :] < R),
                        other=0.0)
            a = tl.load(a_ptr + rr[:, None] * IN + cols[None, :], mask=(rr[:, None] < R) & (cols[None, :] < IN),
                        other=0.0)
            inside = (rows[:, None] < OUT) & (cols[None, :] < IN)
            w = tl.load(w_ptr + rows[:, None] * SW + cols[None, :], mask=inside, other=0.0)
            out = w.to(ACC) + tl.dot(b, a, out_dtype=ACC) * SCALE
            tl.store(out_ptr + rows[:, None] * IN + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _merged_kernel(w0, a0, b0, o0, w1, a1, b1, o1, w2, a2, b2, o2, IN: tl.constexpr,
                       OUT0: tl.constexpr, SW0: tl.constexpr, S0: tl.constexpr, R0: tl.constexpr, RP0: tl.constexpr,
                       OUT1: tl.constexpr, SW1: tl.constexpr, S1: tl.constexpr, R1: tl.constexpr, RP1: tl.constexpr,
                       OUT2: tl.constexpr, SW2: tl.constexpr, S2: tl.constexpr, R2: tl.constexpr, RP2: tl.constexpr,
                       N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
        """W_i + S_i * B_i @ A_i for the N (1 to 3) members of a group that read one input, member program_id(2)."""
        member = tl.program_id(2)
        if member == 0:
            _merged_tile(w0, a0, b0, o0, OUT0, IN, SW0, S0, R0, RP0, BM, BN, ACC)
        if N > 1:
            if member == 1:
                _merged_tile(w1, a1, b1, o1, OUT1, IN, SW1, S1, R1, RP1, BM, BN, ACC)
        if N > 2:
            if member == 2:
                _merged_tile(w2, a2, b2, o2, OUT2, IN, SW2, S2, R2, RP2, BM, BN, ACC)


    @triton.jit
    def _up_member(dy_ptr, b_ptr, h_ptr, dh_ptr, part_ptr, dhp_ptr, M, rows, rr, SH: tl.constexpr,
                   SDH: tl.constexpr, SP: tl.constexpr, RP: tl.constexpr, OUT: tl.constexpr, SDY: tl.constexpr,
                   COL: tl.constexpr, R: tl.constexpr, S_DH: tl.constexpr, S_DB: tl.constexpr, ROW0: tl.constexpr,
                   BN: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr, WP: tl.constexpr, ACC: tl.constexpr):
        """One member's dh rows (S_DH * dy @ B) and its partial dB over those rows (S_DB * dy.T @ h), reading the
        program's rows of dy once; with SPLIT > 1, over the program_id(2)-th of SPLIT column ranges only, its dh
        part (in ACC) to dhp[program_id(2)] (rows of WP columns; the wrapper adds the parts)."""
        inside_r = (rows[:, None] < M) & (rr[None, :] < R)
        h = tl.load(h_ptr + rows[:, None] * SH + COL + rr[None, :], mask=inside_r, other=0.0)
        dh = tl.zeros([BM, RP], ACC)
        part = part_ptr + tl.program_id(0) * SP
        width = ((OUT + SPLIT - 1) // SPLIT + BN - 1) // BN * BN  # columns per range, whole tiles
        first = tl.program_id(2) * width
        for n0 in range(first, tl.minimum(first + width, OUT), BN):
            cols = n0 + tl.arange(0, BN)
            dy = tl.load(dy_ptr + rows[:, None] * SDY + cols[None, :],
                         mask=(rows[:, None] < M) & (cols[None, :] < OUT), other=0.0)
            b = tl.load(b_ptr + cols[:, None] * R + rr[None, :], mask=(cols[:, None] < OUT) & (rr[None, :] < R),
                        other=0.0)
            dh += tl.dot(dy, b, out_dtype=ACC)
            db = tl.dot(tl.trans(dy), h, out_dtype=ACC)
            tl.store(part + (ROW0 + cols[:, None]) * RP + rr[None, :], db * S_DB, mask=cols[:, None] < OUT)
        if SPLIT == 1:
            tl.store(dh_ptr + rows[:, None] * SDH + COL + rr[None, :], (dh * S_DH).to(dh_ptr.dtype.element_ty),
                     mask=inside_r)
        else:
            tl.store(dhp_ptr + (tl.program_id(2) * M + rows[:, None]) * WP + COL + rr[None, :], dh * S_DH,
                     mask=inside_r)

    @triton.jit
    def _up_kernel(dy0, b0, dy1, b1, dy2, b2, h_ptr, dh_ptr, part_ptr, dhp_ptr, M, SH: tl.constexpr,
                   SDH: tl.constexpr, SP: tl.constexpr, RP: tl.constexpr,
                   OUT0: tl.constexpr, SDY0: tl.constexpr, COL0: tl.constexpr, R0: tl.constexpr,
                   S_DH0: tl.constexpr, S_DB0: tl.constexpr, ROW0: tl.constexpr,
                   OUT1: tl.constexpr, SDY1: tl.constexpr, COL1: tl.constexpr, R1: tl.constexpr,
                   S_DH1: tl.constexpr, S_DB1: tl.constexpr, ROW1: tl.constexpr,
                   OUT2: tl.constexpr, SDY2: tl.constexpr, COL2: tl.constexpr, R2: tl.constexpr,
                   S_DH2: tl.constexpr, S_DB2: tl.constexpr, ROW2: tl.constexpr,
                   N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, WP: tl.constexpr,
                   ACC: tl.constexpr):
        """dh and partial dB of the N (1 to 3) members of a group, member program_id(1), rows of program_id(0),
        column range program_id(2) of SPLIT."""
        member = tl.program_id(1)
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, RP)
        if member == 0:
            _up_member(dy0, b0, h_ptr, dh_ptr, part_ptr, dhp_ptr, M, rows, rr, SH, SDH, SP, RP, OUT0, SDY0, COL0, R0,
                       S_DH0, S_DB0, ROW0, BN, BM, SPLIT, WP, ACC)
        if N > 1:
            if member == 1:
                _up_member(dy1, b1, h_ptr, dh_ptr, part_ptr, dhp_ptr, M, rows, rr, SH, SDH, SP, RP, OUT1, SDY1,
                           COL1, R1, S_DH1, S_DB1, ROW1, BN, BM, SPLIT, WP, ACC)
        if N > 2:
            if member == 2:
                _up_member(dy2, b2, h_ptr, dh_ptr, part_ptr, dhp_ptr, M, rows, rr, SH, SDH, SP, RP, OUT2, SDY2,
                           COL2, R2, S_DH2, S_DB2, ROW2, BN, BM, SPLIT, WP, ACC)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _parts_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of partial sums written for inputs of `dtype` and added after a launch (as `_acc_dtype`)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _padded(rank: int) -> int:
    """The rank padded for tl.dot: a power of two, at least 16."""
    return max(16, 1 << (rank - 1).bit_length())


def _grads_grid(m: int, k: int, device: torch.device, bm: int, bk: int, waves: int) -> tuple[int, int, int]:
    """(column blocks, row ranges, rows per range) of the backward kernel's grid for an [m, k] input."""
    col_blocks = _cdiv(k, bk)
    wanted = max(1, waves * _processors(device) // col_blocks)
    rows_per_program = _cdiv(_cdiv(m, wanted), bm) * bm
    return col_blocks, _cdiv(m, rows_per_program), rows_per_program


def keep_mask(rows: int, cols: int, seed: int | torch.Tensor, p: float, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """The [rows, cols] keep mask (bool) of member 0 of a call with `seed` and dropout `p` (member i: seed + i)."""
    out = torch.empty(rows, cols, dtype=torch.int8, device=device)
    grid = (_cdiv(rows, 32), _cdiv(cols, 32))
    _mask_kernel[grid](out, rows, _seed(seed, out.device), K=cols, T16=threshold(p)[0], BM=32, BK=32)
    return out.bool()


def dropped_down(x: torch.Tensor, a: torch.Tensor, members: int, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    """h = [drop_1(x) @ A_1.T | drop_2(x) @ A_2.T | ...] for x [M, K] and A = [A_1; A_2; ...] (equal ranks)."""
    m, k = x.shape
    x, a = _last_contiguous(x), a.contiguous()
    launch = _down_launch(x.dtype, m, k, x.stride(0), members, a.shape[0] // members, p, x.device)
    return _run_down(launch, x, a, _seed(seed, x.device))


def _run_down(launch: Launch, x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Runs `_down_kernel`'s launch; where it splits the columns, adds its parts (in float32, float64 for float64)."""
    m, split = x.shape[0], launch.constants["SPLIT"]
    if split == 1:
        h = x.new_empty(m, a.shape[0])
        launch(x, a, h, h, m, seed)
        return h
    part = torch.empty(split, m, a.shape[0], dtype=_parts_dtype(x.dtype), device=x.device)
    launch(x, a, part, part, m, seed)  # h is not written where the columns are cut
    return torch.sum(part, 0).to(x.dtype)


def _splits(programs: int, cols: int, bk: int, waves: int, device: torch.device) -> int:
    """Into how many column ranges a kernel of `programs` programs over `cols` columns in blocks of `bk` cuts its
    sums, for `waves` programs per multiprocessor (0: none): few rows leave most multiprocessors idle otherwise (a
    down projection's 2048 x 28672 input is 32 programs of 64 rows on 132 of them). Each range keeps 4 blocks at
    least, so that its part is worth the reading."""
    if not waves:
        return 1
    return max(1, min(waves * _processors(device) // programs, cols // (4 * bk)))


def _config(kind: str, key: tuple, device: torch.device, trial) -> dict:
    """The tiles of `kind` for a call of shape `key` on `device`: tuned there once (tiles.py), else the default."""
    if not tiles.enabled(device):
        return CONFIGS[kind]
    return tiles.choose(kind, key, trial, tiles.cache_file(device))


def _scratch(m: int, stride: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A random [m, cols] tensor with row stride `stride`, for timing a kernel on the shape of a call."""
    return torch.randn(m, max(stride, cols), dtype=dtype, device=device)[:, :cols]


@functools.lru_cache(maxsize=256)
def _down_launch(dtype: torch.dtype, m: int, k: int, sx: int, members: int, r: int, p: float,
                 device: torch.device) -> Launch:
    """`_down_kernel`'s launch for an [m, k] input with row stride sx, its tiles chosen for the shape, cached."""
    def trial(c: dict):
        x, a = _scratch(m, sx, k, dtype, device), torch.randn(members * r, k, dtype=dtype, device=device)
        launch, seed = _down_launch_with(c, dtype, m, k, sx, members, r, p, device), _seed(1, device)
        return lambda: _run_down(launch, x, a, seed)
    c = _config("down", (dtype, m, k, sx, members, r, p), device, trial)
    return _down_launch_with(c, dtype, m, k, sx, members, r, p, device)


def _down_launch_with(c: dict, dtype: torch.dtype, m: int, k: int, sx: int, members: int, r: int, p: float,
                      device: torch.device) -> Launch:
    t16, scale = threshold(p)
    rows = _cdiv(m, c["BM"])
    split = _splits(members * rows, k, c["BK"], c.get("waves", 0), device)
    ks = _cdiv(_cdiv(k, split), c["BK"]) * c["BK"]  # columns per range, whole blocks
    split = _cdiv(k, ks)  # ranges of whole blocks: may be fewer than asked
    return Launch(_down_kernel, (members, rows, split), dict(
        SX=sx, SH=members * r, K=k, T16=t16, SCALE=scale, R=r, RP=_padded(r), BM=c["BM"], BK=c["BK"], KS=ks,
        SPLIT=split, ACC=_acc_dtype(dtype), num_warps=c["num_warps"], num_stages=c["num_stages"]))


def input_grads(x: tuple[torch.Tensor, ...], dh: torch.Tensor, a: torch.Tensor, members: int, p: float,
                seed: int | torch.Tensor, dx: torch.Tensor | None, store: bool = False) -> torch.Tensor:
    """dA = [dh_i.T @ drop_i(x)]_i (float32, or float64 for float64 input), and, if dx is given, in place
    dx += Σ_i drop_i'(dh_i @ A_i) (with `store`, dx = that sum: dx is written, not read). `x` is (x,) or (u, v)
    for x = u * v; dh [M, members * r] may be a column view, as may dx [M, K]. p = 0 means no dropout."""
    first = x[0]
    m, k = first.shape
    r = a.shape[0] // members
    x = tuple(_last_contiguous(t) for t in x)
    if len(x) == 2 and x[0].stride() != x[1].stride():
        x = tuple(t.contiguous() for t in x)
    dh, a = _last_contiguous(dh), a.contiguous()
    launches, groups, rows_per_program = _grads_launches(first.dtype, m, k, first.device, x[0].stride(0), dh.stride(0),
                                                         dx.stride(0) if dx is not None else None, members, r, p,
                                                         len(x) == 2, store and dx is not None)
    seed = _seed(seed, first.device) if p > 0 else first  # without dropout the kernel reads no seed: any pointer
    return _run_grads(launches, groups, rows_per_program, x, dh, a, dx, members, r, seed).sum(0)


def _run_grads(launches: list[Launch], groups: int, rows_per_program: int, x: tuple[torch.Tensor, ...],
               dh: torch.Tensor, a: torch.Tensor, dx: torch.Tensor | None, members: int, r: int,
               seed: torch.Tensor) -> torch.Tensor:
    """Runs `_grads_kernel`'s launches; returns the partial dA per row range [groups, members * r, k]."""
    m, k = x[0].shape
    part = torch.empty(groups, members * r, k, dtype=_parts_dtype(x[0].dtype), device=x[0].device)
    for lo, launch in zip(range(0, members, MAX_GROUP), launches):
        launch(x[0], x[-1], dh, a, dx if dx is not None else x[0], part[:, lo * r:] if lo else part, m,
               rows_per_program, seed)
    return part


@functools.lru_cache(maxsize=256)
def _grads_launches(dtype: torch.dtype, m: int, k: int, device: torch.device, sx: int, sdh: int, sdx: int | None,
                    members: int, r: int, p: float, product: bool, store: bool = False
                    ) -> tuple[list[Launch], int, int]:
    """`_grads_kernel`'s launches (one per MAX_GROUP members), row ranges and rows per range, their tiles chosen
    for the shape, cached."""
    args = (dtype, m, k, device, sx, sdh, sdx, members, r, p, product, store)

    def trial(c: dict):
        x = tuple(_scratch(m, sx, k, dtype, device) for _ in range(2 if product else 1))
        dh, a = _scratch(m, sdh, members * r, dtype, device), torch.randn(members * r, k, dtype=dtype, device=device)
        dx = _scratch(m, sdx, k, dtype, device) if sdx is not None else None
        launches, groups, rows = _grads_launches_with(c, *args)
        seed = _seed(1, device)
        return lambda: _run_grads(launches, groups, rows, x, dh, a, dx, members, r, seed)
    # `store` joins the key only where set, so that the tiles cached for the adding kernel keep their keys
    c = _config("grads", (dtype, m, k, sx, sdh, sdx, members, r, p, product) + ((True,) if store else ()), device,
                trial)
    return _grads_launches_with(c, *args)


def _grads_launches_with(c: dict, dtype: torch.dtype, m: int, k: int, device: torch.device, sx: int, sdh: int,
                         sdx: int | None, members: int, r: int, p: float,
                         product: bool, store: bool = False) -> tuple[list[Launch], int, int]:
    col_blocks, groups, rows_per_program = _grads_grid(m, k, device, c["BM"], c["BK"], c["waves"])
    t16, scale = threshold(p)
    launches = [Launch(_grads_kernel, (col_blocks, groups), dict(
        SX=sx, SDH=sdh, SDX=sdx or 0, SP=members * r * k, K=k, T16=t16, SCALE=scale, FIRST=lo,
        N=min(MAX_GROUP, members - lo), R=r, RP=_padded(r), BM=c["BM"], BK=c["BK"], PRODUCT=product, DROPOUT=p > 0,
        UPDATE_DX=sdx is not None, STORE_DX=store and lo == 0, ACC=_acc_dtype(dtype), num_warps=c["num_warps"],
        num_stages=c["num_stages"]))
        for lo in range(0, members, MAX_GROUP)]  # with `store`, the first launch writes dx and the others add
    return launches, groups, rows_per_program


def up_grads(dys: list[torch.Tensor], b_s: list[torch.Tensor], h: torch.Tensor, cols: list[int], dh: torch.Tensor,
             dh_scales: list[float], db_scales: list[float]) -> list[torch.Tensor]:
    """For members i reading one input, with h [M, Σ r_i] (member i's columns from cols[i]): writes
    dh[:, cols_i:cols_i + r_i] = dh_scale_i * dy_i @ B_i in place and returns dB_i = db_scale_i * dy_i.T @ h_i,
    reading each dy_i [M, out_i] once, where torch takes two skinny matmuls that each read it. Each program
    takes BM rows of every dy_i and writes its part of dB, summed over the row bands in float32 (float64 for
    float64) after the launch. On the H100 this pays for a group (q/k/v, gate/up) at rank 16, not at rank 64, where
    the float32 parts of dB cost more than the second read of dy they save (shared._one_pass), nor for a single
    linear, where the two cuBLAS calls cost the GPU as little and the host less."""
    if len(dys) > MAX_GROUP:
        return [db for lo in range(0, len(dys), MAX_GROUP) for db in
                up_grads(dys[lo:lo + MAX_GROUP], b_s[lo:lo + MAX_GROUP], h, cols[lo:lo + MAX_GROUP], dh,
                         dh_scales[lo:lo + MAX_GROUP], db_scales[lo:lo + MAX_GROUP])]
    dys, b_s = [_last_contiguous(dy) for dy in dys], [b.contiguous() for b in b_s]
    h = _last_contiguous(h)
    m = h.shape[0]
    members = [(dy.shape[1], dy.stride(0), col, b.shape[1]) for dy, b, col in zip(dys, b_s, cols)]
    launch, rows = _up_launch(h.dtype, h.device, m, h.stride(0), dh.stride(0), tuple(dh_scales), tuple(db_scales),
                              *members)
    d_b = _run_up(launch, rows, dys, b_s, h, dh).sum(0).to(h.dtype).split([b.shape[0] for b in b_s])
    return [db if db.shape[1] == b.shape[1] else db[:, :b.shape[1]] for db, b in zip(d_b, b_s)]


def _run_up(launch: Launch, rows: int, dys: list[torch.Tensor], b_s: list[torch.Tensor], h: torch.Tensor,
            dh: torch.Tensor) -> torch.Tensor:
    """Runs `_up_kernel`'s launch; returns the partial dB per row band [bands, rows, padded rank]. Where the launch
    splits the columns, dh's parts are added here and written into each member's columns."""
    acc = _parts_dtype(h.dtype)
    part = torch.empty(launch.grid[0], rows, launch.constants["RP"], dtype=acc, device=h.device)
    split, m = launch.constants["SPLIT"], h.shape[0]
    dh_part = torch.empty(split, m, launch.constants["WP"], dtype=acc, device=h.device) if split > 1 else dh
    launch(*_slots(dys, b_s), h, dh, part, dh_part, m)
    if split > 1:
        summed = torch.sum(dh_part, 0)
        spans = [(launch.constants[f"COL{i}"], launch.constants[f"R{i}"]) for i in range(len(dys))]
        if all(c + r == nxt for (c, r), (nxt, _) in itertools.pairwise(spans)):  # adjacent columns: one copy
            spans = [(spans[0][0], sum(r for _, r in spans))]
        for col, r in spans:
            dh[:, col:col + r].copy_(summed[:, col:col + r])
    return part


@functools.lru_cache(maxsize=256)
def _up_launch(dtype: torch.dtype, device: torch.device, m: int, sh: int, sdh: int, dh_scales: tuple[float, ...],
               db_scales: tuple[float, ...], *members: tuple) -> tuple[Launch, int]:
    """`_up_kernel`'s launch and partial-dB rows for members (out, row stride of dy, column of h, rank), its tiles
    chosen for the shape, cached like `_merged_launch`."""
    def trial(c: dict):
        dys = [_scratch(m, sdy, out, dtype, device) for out, sdy, _, _ in members]
        b_s = [torch.randn(out, r, dtype=dtype, device=device) for out, _, _, r in members]
        width = max(col + r for _, _, col, r in members)
        h, dh = _scratch(m, sh, width, dtype, device), _scratch(m, sdh, width, dtype, device)
        launch, rows = _up_launch_with(c, dtype, device, m, sh, sdh, dh_scales, db_scales, *members)
        return lambda: _run_up(launch, rows, dys, b_s, h, dh)
    c = _config("up", (dtype, m, sh, sdh, *members), device, trial)
    return _up_launch_with(c, dtype, device, m, sh, sdh, dh_scales, db_scales, *members)


def _up_launch_with(c: dict, dtype: torch.dtype, device: torch.device, m: int, sh: int, sdh: int,
                    dh_scales: tuple[float, ...], db_scales: tuple[float, ...], *members: tuple) -> tuple[Launch, int]:
    consts = {"SH": sh, "SDH": sdh, "RP": _padded(max(r for *_, r in members)), "N": len(members), "BM": c["BM"],
              "BN": c["BN"], "ACC": _acc_dtype(dtype), "num_warps": c["num_warps"], "num_stages": c["num_stages"]}
    row = 0
    for i in range(MAX_GROUP):
        j = min(i, len(members) - 1)
        out, sdy, col, r = members[j]
        consts.update({f"OUT{i}": out, f"SDY{i}": sdy, f"COL{i}": col, f"R{i}": r, f"S_DH{i}": dh_scales[j],
                       f"S_DB{i}": db_scales[j], f"ROW{i}": row if i == j else consts[f"ROW{j}"]})
        row += out if i == j else 0
    bands = _cdiv(m, c["BM"])
    split = _splits(bands * len(members), max(out for out, *_ in members), c["BN"], c.get("waves", 0), device)
    consts.update(SP=row * consts["RP"], SPLIT=split, WP=max(col + r for _, _, col, r in members))
    return Launch(_up_kernel, (bands, len(members), split), consts), row


def merged_weights(ws: list[torch.Tensor], a_s: list[torch.Tensor], b_s: list[torch.Tensor],
                   scales: list[float]) -> list[torch.Tensor]:
    """[W_i + scale_i * B_i @ A_i] for weights W_i [out_i, in] (one in for all), A_i [r_i, in], B_i [out_i, r_i]:
    one pass over each W_i, and one launch per MAX_GROUP members (torch.addmm would copy each W_i into its output
    first, then read and write it again, in a launch of its own)."""
    if len(ws) > MAX_GROUP:
        return [out for lo in range(0, len(ws), MAX_GROUP) for out in
                merged_weights(ws[lo:lo + MAX_GROUP], a_s[lo:lo + MAX_GROUP], b_s[lo:lo + MAX_GROUP],
                               scales[lo:lo + MAX_GROUP])]
    a_s, b_s = [a.contiguous() for a in a_s], [b.contiguous() for b in b_s]
    ws = [_last_contiguous(w) for w in ws]
    launch = _merged_launch(ws[0].dtype, ws[0].device, tuple(scales),
                            *[(w.shape, w.stride(0), a.shape[0]) for w, a in zip(ws, a_s)])
    outs = [torch.empty(w.shape, dtype=w.dtype, device=w.device) for w in ws]
    launch(*_slots(ws, a_s, b_s, outs))
    return outs


@functools.lru_cache(maxsize=256)
def _merged_launch(dtype: torch.dtype, device: torch.device, scales: tuple[float, ...], *members: tuple) -> Launch:
    """`_merged_kernel`'s launch for members (shape, row stride of W, rank), its tiles chosen for the shape, cached:
    this runs on every call, and the host's time per call is what the eager step is short of."""
    def trial(c: dict):
        ws = [_scratch(shape[0], sw, shape[1], dtype, device) for shape, sw, _ in members]
        a_s = [torch.randn(r, shape[1], dtype=dtype, device=device) for shape, _, r in members]
        b_s = [torch.randn(shape[0], r, dtype=dtype, device=device) for shape, _, r in members]
        outs = [torch.empty(shape, dtype=dtype, device=device) for shape, _, _ in members]
        launch = _merged_launch_with(c, dtype, scales, *members)
        return lambda: launch(*_slots(ws, a_s, b_s, outs))
    c = _config("merged", (dtype, *members), device, trial)
    return _merged_launch_with(c, dtype, scales, *members)


def _merged_launch_with(c: dict, dtype: torch.dtype, scales: tuple[float, ...], *members: tuple) -> Launch:
    consts = {"IN": members[0][0][1], "N": len(members), "BM": c["BM"], "BN": c["BN"], "ACC": _acc_dtype(dtype),
              "num_warps": c["num_warps"], "num_stages": c["num_stages"]}
    for i in range(MAX_GROUP):
        j = min(i, len(members) - 1)
        (out_f, _), sw, r = members[j]
        consts.update({f"OUT{i}": out_f, f"SW{i}": sw, f"S{i}": scales[j], f"R{i}": r, f"RP{i}": _padded(r)})
    rows = max(shape[0] for shape, _, _ in members)
    return Launch(_merged_kernel, (_cdiv(rows, c["BM"]), _cdiv(consts["IN"], c["BN"]), len(members)), consts)


def clear_launches() -> None:
    """Forget the cached launches (after a change to CONFIGS: the tile-size benchmarks do that)."""
    for cached in (_down_launch, _grads_launches, _up_launch, _merged_launch):
        cached.cache_clear()


def _slots(*per_member: list) -> list:
    """A group kernel's MAX_GROUP member slots as its argument list: each member's tensors in order, the unused
    slots repeating the last member (the kernel's N says how many run)."""
    slots = list(zip(*per_member))
    slots += slots[-1:] * (MAX_GROUP - len(slots))
    return [t for slot in slots for t in slot]


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
