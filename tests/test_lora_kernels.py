"""LoRA's Triton kernels (dropout masks drawn twice, never stored; inputs kept as factors) against the float64
formula, on the CPU through Triton's interpreter, or on CUDA in bfloat16 against a float64 reference."""
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from surgery_plugins.lora import dispatch, formula, kernels, update_first  # noqa: E402
from surgery_plugins.lora.dispatch import kept  # noqa: E402
from surgery_plugins.lora.fused import LoraLinear  # noqa: E402
from surgery_plugins.lora.shared import ONE_PASS_RANK, SharedInputLora  # noqa: E402
from tests.lora_layers import lora_linear, shared_outputs  # noqa: E402

DRAW_SEED = kernels.new_seed
ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETING
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float64


@pytest.fixture
def kernels_here(monkeypatch):
    """Let the kernels serve this test's device and dtype (on the CPU: interpreted, float64)."""
    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", {DEVICE})
    monkeypatch.setattr(dispatch, "KERNEL_DTYPES", {DTYPE})
    monkeypatch.setattr(kernels, "new_seed", lambda device: 20261122)


@pytest.fixture
def up_launches(monkeypatch):
    """The member count of each `up_grads` call (dh and dB in one pass over dy)."""
    launches = []
    real = kernels.up_grads
    monkeypatch.setattr(kernels, "up_grads", lambda dys, *rest: launches.append(len(dys)) or real(dys, *rest))
    return launches


def rand(*shape, g, grad=False):
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, DTYPE)
    return t.requires_grad_(grad)


def close(got, want):
    """float64 on the CPU: to 1e-12; bfloat16 on CUDA: ‖got - want‖ / ‖want‖ under 1e-2."""
    if not ON_GPU:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        return
    error = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert error < 1e-2, f"relative error {error:.2e}"


def masks(rows, cols, seed, p, n):
    """Member i's mask as the float64 multiplier of the formula: keep / keep probability."""
    return [kernels.keep_mask(rows, cols, seed + i, p, DEVICE).double() * kernels.threshold(p)[1] for i in range(n)]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masks_keep_at_the_rate_asked_and_differ_between_members_and_seeds(p):
    rows, cols = 200, 136  # 136: not a multiple of the tile
    m0, again, m1 = (kernels.keep_mask(rows, cols, s, p, DEVICE) for s in (7, 7, 8))
    assert torch.equal(m0, again)
    rate, sigma = m0.double().mean().item(), (p * (1 - p) / m0.numel()) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma
    assert abs((m0 != m1).double().mean().item() - 2 * p * (1 - p)) < 5 * sigma  # independent, not equal
    assert kernels.keep_mask(rows, cols, 7, 0.0, DEVICE).all()
    t, scale = kernels.threshold(0.05)
    assert t == 3277 and abs((1 - t / 65536) * scale - 1) < 1e-15  # unbiased: scale is 1 / keep probability


@pytest.mark.parametrize("members", [1, 3])
def test_dropped_down_matches_formula(members):
    g = torch.Generator().manual_seed(1)
    rows, cols, r, p, seed = 70, 90, 5, 0.3, 99
    wide = rand(rows, cols + 7, g=g)
    x = wide[:, 3:3 + cols]  # a strided view, as a layer input may be
    a = rand(members * r, cols, g=g)
    h = kernels.dropped_down(x, a, members, p, seed)
    ms = masks(rows, cols, seed, p, members)
    want = torch.cat([(x.double() * ms[i]) @ a[i * r:(i + 1) * r].double().T for i in range(members)], dim=1)
    close(h, want)


@pytest.mark.parametrize("members", [1, 2, 3, 4])  # 4: two launches
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("update_dx", [False, True, "store"])  # store: dx written with the LoRA term, not read
def test_input_grads_match_formula(members, p, product, update_dx):
    g = torch.Generator().manual_seed(2)
    rows, cols, r, seed = 90, 70, 3, 5
    u, v = rand(rows, cols, g=g), rand(rows, cols, g=g)
    x = u * v
    a = rand(members * r, cols, g=g)
    buf = rand(rows, cols + members * r, g=g)  # [dx | dh], as the shared function holds them
    dx, dh = buf[:, :cols], buf[:, cols:]
    dx_before = dx.double().clone()
    da = kernels.input_grads((u, v) if product else (x,), dh, a, members, p, seed, dx if update_dx else None,
                             update_dx == "store")
    ones = torch.ones(rows, cols, dtype=torch.float64, device=DEVICE)
    ms = masks(rows, cols, seed, p, members) if p else [ones] * members
    dhs = [dh[:, i * r:(i + 1) * r].double() for i in range(members)]
    close(da, torch.cat([dhs[i].T @ (x.double() * ms[i]) for i in range(members)]))
    term = sum((dhs[i] @ a[i * r:(i + 1) * r].double()) * ms[i] for i in range(members))
    close(dx, term if update_dx == "store" else dx_before + term if update_dx else dx_before)


def lora_formula(x, w, bias, a, b, scale, mask):
    return formula.linear(x, w, bias, a, b, scale, mask)


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("out_features", [12, 4])  # 4: wider in than out
@pytest.mark.parametrize("merged", [False, True])  # dx through the merged weight, where p = 0
@pytest.mark.parametrize("first", [False, True])  # dx: the kernel writes the LoRA term, the base matmul adds onto it
def test_fused_linear_on_kernels_matches_formula_and_keeps_no_copy_of_a_product_input(monkeypatch, kernels_here,
                                                                                      frozen, p, out_features, merged,
                                                                                      first):
    monkeypatch.setattr(dispatch, "MERGED_DEVICES", {DEVICE} if merged else set())
    stores = []
    if first:
        monkeypatch.setattr(update_first, "FIRST_OUT", 0)
        monkeypatch.setattr(update_first, "FIRST_ELEMENTS", 0)
        real = kernels.input_grads
        monkeypatch.setattr(kernels, "input_grads", lambda *args: stores.append(args[-1]) or real(*args))
    g = torch.Generator().manual_seed(3)
    gate, up = rand(4, 5, 16, g=g, grad=True), rand(4, 5, 16, g=g, grad=True)  # 20 tokens >= 16 inputs
    w, bias = rand(out_features, 16, g=g, grad=not frozen), rand(out_features, g=g, grad=not frozen)
    a, b = rand(4, 16, g=g, grad=True), rand(out_features, 4, g=g, grad=True)
    x = F.silu(gate) * up  # as an MLP feeds its down projection
    assert len(kept(x)) == 2
    out = lora_linear(x, w, bias, a, b, 0.7, p)
    gone = weakref.ref(x)
    del x
    gc.collect()
    assert gone() is None, "the layer input must not be kept alive: its factors are"
    mask = masks(20, 16, 20261122, p, 1)[0].view(4, 5, 16) if p else 1.0
    leaves = [t for t in (gate, up, w, bias, a, b) if t.requires_grad]
    dy = rand(*out.shape, g=g)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (gate, up, w, bias, a, b)]
    rg, ru, *params = ref_leaves
    want = lora_formula(F.silu(rg) * ru, *params, 0.7, mask)
    close(out, want)
    want_grads = torch.autograd.grad(want, [t for t in ref_leaves if t.requires_grad], dy.double())
    for got, ref in zip(grads, want_grads):
        close(got, ref)
    # the kernel wrote dx where dx was left to it: not merged, not from one [dy | dh] matmul (p = 0, wide in)
    assert stores == ([] if not first else [not (p == 0 and (merged or out_features == 4))])


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("unused", [None, 1])  # a member whose output takes no part in the loss
@pytest.mark.parametrize("p, merged", [(0.3, False), (0.0, False), (0.0, True)])  # merged: a device that would merge
@pytest.mark.parametrize("rank", [4, 20])  # 20: dh and dB by two matmuls, not the one-pass kernel
def test_shared_function_on_kernels_matches_formula_with_one_mask_per_member(monkeypatch, kernels_here, up_launches,
                                                                            frozen, unused, p, merged, rank):
    monkeypatch.setattr(dispatch, "MERGED_DEVICES", {DEVICE} if merged else set())
    g = torch.Generator().manual_seed(4)
    x = rand(3, 6, 16, g=g, grad=True)  # 18 tokens >= 16 inputs
    tensors, outs_r = [], [24, 6, 6]  # 24 > 16 in: the LoRA term inside the base matmul
    for out in outs_r:
        tensors += [rand(out, 16, g=g, grad=not frozen), rand(out, g=g, grad=not frozen),
                    rand(rank, 16, g=g, grad=True), rand(out, rank, g=g, grad=True)]
    scales = (0.7, 2.0, 1.5)
    outs = shared_outputs(x, scales, p, *tensors)
    used = [i for i in range(3) if i != unused]
    leaves = [t for t in (x, *tensors) if t.requires_grad]
    dys = [rand(*o.shape, g=g) for o in outs]
    grads = torch.autograd.grad([outs[i] for i in used], leaves, [dys[i] for i in used], allow_unused=True)
    ms = [m.view(3, 6, 16) for m in masks(18, 16, 20261122, p, 3)] if p else [1.0] * 3
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, *tensors)]
    want = [lora_formula(ref[0], *ref[1 + 4 * i:5 + 4 * i], scales[i], ms[i]) for i in range(3)]
    for got, w in zip(outs, want):
        close(got, w)
    want_grads = torch.autograd.grad([want[i] for i in used], [t for t in ref if t.requires_grad],
                                     [dys[i].double() for i in used], allow_unused=True)
    for got, w in zip(grads, want_grads):
        assert (got is None) == (w is None), "a member without output gradient gets no gradient"
        if w is not None:
            close(got, w)
    if rank <= ONE_PASS_RANK:
        assert up_launches == [len(used)], "one pass over the output gradients that exist"
    else:
        assert up_launches == [], "two matmuls per output gradient above the one pass's rank"


def test_a_product_input_is_kept_as_itself_where_its_factors_are_not_plain():
    g = torch.Generator().manual_seed(5)
    u = torch.randn(4, 8, generator=g, requires_grad=True)
    assert len(kept(u * torch.randn(4, 8, generator=g))) == 1  # one factor not saved by autograd
    assert len(kept(u * torch.randn(8, generator=g, requires_grad=True))) == 1  # broadcast
    assert len(kept((u * u).mul_(2))) == 1  # changed in place since
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing or offloading
        assert len(kept(u * u)) == 1
    assert len(kept(u * u)) == 2


@pytest.mark.skipif(ON_GPU, reason="a float64 model on the CPU: the kernels serve it through the interpreter only")
def test_training_steps_on_kernels(monkeypatch, kernels_here):
    """Without dropout the step (down projections' dA from the factors of their input) matches the plain
    composition; with dropout q/k/v and gate/up run together, each with its own masks, repeatably under
    torch.manual_seed."""
    import surgery
    from surgery import tiny
    from tests.conftest import ids

    calls = []
    real_shared, real_single = SharedInputLora.apply, LoraLinear.apply
    monkeypatch.setattr(SharedInputLora, "apply", lambda *a: calls.append(("shared", a[2].p)) or real_shared(*a))
    monkeypatch.setattr(LoraLinear, "apply", lambda *a: calls.append(("single", a[6].p)) or real_single(*a))

    monkeypatch.setattr(kernels, "new_seed", DRAW_SEED)  # masks from torch's generator, as in use

    def step(dropout, fused=True, seed=0):
        torch.manual_seed(0)
        model = tiny.build("llama", dtype=torch.float64).train()
        surgery.attach(model, surgery.RuleSet(name="d", rules=[surgery.Rule(
            select=surgery.Selector(kinds=["linear"]), exclude=surgery.Selector(roles=["lm_head"]),
            method="lora", params={"r": 4, "dropout": dropout})]), name="a")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
        with monkeypatch.context() as m:
            if not fused:
                m.setattr("surgery_plugins.lora.branches.LoraBranch.fused_call", lambda *a: NotImplemented)
            x = ids()
            torch.manual_seed(seed)
            model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast, plain = step(0.0), step(0.0, fused=False)
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-10, atol=1e-12)
    calls.clear()
    first, again, other = step(0.2), step(0.2), step(0.2, seed=1)
    assert calls[:4] == [("shared", 0.2), ("single", 0.2), ("shared", 0.2), ("single", 0.2)]
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first if "lora_A" in n)


@pytest.mark.parametrize("members", [1, 3, 4])  # 4: two launches
def test_up_grads_match_formula(members):
    """dh_i = t_i dy_i @ B_i written into member i's columns of dh, and dB_i = u_i dy_i.T @ h_i, for a group on one
    input: unequal widths (tile remainders, a member narrower than a tile) and ranks, row-strided dy and h (views
    of wider tensors), more rows than one band."""
    g = torch.Generator().manual_seed(8)
    rows = 300
    shapes = [(70, 5, 0.5, 1.0), (130, 16, 2.0, 3.0), (12, 3, 1.5, 0.25), (33, 8, 0.7, 2.0)][:members]
    cols = [sum(r for _, r, _, _ in shapes[:i]) for i in range(members)]
    width = sum(r for _, r, _, _ in shapes)
    h = rand(rows, width + 5, g=g)[:, 2:2 + width]
    dys = [rand(rows, out + 3, g=g)[:, 1:1 + out] for out, _, _, _ in shapes]
    b_s = [rand(out, r, g=g) for out, r, _, _ in shapes]
    dh = torch.full((rows, width), float("nan"), dtype=DTYPE, device=DEVICE)
    got = kernels.up_grads(dys, b_s, h, cols, dh, [t for *_, t, _ in shapes], [u for *_, u in shapes])
    for i, (out, r, t, u) in enumerate(shapes):
        close(dh[:, cols[i]:cols[i] + r], t * dys[i].double() @ b_s[i].double())
        assert got[i].shape == b_s[i].shape and got[i].dtype == DTYPE
        close(got[i], u * dys[i].double().T @ h[:, cols[i]:cols[i] + r].double())


@pytest.mark.parametrize("members", [1, 3, 4])  # 4: two launches
def test_merged_weights_match_formula(members):
    """W_i + s_i B_i @ A_i for a group of weights on one input: unequal widths (tile remainders, a member narrower
    than the grid), ranks below and at 16, a row-strided W (a slice of a fused weight)."""
    g = torch.Generator().manual_seed(6)
    in_f = 136
    shapes = [(70, 5, 0.7), (130, 16, 2.0), (12, 4, 1.5), (33, 8, 0.5)][:members]
    wide = [rand(out_f, in_f + 3, g=g) for out_f, _, _ in shapes]
    ws = [t[:, 1:1 + in_f] for t in wide]
    a_s = [rand(r, in_f, g=g) for _, r, _ in shapes]
    b_s = [rand(out_f, r, g=g) for out_f, r, _ in shapes]
    before = [t.clone() for t in wide]
    got = kernels.merged_weights(ws, a_s, b_s, [s for _, _, s in shapes])
    assert all(torch.equal(t, u) for t, u in zip(wide, before)), "the weights are read, not written"
    for out, w, a, b, (_, _, s) in zip(got, ws, a_s, b_s, shapes):
        assert out.shape == w.shape and out.is_contiguous()
        close(out, w.double() + s * b.double() @ a.double())


def test_inference_builds_merged_weights_with_the_kernel(monkeypatch, kernels_here):
    """Without autograd, from as many tokens as inputs, the fused and shared outputs come through merged weights
    built by the kernel (one launch for the group), and equal the formula."""
    monkeypatch.setattr(dispatch, "MERGED_DEVICES", {DEVICE})
    launches = []
    real = kernels.merged_weights
    monkeypatch.setattr(kernels, "merged_weights", lambda ws, *rest: launches.append(len(ws)) or real(ws, *rest))
    g = torch.Generator().manual_seed(7)
    x = rand(4, 6, 16, g=g)  # 24 tokens >= 16 inputs
    members = []
    for out, r in ((12, 4), (24, 4), (6, 2)):
        members += [rand(out, 16, g=g), rand(out, g=g), rand(r, 16, g=g), rand(out, r, g=g)]
    scales = (0.7, 2.0, 1.5)
    with torch.no_grad():
        single = lora_linear(x, *members[:4], 0.7, 0.0)
        shared = shared_outputs(x, scales, 0.0, *members)
    assert launches == [1, 3]
    close(single, lora_formula(x.double(), *(t.double() for t in members[:4]), 0.7, 1.0))
    for i, got in enumerate(shared):
        close(got, lora_formula(x.double(), *(t.double() for t in members[4 * i:4 * i + 4]), scales[i], 1.0))
