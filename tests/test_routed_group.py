"""Per-sample routing at the linears that read one input (plugins/lora/routed_group.py): q/k/v and gate/up
computed together, in training and in inference, checked in float64 against each sample run alone on its own
adapter; kept outputs are not reused once an input or a pair changed."""
import pytest
import torch

import surgery
from surgery import tiny
from surgery_plugins.lora import routed_group

RANKS = {"a": 2, "b": 5, "c": 3}  # mixed ranks and scales (alpha 8)


def rules(r):
    return surgery.RuleSet(name="t", rules=[surgery.Rule(
        select=surgery.Selector(kinds=["linear"]), exclude=surgery.Selector(roles=["lm_head"]), method="lora",
        params={"r": r, "alpha": 8})])


def model_with_jobs(arch="llama", ranks=RANKS):
    model = tiny.build(arch).double()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, r in ranks.items():
        surgery.attach(model, rules(r), name=name)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model.train()


@pytest.fixture
def counted(monkeypatch):
    calls = []
    outputs = routed_group.outputs  # the sites that read one input, computed together
    monkeypatch.setattr(routed_group, "outputs", lambda *a: calls.append(1) or outputs(*a))
    return calls


EQUAL = {"a": 4, "b": 4, "c": 4}

# Each LoRA dB is computed over all rows (a group's samples apart), over its group's rows (consecutive samples), or
# as one batched product (equal consecutive blocks, equal ranks): routes.grads_b.
ROUTINGS = {
    "apart": (RANKS, ["b", None, "a", "c", "a"]),  # a sample on the base alone
    "consecutive": (RANKS, ["b", "b", "a", "c", None]),
    "blocks": (EQUAL, ["b", "b", "a", "a", "c", "c"]),
}


@pytest.mark.parametrize("arch,routing", [("llama", "apart"), ("qwen2", "apart"), ("llama", "consecutive"),
                                          ("llama", "blocks"), ("qwen2", "blocks")])
def test_grouped_routing_equals_each_sample_alone(counted, monkeypatch, arch, routing):
    ranks, names = ROUTINGS[routing]
    model = model_with_jobs(arch, ranks)
    q = model.model.layers[1].self_attn.q_proj
    q.weight.requires_grad_(True)  # a base linear trained too: its weight's (and qwen2's bias's) gradient
    if q.bias is not None:
        q.bias.requires_grad_(True)
    ids = torch.randint(1, 100, (len(names), 6), generator=torch.Generator().manual_seed(9))
    trainable = [p for p in model.parameters() if p.requires_grad]
    batched, bmm = [], torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: batched.append(1) or bmm(*a, **k))
    with surgery.per_sample(model, names):
        logits = model(input_ids=ids, use_cache=False).logits
    assert counted, "the grouped path did not run"
    dy = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    got = torch.autograd.grad(logits, trainable, dy, allow_unused=True)
    want = [torch.zeros_like(p) for p in trainable]
    for i, name in enumerate(names):  # each sample alone, on its own adapter (or none), not routed
        surgery.set_active(model, [name] if name else [])
        alone = model(input_ids=ids[i:i + 1], use_cache=False).logits
        torch.testing.assert_close(logits[i:i + 1], alone, rtol=1e-10, atol=1e-12)
        for w, g in zip(want, torch.autograd.grad(alone, trainable, dy[i:i + 1], allow_unused=True)):
            if g is not None:
                w += g
    for p, g, w in zip(trainable, got, want):
        torch.testing.assert_close(torch.zeros_like(p) if g is None else g, w, rtol=1e-9, atol=1e-12)
    assert bool(batched) == (routing == "blocks"), "the dB products did not take the form the routing allows"


def test_a_kept_output_is_not_taken_after_its_input_or_pair_changed():
    model = model_with_jobs()
    names = ["a", "b"]
    layer = model.model.layers[0].self_attn
    x = torch.randn(2, 4, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with surgery.per_sample(model, names):
        q = layer.q_proj(x)
        k = layer.k_proj(x)  # taken from q's call
        q2 = layer.q_proj(x)
        with torch.no_grad():
            layer.k_proj.branches["b"].lora_B.mul_(2)  # a pair changed: k is computed again
        k2 = layer.k_proj(x)
        layer.q_proj(x)
        k3 = layer.k_proj(x.clone())  # another input: computed again
    surgery.set_active(model, names[:1])  # each sample alone, not routed
    k_a = layer.k_proj(x[:1])
    surgery.set_active(model, names[1:])
    k_b = layer.k_proj(x[1:])
    torch.testing.assert_close(q, q2)
    assert not torch.allclose(k[1], k2[1])
    torch.testing.assert_close(k2, torch.cat([k_a, k_b]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k3, k2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("grouped", [True, False])
def test_routing_in_inference_equals_each_sample_alone(counted, monkeypatch, mode, grouped):
    """In inference, large inputs group (here: the threshold lowered to the tiny model's); a decode step's few
    tokens are routed site by site (the default threshold), the grouping's host work would not pay. Either way a
    pair written in place between two calls is read again (each site's joined pairs are kept across calls)."""
    if grouped:
        monkeypatch.setattr(routed_group, "INFERENCE_ELEMENTS", 1)
    model = model_with_jobs().eval()
    names = ["c", None, "a", "b"]
    ids = torch.randint(1, 100, (len(names), 7), generator=torch.Generator().manual_seed(5))
    with mode():
        with surgery.per_sample(model, names):
            first = model(input_ids=ids, use_cache=False).logits
            assert bool(counted) == grouped
            for p in model.parameters():
                if p.requires_grad:  # every pair, written in place (as an optimizer step does)
                    p.mul_(1.5)
            got = model(input_ids=ids, use_cache=False).logits
        for i, name in enumerate(names):
            surgery.set_active(model, [name] if name else [])
            alone = model(input_ids=ids[i:i + 1], use_cache=False).logits
            torch.testing.assert_close(got[i:i + 1], alone, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(first[0], got[0])


def test_generate_with_grouped_routing_equals_each_sample_alone(counted, monkeypatch):
    """generate() with the KV cache, every call grouped (prompt and decode steps): each sample's tokens and scores
    as generated alone on its own adapter."""
    monkeypatch.setattr(routed_group, "INFERENCE_ELEMENTS", 1)
    model = model_with_jobs().eval()
    names = ["b", "a", None]
    ids = torch.randint(1, 100, (len(names), 5), generator=torch.Generator().manual_seed(8))
    gen = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_scores": True,
           "return_dict_in_generate": True}
    with torch.no_grad():
        with surgery.per_sample(model, names):
            got = model.generate(ids, **gen)
        assert counted, "the grouped path did not run"
        for i, name in enumerate(names):
            surgery.set_active(model, [name] if name else [])
            alone = model.generate(ids[i:i + 1], **gen)
            assert torch.equal(got.sequences[i], alone.sequences[0])
            for a, b in zip(got.scores, alone.scores):
                torch.testing.assert_close(a[i:i + 1], b, rtol=1e-10, atol=1e-10)


def test_routing_inside_a_compiled_model():
    """torch.compile over a model routed per sample: the routed sites run eagerly (their Python state is not
    compiled), outputs and gradients as without compile."""
    model = model_with_jobs()
    names = ["c", "a", None]
    ids = torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(3))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with surgery.per_sample(model, names):
        want = model(input_ids=ids, use_cache=False).logits
        want_grads = torch.autograd.grad(want.sum(), trainable, allow_unused=True)  # "b" takes no sample
        got = torch.compile(model)(input_ids=ids, use_cache=False).logits
        got_grads = torch.autograd.grad(got.sum(), trainable, allow_unused=True)
    # the model's own float32 casts (RMSNorm) are fused away by the compiler: float32-sized differences
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert [g is None for g in got_grads] == [g is None for g in want_grads]
    for a, b in zip(got_grads, want_grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_routing_under_autocast_is_as_accurate_as_each_sample_alone_under_autocast(grad):
    """Under autocast (HF Trainer's and TRL's bf16) a routed site leaves the base and the update to the ops that
    autocast casts. A float32 model with float32 adapters, routed in bfloat16: its logits, and in training its
    adapters' gradients, are within 1.25 x the error of each sample run alone under autocast, both measured
    against each sample alone in float32."""
    model = model_with_jobs().float()
    names = ["b", None, "a", "c"]
    ids = torch.randint(1, 100, (len(names), 6), generator=torch.Generator().manual_seed(6))
    pairs = [p for p in model.parameters() if p.requires_grad]

    def flat(grads):
        return torch.cat([torch.zeros_like(p).flatten() if g is None else g.float().flatten()
                          for p, g in zip(pairs, grads)])

    def alone(cast):  # each sample alone on its adapter: logits, and the sum of the pairs' gradients
        logits, grads = [], torch.zeros(sum(p.numel() for p in pairs))
        for i, name in enumerate(names):
            surgery.set_active(model, [name] if name else [])
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
                out = model(input_ids=ids[i:i + 1], use_cache=False).logits
            logits.append(out.detach().float())
            if grad and name:  # a sample on the base alone has no pair's gradient
                grads += flat(torch.autograd.grad(out.float().sum(), pairs, allow_unused=True))
        return torch.cat(logits), grads

    with torch.set_grad_enabled(grad), surgery.per_sample(model, names), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(input_ids=ids, use_cache=False).logits
    assert got.dtype == torch.bfloat16
    got_grads = flat(torch.autograd.grad(got.float().sum(), pairs, allow_unused=True)) if grad else None
    (want, want_grads), (cast, cast_grads) = alone(False), alone(True)
    error = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert error(got.float(), want) <= 1.25 * error(cast, want) + 1e-4
    if grad:
        assert error(got_grads, want_grads) <= 1.25 * error(cast_grads, want_grads) + 1e-4


@pytest.mark.parametrize("numbers,ranks,frozen", [((0, 0, 1, 1, 2, 2), (3, 3, 3), None),
                                                  ((0, 0, 1, 1, 2, 2), (3, 3, 3), 1),
                                                  ((1, 0, 0, 2, 3), (2, 5, 3), None)])
def test_joined_node_gradients_over_each_groups_rows_equal_the_formula(numbers, ranks, frozen):
    """routes.JoinedLora (a routed site whose base is not a plain linear, or with dropout) given each group's rows:
    its gradients equal autograd's of out + Σ_g mask_g · (x @ A_gᵀ) @ B_gᵀ, in float64 (3: no adapter); a frozen
    B (`frozen`: its group) gets none, the others theirs."""
    from surgery_plugins.lora import routes
    g = torch.Generator().manual_seed(3)
    groups, tokens, width, out_width = len(ranks), 4, 6, 5
    group = torch.tensor(numbers)
    scales = tuple(0.5 + i for i in range(groups))
    spans = tuple((numbers.index(i), len(numbers) - numbers[::-1].index(i)) for i in range(groups))
    rows = routes.rows_from(spans, len(numbers), tokens)
    x = torch.randn(len(numbers), tokens, width, dtype=torch.float64, generator=g, requires_grad=True)
    out = torch.randn(len(numbers), tokens, out_width, dtype=torch.float64, generator=g, requires_grad=True)
    a_s = [torch.randn(r, width, dtype=torch.float64, generator=g, requires_grad=True) for r in ranks]
    b_s = [torch.randn(out_width, r, dtype=torch.float64, generator=g, requires_grad=i != frozen)
           for i, r in enumerate(ranks)]
    mask = routes.mask_of(ranks, scales, torch.float64, groups, group)
    dy = torch.randn(out.shape, dtype=torch.float64, generator=g)
    trained = [x, out, *a_s, *(b for b in b_s if b.requires_grad)]
    y = routes.JoinedLora.apply(x, out, mask, ranks, rows, *a_s, *b_s)
    got = torch.autograd.grad(y, trained, dy)
    want_y = out.clone()
    for i, n in enumerate(numbers):
        if n < groups:
            want_y = want_y.index_add(0, torch.tensor([i]), scales[n] * (x[i:i + 1] @ a_s[n].t()) @ b_s[n].t())
    want = torch.autograd.grad(want_y, trained, dy)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-12, atol=1e-12)
