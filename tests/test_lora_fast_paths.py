"""LoRA's fast paths against the plain formula (formula.py) in float64: the fused linear (with dropout
regenerated in backward), per-sample batched routing, torch.compile, and gradient checkpointing. Calls go through
the dispatch (tests/lora_layers.py), which chooses the path as it does for a model."""
import pytest
import torch

import surgery
import surgery_plugins.lora.shared as lora_shared
from surgery import tiny
from surgery_plugins.lora import dispatch, formula, fused, merged_weight, update_first
from surgery_plugins.lora.branches import LoraBranch
from surgery_plugins.lora.fused import LoraLinear
from surgery_plugins.lora.shared import SharedInputLora
from tests.conftest import ids, logits
from tests.lora_layers import layers, lora_linear, shared_outputs


def reference(x, w, bias, a, b, scale, mask=None):
    return formula.linear(x, w, bias, a, b, scale, mask)


@pytest.fixture(params=["separate", "merged"])
def form(request, monkeypatch):
    """The two forms of the LoRA term: separate matmuls, and (CUDA's, forced here on the CPU) the merged weight
    built per call. Returns (the form, a list with one entry per merged weight built)."""
    builds = []
    if request.param == "merged":
        monkeypatch.setattr(dispatch, "MERGED_DEVICES", {"cpu", "cuda"})
        real = merged_weight.merged_all
        spy = lambda ws, *rest, **kw: builds.extend(ws) or real(ws, *rest, **kw)  # noqa: E731
        monkeypatch.setattr(merged_weight, "merged_all", spy)
    return request.param, builds


def test_merged_weight_pays_only_from_as_many_tokens_as_inputs(monkeypatch):
    w = torch.zeros(8, 16)
    assert not dispatch.merged_pays(10_000, w)  # a CPU weight: the separate form
    monkeypatch.setattr(dispatch, "MERGED_DEVICES", {"cpu"})
    assert dispatch.merged_pays(16, w) and dispatch.merged_pays(17, w) and not dispatch.merged_pays(15, w)


@pytest.fixture(params=["after", "first"])
def order(request, monkeypatch):
    """The two orders of a sum of base and LoRA terms (update_first.py), in y and in dx: the LoRA term after, or
    first for every shape. Returns (the order, the [tokens, features] of each sum that took the LoRA term first)."""
    taken = []
    if request.param == "first":
        monkeypatch.setattr(update_first, "FIRST_OUT", 0)
        monkeypatch.setattr(update_first, "FIRST_ELEMENTS", 0)
        real = update_first.update_first
        monkeypatch.setattr(update_first, "update_first",
                            lambda tokens, out: real(tokens, out) and (taken.append((tokens, out)) or True))
    return request.param, taken


@pytest.mark.parametrize("out_features", [12, 4])  # 4: wide in, narrow out: dx from one [dy | dh] matmul
@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_linear_matches_float64_formula(monkeypatch, form, order, frozen, p, out_features):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)  # 20 tokens >= 16 inputs
    w = torch.randn(out_features, 16, generator=g, dtype=torch.float64, requires_grad=not frozen)
    bias = torch.randn(out_features, generator=g, dtype=torch.float64, requires_grad=not frozen)
    a = torch.randn(4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_features, 4, generator=g, dtype=torch.float64, requires_grad=True)
    masks = []
    real = fused.dropout

    def recording(x_, p_):
        out_, keep = real(x_, p_)
        masks.append(keep)
        return out_, keep

    monkeypatch.setattr(fused, "dropout", recording)
    out = lora_linear(x, w, bias, a, b, 0.7, p)
    torch.rand(100)  # the live random state moves on between forward and backward
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, [t for t in (x, w, bias, a, b) if t.requires_grad], dy)
    # built once, for dx: the forward keeps the update in the output's rounding (accuracy)
    assert len(form[1]) == (1 if form[0] == "merged" and p == 0 else 0)
    # dx [20, 16] takes the LoRA term first where it is a sum of two matmuls: no dropout, not merged, not wide in
    assert ((20, 16) in order[1]) == (order[0] == "first" and p == 0 and form[0] == "separate" and out_features == 12)
    mask = masks[0].view(4, 5, 16).to(x.dtype) / (1 - p) if p else None
    if p:
        assert len(masks) == 2 and torch.equal(masks[0], masks[1]), "backward must replay the forward's mask"
        assert 0 < (mask == 0).float().mean() < 0.6
    expected = reference(x, w, bias, a, b, 0.7, mask)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    expected_grads = torch.autograd.grad(expected, [t for t in (x, w, bias, a, b) if t.requires_grad], dy)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("frozen", [True, False])
@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)])  # (0, 2): the second output never gets a gradient
@pytest.mark.parametrize("inside", [True, False])  # the member wider out than in: LoRA inside its matmul, or after
def test_shared_input_lora_matches_float64_formula(monkeypatch, form, frozen, used, inside):
    monkeypatch.setattr(lora_shared, "_update_inside", lambda w, tokens, members: inside and w.shape[0] > w.shape[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    shapes = [(12, 4, True), (20, 2, False), (6, 3, True)]  # out, r, bias; out 20 > 16 in: may be inside
    scales = (0.7, 2.0, 1.5)
    tensors = []
    for out, r, has_bias in shapes:
        tensors += [torch.randn(out, 16, generator=g, dtype=torch.float64, requires_grad=not frozen),
                    torch.randn(out, generator=g, dtype=torch.float64, requires_grad=not frozen) if has_bias else None,
                    torch.randn(r, 16, generator=g, dtype=torch.float64, requires_grad=True),
                    torch.randn(out, r, generator=g, dtype=torch.float64, requires_grad=True)]
    outs = shared_outputs(x, scales, 0.0, *tensors)
    leaves = [t for t in (x, *tensors) if t is not None and t.requires_grad]
    dys = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    grads = torch.autograd.grad([outs[i] for i in used], leaves, [dys[i] for i in used], allow_unused=True)
    assert form[1] == []  # in training never: outputs keep the update in their rounding, dx is Σ dy_i @ W_i + dh @ A
    expected = [reference(x, *tensors[4 * i:4 * i + 4], scales[i]) for i in range(3)]
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad([expected[i] for i in used], leaves, [dys[i] for i in used], allow_unused=True)
    for got, ref in zip(grads, want):
        if ref is None:  # a parameter of the unused member: no gradient
            assert got is None
        else:
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tokens, d_in, out, inside", [
    (8192, 2048, 5632, True), (8192, 1536, 8960, True),  # measured on the H100: inside 1.18 / 1.09-1.20 × base
    (4096, 4096, 14336, False), (2048, 8192, 28672, False),  # inside 1.15-1.16 / 1.40, the update 1.09 / 1.18
    (16384, 2048, 2048, False),  # not wider out than in (q/k/v): always the update
])
def test_gate_up_take_their_update_inside_where_the_copies_cost_less(tokens, d_in, out, inside):
    """The cost model of `_update_inside` against the choices the H100 measured (docs/performance.md)."""
    assert lora_shared._update_inside(torch.empty(out, d_in, device="meta"), tokens, 2) is inside


def test_shared_outputs_follow_changes_between_member_calls(monkeypatch):
    """A member takes the output computed with the first member's call only for the very same, unchanged input
    and parameters; otherwise it computes afresh."""
    model = tiny.build("llama", dtype=torch.float64)
    surgery.attach(model, "lora-all-linear", name="a")
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for p in (attn.q_proj.branches["a"].lora_B, attn.k_proj.branches["a"].lora_B):
            p.normal_()

    def plain(host, x):
        return host.base(x) + host.branches["a"].delta(x)

    x = torch.randn(2, 3, 64, dtype=torch.float64)
    torch.testing.assert_close(attn.q_proj(x), plain(attn.q_proj, x), rtol=1e-12, atol=1e-12)
    x.mul_(2)  # the input changed in place after q's call
    torch.testing.assert_close(attn.k_proj(x), plain(attn.k_proj, x), rtol=1e-12, atol=1e-12)
    attn.q_proj(x)
    with torch.no_grad():
        attn.k_proj.branches["a"].lora_B.mul_(3)  # a parameter changed after q's call
    torch.testing.assert_close(attn.k_proj(x), plain(attn.k_proj, x), rtol=1e-12, atol=1e-12)
    attn.q_proj(x)
    y = x.clone()  # equal values, another tensor
    torch.testing.assert_close(attn.v_proj(y), plain(attn.v_proj, y), rtol=1e-12, atol=1e-12)
    branch = attn.k_proj.branches["a"]
    assert branch.shared is not None
    calls = []
    real = lora_shared.inference
    monkeypatch.setattr(lora_shared, "inference", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():  # inference tensors have no version counters; the outputs are still shared
        z = torch.randn(2, 3, 64, dtype=torch.float64)
        outs = [attn.q_proj(z), attn.k_proj(z), attn.v_proj(z)]
        assert len(calls) == 1
        for host, out in zip((attn.q_proj, attn.k_proj, attn.v_proj), outs):
            torch.testing.assert_close(out, plain(host, z), rtol=1e-12, atol=1e-12)
    surgery.detach(model, "a")
    assert branch.shared is None and type(attn.k_proj) is torch.nn.Linear


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inference_paths_skip_autograd_and_match_formula(monkeypatch, form, mode):
    """Without autograd (and without dropout) the fused and shared outputs come from plain ops, not from the
    autograd functions, and equal the float64 formula."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, generator=g, dtype=torch.float64)
    members = []
    for out, r in ((12, 4), (24, 4)):  # 24 > 16 in: the LoRA term inside the base matmul
        members += [torch.randn(out, 16, generator=g, dtype=torch.float64), torch.randn(out, generator=g, dtype=torch.float64),
                    torch.randn(r, 16, generator=g, dtype=torch.float64), torch.randn(out, r, generator=g, dtype=torch.float64)]
    applied = []
    monkeypatch.setattr(LoraLinear, "apply", lambda *a: applied.append("single"))
    monkeypatch.setattr(SharedInputLora, "apply",
                        lambda *a: applied.append("shared") or [None] * ((len(a) - 3) // 4))  # 4 tensors a member
    with getattr(torch, mode)():
        single = lora_linear(x, *members[:4], 0.7, 0.0)
        shared = shared_outputs(x, (0.7, 2.0), 0.0, *members)
    assert applied == [] and len(form[1]) == (3 if form[0] == "merged" else 0)
    torch.testing.assert_close(single, reference(x, *members[:4], 0.7), rtol=1e-12, atol=1e-12)
    for i, (got, scale) in enumerate(zip(shared, (0.7, 2.0))):
        torch.testing.assert_close(got, reference(x, *members[4 * i:4 * i + 4], scale), rtol=1e-12, atol=1e-12)
    lora_linear(x, *members[:4], 0.7, 0.0)  # autograd on: the function records it
    first, base = layers((0.7, 2.0), 0.0, *members)[0]  # the group's first member computes for both
    dispatch.forward(first, base, (x,), {})
    assert applied == ["single", "shared"]


def test_fused_path_is_taken_only_where_it_applies(monkeypatch):
    calls, shared = [], []
    real, real_shared = LoraLinear.apply, SharedInputLora.apply
    monkeypatch.setattr(LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(SharedInputLora, "apply", lambda *a: shared.append(len(a) - 3) or real_shared(*a))
    llama = tiny.build("llama")
    surgery.attach(llama, "lora-all-linear", name="a")
    logits(llama, ids())
    assert len(calls) == 4  # o and down of the 2 layers alone;
    assert shared == [4 * 3, 4 * 2] * 2  # q/k/v and gate/up together (4 tensors per member)
    calls.clear(), shared.clear()
    gpt2 = tiny.build("gpt2")
    surgery.attach(gpt2, "lora-qv", name="a")  # Conv1D, sliced: the plain composition
    logits(gpt2, ids())
    assert calls == [] and shared == []
    surgery.attach(llama, "lora-qv", name="b")  # two branches at q and v: plain composition there, k alone
    logits(llama, ids())
    assert len(calls) == 2 * 3 and shared == [4 * 2] * 2
    calls.clear(), shared.clear()
    with surgery.per_sample(llama, ["a", "b"]), torch.no_grad():  # routed samples: not shared
        logits(llama, ids(batch=2))
    assert shared == []
    dropped = tiny.build("llama").train()  # dropout in training: each branch on its own, masks independent
    surgery.attach(dropped, surgery.RuleSet(name="d", rules=[surgery.Rule(
        select=surgery.Selector(kinds=["linear"]), exclude=surgery.Selector(roles=["lm_head"]),
        method="lora", params={"dropout": 0.1})]), name="a")
    calls.clear()
    logits(dropped, ids())
    assert len(calls) == 14 and shared == []


def test_fused_training_step_matches_plain_composition(monkeypatch, form):
    def step(use_fused):
        model = tiny.build("llama", dtype=torch.float64).train()
        surgery.attach(model, surgery.RuleSet(name="d", rules=[surgery.Rule(
            select=surgery.Selector(kinds=["linear"]), exclude=surgery.Selector(roles=["lm_head"]),
            method="lora", params={"r": 4, "dropout": 0.0})]), name="a")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
        if not use_fused:
            monkeypatch.setattr(LoraBranch, "fused_call", lambda *a: NotImplemented)
        x = ids(batch=8, seq=12)  # 96 tokens: as many as the MLP's inputs, so every layer can merge
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fast = step(True)
    # for dx only, at o and down of 2 layers (the groups add dh @ A to Σ dy_i @ W_i; no forward merges in training)
    assert len(form[1]) == (2 * 2 if form[0] == "merged" else 0)
    plain = step(False)
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-10, atol=1e-12)


def test_batched_routing_matches_float64_loop():
    model = tiny.build("llama", dtype=torch.float64)
    for name, r in (("a", 8), ("b", 4), ("c", 2)):
        surgery.attach(model, surgery.RuleSet(name=name, rules=[surgery.Rule(
            select=surgery.Selector(roles=["attention.query", "attention.value"]), method="lora", params={"r": r})]), name=name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.1)
    names = ["c", "a", None, "b", "a", "c"]
    x = ids(batch=6)
    host = model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), surgery.per_sample(model, names):
        mixed = logits(model, x)
        assert "state" in host._routes, "the batched LoRA route was not used"
    for i, n in enumerate(names):
        if n is None:
            with surgery.disabled(model):
                want = logits(model, x[i:i + 1])
        else:
            surgery.set_active(model, [n])
            want = logits(model, x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], want, rtol=1e-10, atol=1e-10)


def test_compiles_with_fullgraph_and_gives_the_same_outputs_and_gradients():
    torch._dynamo.reset()
    model = tiny.build("llama").train()
    surgery.attach(model, "lora-all-linear", name="a")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    x = ids()
    eager = model(input_ids=x, labels=x)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-4, atol=1e-6)
    surgery.detach(compiled, "a")  # the wrapper resolves to the user's model
    assert not any(isinstance(m, surgery.Host) for m in model.modules())


@pytest.mark.parametrize("rules", ["lora-all-linear", "lora-qv"])
def test_gradient_checkpointing_gives_the_same_gradients(rules):
    def grads(checkpointing):
        model = tiny.build("gpt2" if rules == "lora-qv" else "llama").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        surgery.attach(model, surgery.RuleSet(name="d", rules=[surgery.Rule(
            select=surgery.Selector(kinds=["linear", "conv1d"]), exclude=surgery.Selector(roles=["lm_head"]),
            method="lora", params={"r": 4, "dropout": 0.2})]), name="a")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        torch.manual_seed(123)
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)
