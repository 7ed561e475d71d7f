"""LoRA dropout inside a CUDA graph: a step of the fused linear, or of a whole model, captured with dropout, draws new
masks at every replay, and each replay's gradients are those of the formula with the mask its forward drew. Two
paths: the Triton kernels (bf16; the seed is a tensor on the device, `kernels.new_seed`) and torch's dropout (fp32,
where the kernels do not serve; in a capture its mask is kept for backward). Skipped without CUDA and Triton."""
from __future__ import annotations

import pytest
import torch

from surgery_plugins.lora import dispatch, formula, kernels
from tests.lora_layers import layers

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.AVAILABLE),
                                reason="CUDA graphs and the LoRA kernels need a CUDA device and Triton")

IN, OUT, R, S = 64, 48, 8, 0.5


def rand(*shape, g, dtype, grad=False):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to("cuda", dtype).requires_grad_(grad)


def captured(fn):
    """fn() captured in a CUDA graph after a warm-up on a side stream (kernel tuning, cached launches): the graph
    and fn's outputs, which every replay rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


def step_of(branch, base, x, a, b, dy):
    def step():
        y = dispatch.forward(branch, base, (x,), {})
        return (y, *torch.autograd.grad(y, (x, a, b), dy))
    return step


def want(x, w, bias, a, b, dy, mask):
    """y and the gradients of x, A, B by autograd over formula.linear in float64, with dropout `mask` (scaled)."""
    x, a, b = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    y = formula.linear(x, w.double(), bias.double(), a, b, S, mask)
    return (y, *torch.autograd.grad(y, (x, a, b), dy.double()))


def close(got, wanted, rtol):
    for g, w in zip(got, wanted):
        assert (g.double() - w).norm() <= rtol * w.norm(), (g.double() - w).norm() / w.norm()


def test_the_kernels_dropout_in_a_graph_draws_new_masks_each_replay(monkeypatch):
    seeds = []
    draw = kernels.new_seed
    monkeypatch.setattr(kernels, "new_seed", lambda device: seeds.append(draw(device)) or seeds[-1])
    g, p, dtype = torch.Generator().manual_seed(5), 0.25, torch.bfloat16
    w, bias = rand(OUT, IN, g=g, dtype=dtype), rand(OUT, g=g, dtype=dtype)
    a, b, x = rand(R, IN, g=g, dtype=dtype, grad=True), rand(OUT, R, g=g, dtype=dtype, grad=True), \
        rand(3, 40, IN, g=g, dtype=dtype, grad=True)
    dy = rand(3, 40, OUT, g=g, dtype=dtype)
    (branch, base), = layers((S,), p, w, bias, a, b)
    path = dispatch.choose(branch, base, x)
    assert path.kind == dispatch.FUSED and path.kernels and path.p == p
    graph, outs = captured(step_of(branch, base, x, a, b, dy))
    drawn = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seed = int(seeds[-1])  # the captured draw's tensor, rewritten by each replay
        drawn.append(seed)
        mask = kernels.keep_mask(120, IN, seed, p, "cuda").double().view(3, 40, IN) * kernels.threshold(p)[1]
        close(outs, want(x, w, bias, a, b, dy, mask), rtol=2e-2)
    assert len(set(drawn)) == 3


def test_torchs_dropout_in_a_graph_keeps_its_mask_for_backward():
    """fp32, A square: the dropped input the forward used is read back from its output (h = drop(x) @ Aᵀ, y - base =
    s · h @ Bᵀ), and backward's gradients must be the formula's with that very mask."""
    g, p, dtype, width = torch.Generator().manual_seed(6), 0.5, torch.float32, 8
    w, bias = rand(OUT, width, g=g, dtype=dtype), rand(OUT, g=g, dtype=dtype)
    a, b = rand(width, width, g=g, dtype=dtype, grad=True), rand(OUT, width, g=g, dtype=dtype, grad=True)
    x = rand(3, 40, width, g=g, dtype=dtype)
    x = (x.sign() * (0.5 + x.abs())).requires_grad_(True)  # away from 0: each element's mask reads back surely
    dy = rand(3, 40, OUT, g=g, dtype=dtype)
    (branch, base), = layers((S,), p, w, bias, a, b)
    path = dispatch.choose(branch, base, x)
    assert path.kind == dispatch.FUSED and not path.kernels and path.p == p
    graph, outs = captured(step_of(branch, base, x, a, b, dy))
    masks = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        update = (outs[0].double() - formula.linear(x.double(), w.double(), bias.double(), a.double(),
                                                    b.double(), 0.0)) / S
        h = torch.linalg.lstsq(b.double(), update.reshape(-1, OUT).T).solution.T
        dropped = torch.linalg.solve(a.double(), h.T).T.view(3, 40, width)
        kept = (dropped - x.double() / (1 - p)).abs() < dropped.abs()  # nearer x / (1 - p) than 0
        assert ((dropped - torch.where(kept, x.double() / (1 - p), 0.0)).abs() < 1e-3).all()
        mask = kept.double() / (1 - p)
        masks.append(mask)
        close(outs, want(x, w, bias, a, b, dy, mask), rtol=1e-4)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


def test_a_whole_model_step_with_lora_dropout_is_captured():
    """Every LoRA path of a bf16 model in training (the q/k/v and gate/up groups, the single linears), with
    dropout, in one graph: each replay's gradients differ (new masks) and are finite."""
    import surgery
    from surgery import tiny
    from tests.conftest import ids

    model = tiny.build("llama").to("cuda", torch.bfloat16).train()
    surgery.attach(model, surgery.RuleSet(name="d", rules=[surgery.Rule(
        select=surgery.Selector(kinds=["linear"]), exclude=surgery.Selector(roles=["lm_head"]), method="lora",
        params={"r": 8, "dropout": 0.2})]), name="a")
    params = surgery.adapter_parameters(model, "a")
    with torch.no_grad():
        for q in params:
            q.normal_(std=0.1)
    tokens = ids().cuda()

    def step():
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        return torch.autograd.grad(loss, params)
    graph, grads = captured(step)
    seen = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.isfinite(d).all() for d in grads)
        seen.append(torch.cat([d.flatten().float() for d in grads]).clone())
    assert not torch.equal(seen[0], seen[1])
