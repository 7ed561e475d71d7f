"""LoRA's dispatch: which path `choose` picks in each situation, and every path against formula.py in float64 on
shapes no other test uses (odd widths, rank 3, a member wider out than in)."""
import contextlib

import pytest
import torch
from torch import nn

import surgery
import surgery.plugin
from surgery import tiny
from surgery_plugins.lora import dispatch, formula, kernels, routes
from surgery_plugins.lora.dispatch import (
    FUSED,
    GROUPS,
    INFERENCE,
    PLAIN,
    ROUTED,
    SHARED,
    SHARED_INFERENCE,
    TAKEN,
    choose,
)
from tests.conftest import ids
from tests.lora_layers import branch_of, layers

SEED = 20261122
IN, OUT, R = 13, 7, 3  # odd widths, rank 3
TRITON = kernels.AVAILABLE and kernels.INTERPRETING  # the kernels on CPU tensors: interpreted (CUDA: test_lora_kernels)


def rand(*shape, g, grad=False, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


# ---- the table: situation -> path ----------------------------------------------------------------------------


def single(out=OUT, inp=IN, r=R, p=0.0, training=True, dtype=torch.float64, base_dtype=None, channels=None,
           base_class=nn.Linear):
    """(branch, base) of one LoRA linear, alone at its site."""
    g = torch.Generator().manual_seed(0)
    branch = branch_of(rand(r, inp, g=g, dtype=dtype), rand(out, r, g=g, dtype=dtype), 0.5, p, training)
    if channels is not None:
        branch.channels = channels
    base = base_class(inp, out, dtype=base_dtype or dtype)
    return branch, base


class MyLinear(nn.Linear):
    """A subclass: its forward may differ from nn.Linear's, so only the plain formula is safe."""


def product(tokens=(3, 5), inp=IN):
    """A layer input that is a fresh product autograd keeps the factors of (as an MLP feeds its down projection)."""
    g = torch.Generator().manual_seed(1)
    u, v = rand(*tokens, inp, g=g, grad=True), rand(*tokens, inp, g=g, grad=True)
    return u * v


def x_of(tokens=(3, 5), inp=IN, dtype=torch.float64, grad=False):
    return torch.randn(*tokens, inp, dtype=dtype, generator=torch.Generator().manual_seed(2)).requires_grad_(grad)


def group(*specs, hosts=None):
    """Members (branch, base) of a group reading one input: specs (out, r, p, dtype) per member; hosts: the
    running names at each member's host (default: it alone)."""
    g = torch.Generator().manual_seed(3)
    tensors, scales = [], []
    for out, r, _, dtype in specs:
        tensors += [rand(out, IN, g=g, dtype=dtype), None, rand(r, IN, g=g, dtype=dtype),
                    rand(out, r, g=g, dtype=dtype)]
        scales.append(0.5)
    pairs = layers(scales, 0.0, *tensors)
    for (branch, _), (_, _, p, _) in zip(pairs, specs):
        branch.dropout = nn.Dropout(p) if p else nn.Identity()
    for (branch, _), running in zip(pairs, hosts or [("a",)] * len(pairs)):
        branch.host.running = running
    return pairs


@contextlib.contextmanager
def grad(enabled):
    with torch.set_grad_enabled(enabled):
        yield


def compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


TABLE = [
    # (situation, how to make (branch, base, x, context), expected kind, expected flags)
    ("input not a tensor", lambda mp: (*single(), "text", grad(True)), PLAIN, {}),
    ("under torch.compile", lambda mp: (*single(), x_of(), compiling(mp) or grad(True)), PLAIN, {}),
    ("a role's channels of a fused projection", lambda mp: (*single(channels=torch.arange(OUT)), x_of(), grad(True)),
     PLAIN, {}),
    ("a subclass of nn.Linear", lambda mp: (*single(base_class=MyLinear), x_of(), grad(True)), PLAIN, {}),
    ("an embedding", lambda mp: (single()[0], nn.Embedding(5, OUT, dtype=torch.float64), x_of(), grad(True)),
     PLAIN, {}),
    ("x in another dtype than W and A", lambda mp: (*single(), x_of(dtype=torch.float32), grad(True)), PLAIN, {}),
    ("W in another dtype than x and A", lambda mp: (*single(base_dtype=torch.float32), x_of(), grad(True)), PLAIN, {}),
    ("no grad, no dropout", lambda mp: (*single(), x_of(), grad(False)), INFERENCE, dict(merged=False, kernels=False)),
    ("no grad, dropout in eval", lambda mp: (*single(p=0.3, training=False), x_of(), grad(False)), INFERENCE, {}),
    ("no grad, dropout in training", lambda mp: (*single(p=0.3), x_of(), grad(False)), FUSED, dict(p=0.3)),
    ("grad, no dropout", lambda mp: (*single(), x_of(), grad(True)), FUSED, dict(p=0.0, merged=False, kernels=False)),
    ("grad, merged weight on CUDA-like device, tokens >= in", lambda mp: (
        *single(), x_of(), mp.setattr(dispatch, "MERGED_DEVICES", {"cpu"}) or grad(True)), FUSED, dict(merged=True)),
    ("grad, merged weight device, tokens < in", lambda mp: (
        *single(), x_of(tokens=(2, 6)), mp.setattr(dispatch, "MERGED_DEVICES", {"cpu"}) or grad(True)), FUSED,
     dict(merged=False)),
    ("no grad, merged weight device, tokens >= in", lambda mp: (
        *single(), x_of(), mp.setattr(dispatch, "MERGED_DEVICES", {"cpu"}) or grad(False)), INFERENCE,
     dict(merged=True)),
    ("dropout: no merged weight", lambda mp: (
        *single(p=0.3), x_of(), mp.setattr(dispatch, "MERGED_DEVICES", {"cpu"}) or grad(True)), FUSED,
     dict(merged=False, p=0.3)),
    ("a product input: kept as its factors", lambda mp: (*single(), product(), grad(True)), FUSED,
     dict(saved=2, kernels=False)),
    ("a product input under saved-tensor hooks", lambda mp: (
        *single(), product(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)), FUSED,
     dict(saved=1)),
    ("kernels serve: dropout", lambda mp: (*single(p=0.3), x_of(), serve(mp) or grad(True)), FUSED,
     dict(kernels=True, saved=1)),
    ("kernels serve: a product input", lambda mp: (*single(), product(), serve(mp) or grad(True)), FUSED,
     dict(kernels=True, saved=2)),
    ("kernels serve, but a plain input without dropout", lambda mp: (*single(), x_of(), serve(mp) or grad(True)),
     FUSED, dict(kernels=False)),
    ("kernels serve, but rank over their maximum", lambda mp: (
        *single(r=kernels.MAX_RANK + 1, p=0.3), x_of(), serve(mp) or grad(True)), FUSED, dict(kernels=False)),
    ("kernels serve: inference builds the merged weight", lambda mp: (
        *single(), x_of(), serve(mp) or mp.setattr(dispatch, "MERGED_DEVICES", {"cpu"}) or grad(False)), INFERENCE,
     dict(merged=True, kernels=True)),
]


def serve(monkeypatch):
    monkeypatch.setattr(kernels, "AVAILABLE", True)
    monkeypatch.setattr(dispatch, "KERNEL_DEVICES", {"cpu"})
    monkeypatch.setattr(dispatch, "KERNEL_DTYPES", {torch.float64})


def check(path, kind, flags):
    assert path.kind == kind
    for name, want in flags.items():
        got = getattr(path, name)
        assert (len(got) if name in ("saved", "live") else got) == want, (name, got)


@pytest.mark.parametrize("situation, make, kind, flags", TABLE, ids=[row[0] for row in TABLE])
def test_dispatch_picks_the_path_of_each_situation(monkeypatch, situation, make, kind, flags):
    branch, base, x, context = make(monkeypatch)
    with context:
        check(choose(branch, base, x), kind, flags)


F64 = torch.float64
GROUPS_TABLE = [
    # (situation, member specs (out, r, p, dtype), hosts, grad, kernels serve, the caller, expected kind, flags)
    ("three alone, grad", [(OUT, R, 0, F64), (17, 2, 0, F64), (5, R, 0, F64)], None, True, False, 0, SHARED,
     dict(live=3, kernels=False)),
    ("three alone, no grad", [(OUT, R, 0, F64), (17, 2, 0, F64), (5, R, 0, F64)], None, False, False, 0,
     SHARED_INFERENCE, dict(live=3)),
    ("one of three not alone at its site", [(OUT, R, 0, F64)] * 3, [("a",), ("a", "b"), ("a",)], True, False, 0,
     SHARED, dict(live=2)),
    ("routed samples at the others' sites", [(OUT, R, 0, F64)] * 3, "routed", True, False, 0, FUSED, {}),
    ("only the caller alone", [(OUT, R, 0, F64)] * 2, [("a",), ("a", "b")], True, False, 0, FUSED, {}),
    ("a member in another dtype", [(OUT, R, 0, F64), (OUT, R, 0, torch.float32), (OUT, R, 0, F64)], None, True,
     False, 0, SHARED, dict(live=2)),
    ("different dropout rates", [(OUT, R, 0.1, F64), (OUT, R, 0.2, F64)], None, True, True, 0, FUSED, {}),
    ("dropout, kernels not serving", [(OUT, R, 0.1, F64)] * 2, None, True, False, 0, FUSED, dict(p=0.1)),
    ("dropout, kernels serving, unequal ranks", [(OUT, R, 0.1, F64), (OUT, 2, 0.1, F64)], None, True, True, 0,
     FUSED, {}),
    ("dropout, kernels serving, equal ranks", [(OUT, R, 0.1, F64)] * 2, None, True, True, 0, SHARED,
     dict(p=0.1, kernels=True)),
    ("no dropout, kernels serving: dh and dB kernel", [(OUT, R, 0, F64)] * 2, None, True, True, 1, SHARED,
     dict(kernels=True)),
]


@pytest.mark.parametrize("situation, specs, hosts, enabled, kernels_serve, caller, kind, flags", GROUPS_TABLE,
                         ids=[row[0] for row in GROUPS_TABLE])
def test_dispatch_picks_the_path_of_each_group_situation(monkeypatch, situation, specs, hosts, enabled,
                                                         kernels_serve, caller, kind, flags):
    if kernels_serve:
        serve(monkeypatch)
    pairs = group(*specs, hosts=None if hosts == "routed" else hosts)
    if hosts == "routed":
        for branch, _ in pairs[1:]:
            branch.host.routing = ("a", None)
    branch, base = pairs[caller]
    with torch.set_grad_enabled(enabled):
        check(choose(branch, base, x_of()), kind, flags)


def test_a_group_member_takes_the_output_computed_for_it_on_the_same_unchanged_input():
    pairs = group((OUT, R, 0, F64), (17, 2, 0, F64))
    x = x_of()
    with torch.no_grad():
        first = dispatch.forward(*pairs[0], (x,), {})
        path = choose(*pairs[1], x)
        assert path.kind == TAKEN
        torch.testing.assert_close(path.taken, formula.linear(x, pairs[1][1].weight, None, pairs[1][0].lora_A,
                                                              pairs[1][0].lora_B, 0.5), rtol=1e-12, atol=1e-12)
        assert choose(*pairs[1], x).kind == SHARED_INFERENCE  # taken once: a second call computes afresh
        dispatch.forward(*pairs[0], (x,), {})
        x.mul_(2)  # changed in place since
        assert choose(*pairs[1], x).kind == SHARED_INFERENCE
    assert first.shape == (3, 5, OUT)


@pytest.mark.parametrize("situation, make, kind", [
    ("plain pairs", lambda: [single()[0], single(r=5)[0]], ROUTED),
    ("dropout in eval", lambda: [single(p=0.3, training=False)[0]] * 2, ROUTED),
    ("one dropout rate in training", lambda: [single(p=0.3)[0], single(p=0.3, r=5)[0]], ROUTED),
    ("dropout rates that differ", lambda: [single()[0], single(p=0.3)[0]], GROUPS),
    ("a role's channels", lambda: [single(channels=torch.arange(OUT))[0]], GROUPS),
])
def test_dispatch_picks_the_routed_path(situation, make, kind):
    assert choose(None, None, None, groups=make()).kind == kind


# ---- every path equals the formula in float64 -------------------------------------------------------------------


def leaves_of(*tensors):
    return [t for t in tensors if t is not None and t.requires_grad]


def assert_same(got, want, leaves, g):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn(got.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, leaves, dy, retain_graph=True)  # x may be a product both graphs share
    for a, b in zip(got_grads, torch.autograd.grad(want, leaves, dy)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def masks(rows, cols, p, n, seed=SEED):
    """The kernels' masks of members 0 .. n-1 as the float64 multiplier of the formula."""
    return [kernels.keep_mask(rows, cols, seed + i, p).double() * kernels.threshold(p)[1] for i in range(n)]


@pytest.mark.parametrize("path, p, frozen", [
    ("fused", 0.0, True), ("fused", 0.0, False), ("fused merged", 0.0, False), ("fused dropout", 0.25, True),
    ("fused kernels, product input", 0.0, True), ("fused kernels, dropout", 0.25, False),
    ("inference", 0.0, True), ("inference merged", 0.0, True), ("inference merged kernel", 0.0, True)])
@pytest.mark.parametrize("out", [OUT, 17])  # wider in than out, and out than in
def test_every_single_linear_path_equals_the_formula(monkeypatch, path, p, frozen, out):
    if "kernel" in path:
        if not TRITON:
            pytest.skip("no Triton interpreter")
        serve(monkeypatch)
        monkeypatch.setattr(kernels, "new_seed", lambda device: SEED)
    if "merged" in path:
        monkeypatch.setattr(dispatch, "MERGED_DEVICES", {"cpu"})
    g = torch.Generator().manual_seed(4)
    w, bias = rand(out, IN, g=g, grad=not frozen), rand(out, g=g, grad=not frozen)
    a, b = rand(R, IN, g=g, grad=True), rand(out, R, g=g, grad=True)
    u, v = rand(3, 5, IN, g=g, grad=True), rand(3, 5, IN, g=g, grad=True)
    x = u * v if "product" in path else rand(3, 5, IN, g=g, grad=True)
    masks_drawn = []
    if p and "kernels" not in path:  # torch's dropout: record the mask the forward draws
        real = torch.native_dropout
        monkeypatch.setattr(torch, "native_dropout", lambda t, q, train: masks_drawn.append(real(t, q, train)) or
                            masks_drawn[-1])
    (branch, base), = layers((0.5,), p, w, bias, a, b)
    inference = path.startswith("inference")
    with torch.set_grad_enabled(not inference):
        chosen = choose(branch, base, x)
        assert chosen.kind == (INFERENCE if inference else FUSED)
        assert chosen.merged == ("merged" in path) and chosen.kernels == ("kernel" in path)
        got = dispatch.forward(branch, base, (x,), {})
    if inference:
        torch.testing.assert_close(got, formula.linear(x, w, bias, a, b, 0.5), rtol=1e-12, atol=1e-12)
        return
    if not p:
        mask = None
    elif masks_drawn:
        mask = masks_drawn[0][1].view(3, 5, IN).double() / (1 - p)
    else:
        mask = masks(15, IN, p, 1)[0].view(3, 5, IN)
    want = formula.linear(x, w, bias, a, b, 0.5, mask)
    assert_same(got, want, leaves_of(u, v, x, w, bias, a, b) if "product" in path else leaves_of(x, w, bias, a, b), g)


@pytest.mark.parametrize("path, p", [("shared", 0.0), ("shared, merged-weight device: not merged in training", 0.0),
                                     ("shared kernels", 0.0), ("shared kernels, dropout", 0.25), ("shared inference", 0.0),
                                     ("shared inference merged kernel", 0.0)])
def test_every_group_path_equals_the_formula(monkeypatch, path, p):
    if "kernel" in path:
        if not TRITON:
            pytest.skip("no Triton interpreter")
        serve(monkeypatch)
        monkeypatch.setattr(kernels, "new_seed", lambda device: SEED)
    if "merged" in path:
        monkeypatch.setattr(dispatch, "MERGED_DEVICES", {"cpu"})
    g = torch.Generator().manual_seed(5)
    x = rand(3, 5, IN, g=g, grad=True)
    shapes = [(OUT, R, True), (17, R, False), (5, R, True)]  # 17 > 13 in: the update inside the base matmul
    tensors = []
    for out, r, has_bias in shapes:
        tensors += [rand(out, IN, g=g, grad=True), rand(out, g=g, grad=True) if has_bias else None,
                    rand(r, IN, g=g, grad=True), rand(out, r, g=g, grad=True)]
    scales = (0.5, 1.5, 2.0)
    pairs = layers(scales, p, *tensors)
    inference = "inference" in path
    with torch.set_grad_enabled(not inference):
        chosen = choose(*pairs[0], x)
        assert chosen.kind == (SHARED_INFERENCE if inference else SHARED) and len(chosen.live) == 3
        # merged weights for the inference form only: training keeps the update in the outputs' rounding
        assert chosen.merged == ("merged" in path and inference) and chosen.kernels == ("kernel" in path)
        outs = [dispatch.forward(branch, base, (x,), {}) for branch, base in pairs]
    ms = [m.view(3, 5, IN) for m in masks(15, IN, p, 3)] if p else [None] * 3
    wants = [formula.linear(x, *tensors[4 * i:4 * i + 4], scales[i], ms[i]) for i in range(3)]
    if inference:
        for got, want in zip(outs, wants):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        return
    leaves = leaves_of(x, *tensors)
    dys = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    for got, want in zip(outs, wants):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(outs, leaves, dys, retain_graph=True)
    for a, b in zip(got_grads, torch.autograd.grad(wants, leaves, dys)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("form", ["joined", "gathered"])
@pytest.mark.parametrize("p, autograd", [(0.0, True), (0.3, True), (0.0, False)])
def test_routed_path_equals_the_formula_per_sample(monkeypatch, form, p, autograd):
    """Both forms of the routed path (forced through the cost model), mixed ranks and scales, a sample with no
    pair, with and without dropout (one mask drawn on x, as the formula's dropout would on each sample), and
    without autograd (the joined form then updates the base's output in place)."""
    monkeypatch.setattr(routes, "joined_pays", lambda *shape: form == "joined")
    g = torch.Generator().manual_seed(6)
    pairs = [(rand(r, IN, g=g, grad=True), rand(OUT, r, g=g, grad=True), s) for r, s in ((R, 0.5), (1, 2.0), (5, 1.0))]
    branches = [branch_of(a, b, s, p) for a, b, s in pairs]
    x = rand(4, 5, IN, g=g, grad=True)
    base_out = rand(4, 5, OUT, g=g, grad=autograd)  # the base's output carries its own gradient
    group = torch.tensor([2, 0, 3, 1])  # 3: no pair
    with torch.random.fork_rng(), torch.set_grad_enabled(autograd):
        torch.manual_seed(3)
        got = routes.output(routes.Stack(branches), group, x, base_out.clone())  # a base's fresh output
    with torch.random.fork_rng():
        torch.manual_seed(3)
        dropped = torch.nn.functional.dropout(x, p, True) if p else x
    want = torch.stack([base_out[i] if k == 3 else base_out[i] + formula.update(dropped[i], *pairs[k])
                        for i, k in enumerate(group.tolist())])
    if not autograd:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        return
    assert_same(got, want, leaves_of(x, base_out, *[t for a, b, _ in pairs for t in (a, b)]), g)


@pytest.mark.parametrize("bias", [True, False])
def test_routed_call_with_the_base_inside_equals_the_formula_per_sample(monkeypatch, bias):
    """In training without dropout the routed call computes the base linear too (routes.call: dx = dy @ W + dh @ A
    in one update): outputs and the gradients of x, W, the bias and every pair equal the float64 formula, with
    mixed ranks and scales and a sample with no pair; without autograd the output alike; it declines with
    dropout."""
    monkeypatch.setattr(routes, "joined_pays", lambda *shape: True)
    g = torch.Generator().manual_seed(7)
    pairs = [(rand(r, IN, g=g, grad=True), rand(OUT, r, g=g, grad=True), s) for r, s in ((R, 0.5), (1, 2.0), (5, 1.0))]
    base = nn.Linear(IN, OUT, bias=bias, dtype=torch.float64)
    x = rand(4, 5, IN, g=g, grad=True)
    group = torch.tensor([2, 0, 3, 1])  # 3: no pair
    stack = routes.Stack([branch_of(a, b, s, 0.0) for a, b, s in pairs])
    got = routes.call(stack, group, base, x)
    assert got is not NotImplemented
    out = base(x)
    want = torch.stack([out[i] if k == 3 else out[i] + formula.update(x[i], *pairs[k])
                        for i, k in enumerate(group.tolist())])
    assert_same(got, want, leaves_of(x, base.weight, base.bias, *[t for a, b, _ in pairs for t in (a, b)]), g)
    with torch.no_grad():  # in inference too: the update first, the base matmul added onto it
        torch.testing.assert_close(routes.call(stack, group, base, x), want, rtol=1e-12, atol=1e-12)
    dropped = routes.Stack([branch_of(a, b, s, 0.3) for a, b, s in pairs])
    assert routes.call(dropped, group, base, x) is NotImplemented


def test_routed_cost_model_joins_small_batches_and_gathers_long_prompts_of_many_adapters():
    """The joined form where its extra columns cost less than the copies and launches of the gathered one: decoding
    (one token per sample) with 64 adapters, several training jobs; gathered for long prompts of 64 adapters."""
    width = 2048 + 2048
    assert routes.joined_pays(tokens=32, samples=32, total_rank=64 * 16, rank=16, width=width)  # decode step
    assert routes.joined_pays(tokens=4 * 512, samples=4, total_rank=4 * 16, rank=16, width=width)  # 4 jobs
    assert not routes.joined_pays(tokens=32 * 2048, samples=32, total_rank=64 * 16, rank=16, width=width)


def test_plain_sliced_and_embedding_forms_equal_the_formula():
    """The forms the Host runs through adapt_output: a role's channels of a fused projection, and an embedding."""
    model = tiny.build("gpt2", dtype=torch.float64)
    surgery.attach(model, "lora-qv", name="a")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(generator=torch.Generator().manual_seed(len(n)))
    host = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, host.base.weight.shape[0], dtype=torch.float64)
    want = host.base(x)
    for part in host.branches["a"].parts.values():
        delta = formula.update(x, part.lora_A, part.lora_B, part.scale)
        want = want.index_add(-1, part.channels, delta)
    torch.testing.assert_close(host(x), want, rtol=1e-12, atol=1e-12)

    emb = nn.Embedding(11, 6, padding_idx=0, dtype=torch.float64)
    from surgery_plugins.lora.branches import LoraEmbeddingBranch
    from surgery_plugins.lora.plugin import LoraParams
    branch = LoraEmbeddingBranch(emb, LoraParams(r=R, alpha=2.0), torch.float64)
    with torch.no_grad():
        branch.lora_A.normal_()
    i = ids(batch=2, seq=4, vocab=11)
    want = emb(i) + torch.stack([branch.lora_A.T[k] for k in i.flatten()]).view(2, 4, R) @ branch.lora_B.T * (2.0 / R)
    torch.testing.assert_close(branch.adapt_output((i,), {}, emb(i)), want, rtol=1e-12, atol=1e-12)



def test_under_autocast_lora_takes_the_plain_path_and_matches_peft():
    """HF Trainer's and TRL's `bf16` run the model under autocast: LoRA then computes by the plain ops (whose casts
    autocast applies) and gives HF PEFT's loss and adapter gradients under the same autocast."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = tiny.build("llama", seed=0)
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    surgery.attach(model, "lora-qv", name="a")
    peft_params = dict(theirs.named_parameters())
    pairs = {}  # our parameter -> PEFT's
    for name, p in model.named_parameters():
        if p.requires_grad:
            path, key = name.split(".branches.a.")
            pairs[name] = (p, peft_params[f"base_model.model.{path}.{key}.default.weight"])
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # the same non-zero pairs in both
        for p, q in pairs.values():
            q.copy_(p.copy_(torch.randn(p.shape, generator=g) * 0.1))
    x = ids(batch=2, seq=8)
    branch = next(iter(surgery.plugin.attachment(model, "a").branches.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert choose(branch, None, torch.ones(2, 4)).kind == PLAIN
        loss = model(input_ids=x, labels=x).loss
        expected = theirs(input_ids=x, labels=x).loss
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    for name, (p, q) in pairs.items():
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-3, msg=name)


def test_the_per_call_reads_give_what_the_attributes_give_however_a_module_holds_them():
    """reads.py reads nn.Module's dictionaries, falling back to the attribute: a pair held as parameters, as plain
    tensors (branch_of) or through a parametrization reads the same as `branch.lora_A`, `branch.lora_B`."""
    from torch.nn.utils import parametrize

    from surgery_plugins.lora import reads
    from surgery_plugins.lora.branches import LoraBranch
    from surgery_plugins.lora.plugin import LoraParams
    held = single()[0]  # plain tensors
    params = LoraBranch(IN, OUT, LoraParams(r=R, dropout=0.1), torch.float64, torch.device("cpu"))
    turned = LoraBranch(IN, OUT, LoraParams(r=R), torch.float64, torch.device("cpu"))
    parametrize.register_parametrization(turned, "lora_A", Twice())
    for branch in (held, params, turned):
        a, b = reads.pair(branch)
        assert torch.equal(a, branch.lora_A) and b is branch.lora_B
        assert reads.dropout(branch) is branch.dropout and reads.channels(branch) is branch.channels
    assert reads.pair(params)[0] is params.lora_A
    torch.testing.assert_close(reads.pair(turned)[0], 2 * turned.parametrizations.lora_A.original)
    linear, plain = nn.Linear(IN, OUT, bias=False), nn.Linear(IN, OUT)
    assert reads.weight_bias(linear) == (linear.weight, None)
    assert all(x is y for x, y in zip(reads.weight_bias(plain), (plain.weight, plain.bias)))
    parametrize.register_parametrization(plain, "weight", Twice())
    torch.testing.assert_close(reads.weight_bias(plain)[0], 2 * plain.parametrizations.weight.original)


class Twice(nn.Module):
    def forward(self, t):
        return 2 * t
