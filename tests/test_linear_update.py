"""A base linear and its LoRA update in one call (plugins/lora/linear_update.py): the kernel against the float64
formula (on the CPU through Triton's interpreter; on CUDA in bfloat16, no less accurate than cuBLAS then
addmm_), the choice kept per shape, and the paths that use it (unmerged inference, shared members, routed
batches) against each sample alone."""
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import surgery
from surgery_plugins.lora import dispatch, kernels, linear_update, routed_group, tiles
from tests.lora_layers import lora_linear, shared_outputs
from tests.test_routed_group import model_with_jobs

SMALL = {"BM": 16, "BN": 32, "BK": 16, "num_warps": 4, "num_stages": 2, "GROUP_M": 2}
ON_GPU = torch.cuda.is_available() and not kernels.INTERPRETING


def formula(x, w, bias, h, b, s):
    return F.linear(x, w, bias) + s * h @ b.t()


@pytest.fixture
def kernel_chosen(monkeypatch, tmp_path):
    """The kernels serve the CPU in float64 (interpreted), and every shape's choice is the kernel with SMALL
    tiles; returns the keys that were chosen for."""
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", {"cpu"})
    monkeypatch.setattr(dispatch, "KERNEL_DTYPES", {torch.float64})
    monkeypatch.setattr(tiles, "enabled", lambda device: True)
    monkeypatch.setattr(tiles, "cache_file", lambda device: tmp_path / "tiles.json")
    keys, launched = [], []
    monkeypatch.setattr(tiles, "choose", lambda kind, key, trial, file, timer=None: keys.append(key) or SMALL)
    real = kernels.linear_update
    monkeypatch.setattr(kernels, "linear_update", lambda *a: launched.append(a[0].shape) or real(*a))
    return keys, launched


@pytest.mark.parametrize("config", [SMALL] + tiles.CANDIDATES["update"][1:], ids=lambda c: "x".join(
    str(c[k]) for k in ("BM", "BN", "BK")))
@pytest.mark.parametrize("shape", [(70, 96, 80, 16, True, 0.5), (64, 64, 64, 8, False, 1.0),
                                   (33, 100, 130, 24, True, 2.0)], ids=["tails", "even", "odd-k"])
def test_kernel_matches_float64_formula(config, shape):
    if ON_GPU:
        pytest.skip("the float64 check runs through the interpreter (the GPU test below checks bfloat16)")
    m, k, n, r, has_bias, s = shape
    g = torch.Generator().manual_seed(m)
    x, w, b = (torch.randn(*size, generator=g, dtype=torch.float64) for size in ((m, k), (n, k), (n, r)))
    hs = torch.randn(m, r + 8, generator=g, dtype=torch.float64)
    h = hs[:, 4:4 + r]  # a column slice of a wider h, as the joined forms pass it
    bias = torch.randn(n, generator=g, dtype=torch.float64) if has_bias else None
    got = kernels.linear_update(x, w, bias, h, b, s, config)
    torch.testing.assert_close(got, formula(x, w, bias, h, b, s), rtol=1e-12, atol=1e-12)


def test_the_faster_way_is_kept_per_bucket_of_tokens(monkeypatch, tmp_path):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    monkeypatch.setattr(tiles, "enabled", lambda device: True)
    monkeypatch.setattr(tiles, "cache_file", lambda device: tmp_path / "tiles.json")
    tiles.forget()
    timed = []

    def timer(fn):  # the kernel with SMALL's tiles is "fastest"; every candidate still runs once
        before = len(ran)
        fn()
        timed.append(1)
        return 0.0 if len(ran) > before else 1.0
    ran = []
    real_choose, real_kernel = tiles.choose, kernels.linear_update
    monkeypatch.setitem(tiles.CANDIDATES, "update", [{"cublas": True}, SMALL])
    monkeypatch.setattr(tiles, "choose", lambda kind, key, trial, file: real_choose(kind, key, trial, file, timer))
    monkeypatch.setattr(kernels, "linear_update", lambda *a: ran.append("kernel") or real_kernel(*a))
    g = torch.Generator().manual_seed(0)
    w, b, bias = (torch.randn(*size, generator=g, dtype=torch.float64) for size in ((24, 32), (24, 4), (24,)))
    try:
        for tokens, timings in ((40, 2), (60, 0), (64, 0), (65, 2)):  # buckets 64, 64, 64, 128
            x, h = torch.randn(tokens, 32, generator=g, dtype=torch.float64), torch.randn(tokens, 4, generator=g,
                                                                                         dtype=torch.float64)
            before, ran[:] = len(timed), []
            got = linear_update.linear_update(x, w, bias, h, b, 0.5, True)
            assert len(timed) - before == timings and ran and ran[-1] == "kernel"
            torch.testing.assert_close(got, formula(x, w, bias, h, b, 0.5), rtol=1e-12, atol=1e-12)
    finally:
        tiles.forget()


def test_cublas_where_the_kernel_does_not_serve(kernel_chosen):
    keys, launched = kernel_chosen
    g = torch.Generator().manual_seed(1)
    x, w, h, b = (torch.randn(*size, generator=g, dtype=torch.float64) for size in ((8, 16), (12, 16), (8, 4), (12, 4)))
    for args, serve in (((x, w, None, h, b, 2.0), False),  # the caller's dispatch says no
                        ((x, w.t().contiguous().t(), None, h, b, 2.0), True),  # a strided weight
                        ((x, w, None, h.t().contiguous().t(), b, 2.0), True)):  # h with columns strided
        got = linear_update.linear_update(*args, serve)
        torch.testing.assert_close(got, formula(*args[:4], args[4], 2.0), rtol=1e-12, atol=1e-12)
    assert keys == [] and launched == []


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_unmerged_and_shared_inference_take_the_kernel(kernel_chosen, mode):
    _, launched = kernel_chosen
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)  # 10 tokens < 16 in: unmerged
    members = []
    for out, r in ((12, 4), (8, 3)):
        members += [torch.randn(*size, generator=g, dtype=torch.float64) for size in ((out, 16), (out,), (r, 16), (out, r))]
    with mode():
        single = lora_linear(x, *members[:4], 0.7, 0.0)
        shared = shared_outputs(x, (0.7, 2.0), 0.0, *members)
    assert len(launched) == 3
    want = [formula(x, *members[4 * i:4 * i + 2], x @ members[4 * i + 2].t(), members[4 * i + 3], s)
            for i, s in ((0, 0.7), (1, 2.0))]
    torch.testing.assert_close(single, want[0], rtol=1e-12, atol=1e-12)
    for got, w in zip(shared, want):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)


def test_training_forward_takes_the_kernel_and_keeps_its_gradients(kernel_chosen):
    _, launched = kernel_chosen
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w, bias, a, b = (torch.randn(*size, generator=g, dtype=torch.float64, requires_grad=True)
                     for size in ((10, 16), (10,), (4, 16), (10, 4)))
    y = lora_linear(x, w, bias, a, b, 0.5, 0.0)
    assert launched, "the fused linear's forward did not take the kernel"
    want = formula(x, w, bias, x @ a.t(), b, 0.5)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, w, bias, a, b), dy)
    for gg, ww in zip(got, torch.autograd.grad(want, (x, w, bias, a, b), dy)):
        torch.testing.assert_close(gg, ww, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grouped", [True, False])
def test_routed_inference_takes_the_kernel_and_equals_each_sample_alone(kernel_chosen, monkeypatch, grouped):
    """A mixed batch in inference: q/k/v together (grouped) or every site alone (routes.call), each site's
    base matmul and update in the kernel; each sample as computed alone on its own adapter (the kernel off)."""
    _, launched = kernel_chosen
    if grouped:
        monkeypatch.setattr(routed_group, "INFERENCE_ELEMENTS", 1)
    model = model_with_jobs().eval()
    names = ["c", None, "a", "b"]
    ids = torch.randint(1, 100, (len(names), 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with surgery.per_sample(model, names):
            got = model(input_ids=ids, use_cache=False).logits
        routed_sites = sum(1 for m in model.modules() if type(m) is torch.nn.Linear) - 1  # all but the head
        assert len(launched) == routed_sites
        monkeypatch.setattr(dispatch, "KERNEL_DEVICES", set())
        for i, name in enumerate(names):
            surgery.set_active(model, [name] if name else [])
            alone = model(input_ids=ids[i:i + 1], use_cache=False).logits
            torch.testing.assert_close(got[i:i + 1], alone, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4096, 2048, 2048, 128), (1000, 1536, 8960, 64), (300, 4096, 1024, 16)])
def test_bfloat16_kernel_is_no_less_accurate_than_cublas(shape):
    m, k, n, r = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    h = (torch.randn(m, r, device="cuda", generator=g)).bfloat16()
    b = (torch.randn(n, r, device="cuda", generator=g) * 0.05).bfloat16()
    bias = torch.randn(n, device="cuda", generator=g).bfloat16()
    want = formula(*(t.double() for t in (x, w, bias, h, b)), 0.5)
    error = {}
    for name, y in (("cublas", F.linear(x, w, bias).addmm_(h, b.t(), alpha=0.5)),
                    *((f"kernel {i}", kernels.linear_update(x, w, bias, h, b, 0.5, c))
                      for i, c in enumerate(tiles.CANDIDATES["update"][1:]))):
        error[name] = ((y.double() - want).norm() / want.norm()).item()
    assert all(e <= error["cublas"] * 1.02 for e in error.values()), error
