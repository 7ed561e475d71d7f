"""DoRA: against HF PEFT both ways through the PEFT format (outputs, gradients, counts; dropout in training), the
formula and its cheaper forms against float64, role slices of fused projections, merge/unmerge (bytes, -0.0),
a failing attach, training, and the rest (other methods on the same sites, set_active, disabled, save/load,
torch.compile, gradient checkpointing), refusals."""
import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

import surgery
from surgery import tiny
from surgery.errors import AdapterFileError, MismatchError, SurgeryError
from surgery_plugins import dora
from surgery_plugins.dora import Dora
from tests.conftest import assert_bit_identical, ids, logits, snapshot
from tests.method_checks import (
    branches,
    count,
    merge_unmerge_detach,
    nudge,
    peft_both_ways,
    training_changes_only_the_method,
)

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}
QV = ["attention.query", "attention.value"]


def peft_param(inner, path, name):
    module = inner.get_submodule(path)
    if name == "magnitude":
        return module.lora_magnitude_vector["default"].weight
    return getattr(module, name)["default"].weight


def dora_tensor(name):
    return "lora_" in name or "magnitude" in name


def rule(method="dora", roles=QV, paths=None, **params):
    return surgery.RuleSet(name=method, rules=[surgery.Rule(select=surgery.Selector(roles=roles, paths=paths),
                                                            method=method, params=params)])


@pytest.mark.parametrize("arch, options", [
    ("llama", {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
    ("llama", {"r": 4, "lora_alpha": 6, "use_rslora": True}),
    ("gpt2", {"r": 4, "lora_alpha": 8}),  # c_attn whole: a Conv1D (fan_in_fan_out)
    ("bert", {"r": 4, "lora_alpha": 8}),
])
def test_matches_peft_both_ways(tmp_path, arch, options):
    config = LoraConfig(target_modules=TARGETS[arch], use_dora=True, **options)
    peft_both_ways(tmp_path, arch, config, peft_param, dora_tensor)


def test_dora_on_slices_of_a_fused_projection_is_written_for_peft_exactly(tmp_path):
    base, x = tiny.build("gpt2"), ids()
    ours = copy.deepcopy(base)
    surgery.attach(ours, "dora", name="d")
    nudge(ours, dora_tensor)
    with torch.no_grad():
        expected = logits(ours, x)
    surgery.save(ours, tmp_path / "peft", name="d", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    again = copy.deepcopy(base)
    surgery.load(again, tmp_path / "peft")  # read back as one whole-module DoRA of c_attn
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits(again, x), expected, rtol=1e-5, atol=1e-5)
    print(f"gpt2 q,v slices surgery->PEFT {float((logits(theirs, x) - expected).abs().max()):.2e}")


@pytest.mark.parametrize("arch", list(TARGETS))
def test_trainable_counts_equal_peft_and_plan_shows_them(arch):
    model = tiny.build(arch)
    theirs = get_peft_model(tiny.build(arch), LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS[arch],
                                                         use_dora=True))
    ours = surgery.plan(model, "dora" if arch != "gpt2" else rule(roles=None, paths=["*.c_attn"], r=8, alpha=8))
    assert ours.trainable == count(theirs)
    assert f"{count(theirs):,} new trainable parameters" in str(ours)
    theirs = get_peft_model(tiny.build(arch), LoraConfig(r=3, target_modules=TARGETS[arch], use_dora=True))
    assert surgery.plan(model, rule(roles=None, paths=[f"*.{t}" for t in TARGETS[arch]], r=3)).trainable == count(theirs)
    if arch == "gpt2":  # q and v slices of c_attn: r (in + channels) + channels per role
        site = surgery.inspect(model).site("transformer.h.0.attn.c_attn")
        widths = [b - a for role in QV for a, b in site.slices[role]]
        assert surgery.plan(model, "dora").trainable == 2 * sum(8 * (site.in_features + w) + w for w in widths)


def test_the_formula_and_its_cheaper_forms_against_float64():
    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(24, 16), (4, 16), (24, 4)])
    m, bias, x = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(24,), (24,), (3, 5, 16)])
    s = 1.5
    norm = torch.sqrt(((w + s * b @ a) ** 2).sum(1))
    torch.testing.assert_close(dora.row_norm(w, a, b, s), norm)
    torch.testing.assert_close(dora.row_norm_by_parts(w, a, b, s), norm)
    expected = (m / norm) * (x @ w.T + s * x @ a.T @ b.T) + bias  # y = g ⊙ (W x + ΔW x) + bias
    base_out = x @ w.T + bias
    torch.testing.assert_close(dora.output(base_out, x, w, a, b, s, m), expected)
    torch.testing.assert_close(dora.output(base_out, x, w, a, b, s, m, norm=dora.row_norm_by_parts), expected)
    torch.testing.assert_close(dora.rescaled(base_out, x, bias, a, b, s, m / norm), expected)
    channels = torch.tensor([3, 4, 5, 10, 11])
    rows = w[channels]
    part = (m[channels] / norm[channels]) * (x @ rows.T + s * x @ a.T @ b[channels].T) + bias[channels]
    sliced = dora.output(base_out, x, rows, a, b[channels], s, m[channels], channels=channels)
    torch.testing.assert_close(sliced[..., channels], part)
    others = torch.ones(24, dtype=torch.bool)
    others[channels] = False
    assert torch.equal(sliced[..., others], base_out[..., others])
    fused = dora.rescaled(base_out, x, bias, a, b[channels], s, m[channels] / norm[channels], channels)
    torch.testing.assert_close(fused, sliced)
    # the norm is a constant for autograd: m gets (W x + ΔW x) / n, nothing flows through n
    mm, bb = m.clone().requires_grad_(), b.clone().requires_grad_()
    dora.output(base_out, x, w, a, bb, s, mm).sum().backward()
    torch.testing.assert_close(mm.grad, ((x @ w.T + s * x @ a.T @ b.T) / norm).sum((0, 1)))
    torch.testing.assert_close(bb.grad, (m / norm)[:, None] * s * (x @ a.T).sum((0, 1))[None, :])
    # the same gradients from the base's output alone (the path a site takes without dropout)
    mm, bb = m.clone().requires_grad_(), b.clone().requires_grad_()
    dora.rescaled(base_out, x, bias, a, bb, s, mm / norm).sum().backward()
    torch.testing.assert_close(mm.grad, ((x @ w.T + s * x @ a.T @ b.T) / norm).sum((0, 1)))
    torch.testing.assert_close(bb.grad, (m / norm)[:, None] * s * (x @ a.T).sum((0, 1))[None, :])


@pytest.mark.parametrize("arch, site", [("llama", "model.layers.0.self_attn.q_proj"),
                                        ("gpt2", "transformer.h.0.attn.c_attn"),
                                        ("bert", "bert.encoder.layer.0.attention.self.value")])
def test_each_path_of_a_site_equals_the_float64_formula(arch, site):
    model = tiny.build(arch)
    surgery.attach(model, "dora", name="d")
    nudge(model, dora_tensor, std=0.3)
    host, branch = model.get_submodule(site), branches(model, "d")[site]
    x = torch.randn(2, 5, surgery.inspect(model).site(site).in_features)
    weight = dora.parts_of(branch)[0].dense_weight().double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if host.base.bias is None else host.base.bias.double()
    expected = x.double() @ weight.T + bias
    for part in dora.parts_of(branch):
        c = torch.arange(weight.shape[0]) if part.channels is None else part.channels
        a, b, m = part.lora_A.double(), part.lora_B.double(), part.magnitude.double()
        rows = weight[c]
        n = torch.linalg.norm(rows + part.scale * b @ a, dim=1)
        expected[..., c] = (m / n) * (x.double() @ rows.T + part.scale * x.double() @ a.T @ b.T) + bias[c]
    with torch.no_grad():
        fused = branch.fused_call(host.base, (x,), {})  # alone at its site: from the base's output
        plain = branch.adapt_output((x,), {}, host.base(x))  # the plain formula
        assert fused is not NotImplemented
        torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(host(x), fused, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_dropout_in_training_matches_peft(tmp_path, arch):
    base, x = tiny.build(arch), ids()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                            target_modules=TARGETS[arch], use_dora=True))
    nudge(theirs, dora_tensor)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    surgery.load(ours, tmp_path)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    out_ours = logits(ours, x)
    torch.manual_seed(5)
    out_theirs = logits(theirs, x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    torch.manual_seed(5)
    assert not torch.allclose(logits(ours.eval(), x), out_ours)  # dropout did act
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    inner = theirs.base_model.model
    for path, branch in branches(ours, "default").items():
        for name, p in branch.named_parameters():
            torch.testing.assert_close(p.grad, peft_param(inner, path, name).grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("bert", torch.float32),
                                         ("llama", torch.bfloat16)], ids=lambda v: str(v).replace("torch.", ""))
def test_merge_keeps_outputs_and_unmerge_detach_restore_the_bytes(arch, dtype):
    diff = merge_unmerge_detach(arch, "dora", dora_tensor, dtype=dtype, std=0.3)
    print(f"dora {arch} {dtype}: max |logit change| by merge {diff:.2e}")


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_unmerge_gives_back_negative_zeros(method):
    model = tiny.build("llama")
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[:3, :5] = -0.0
        q.weight[3, :5] = 0.0
    before = snapshot(model)
    surgery.attach(model, rule(method, r=4, alpha=8), name="a")
    nudge(model, lambda n: "lora_" in n or "magnitude" in n)
    surgery.merge(model, "a")
    assert q.weight[:4, :5].abs().min() > 0  # the merge wrote over the zeros
    surgery.unmerge(model, "a")
    now = q.weight  # the base module, inside the Host
    assert now[:3, :5].signbit().all() and not now[3, :5].signbit().any()
    assert torch.equal(now.view(torch.int32), before["model.layers.0.self_attn.q_proj.weight"].view(torch.int32))
    surgery.detach(model, "a")
    assert_bit_identical(model, before)


def test_merge_with_another_method_running_on_the_same_sites_keeps_outputs():
    model, x = tiny.build("llama"), ids()
    before = snapshot(model)
    surgery.attach(model, "lora-qv", name="l")
    surgery.attach(model, rule(r=4, alpha=8), name="d")
    nudge(model, dora_tensor, std=0.2)
    with torch.no_grad():
        both = logits(model, x)
        surgery.merge(model, "d")  # the LoRA still runs on top of the merged weight
        torch.testing.assert_close(logits(model, x), both, rtol=1e-4, atol=1e-4)
        surgery.unmerge(model, "d")
        torch.testing.assert_close(logits(model, x), both, rtol=0, atol=0)
    surgery.detach(model, "d")
    surgery.detach(model, "l")
    assert_bit_identical(model, before)


def test_a_failing_attach_changes_nothing(monkeypatch):
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="first")
    state = snapshot(model)
    built = []
    original = Dora.build

    def fails_at_the_third_site(self, *args):
        built.append(args)
        if len(built) == 3:
            raise RuntimeError("boom")
        return original(self, *args)

    monkeypatch.setattr(Dora, "build", fails_at_the_third_site)
    with pytest.raises(SurgeryError, match="method 'dora' failed at site 'model.layers.1.self_attn.q_proj': boom"):
        surgery.attach(model, "dora", name="d")
    assert_bit_identical(model, state)
    assert list(surgery.plugin.attachments(model)) == ["first"]


def test_training_lowers_the_loss_and_changes_only_the_adapter():
    training_changes_only_the_method("llama", rule(r=4, alpha=8), lr=2e-2)
    model = tiny.build("gpt2").train()  # the magnitude learns too (on the slices of a fused Conv1D)
    surgery.attach(model, "dora", name="d")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    training_steps = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for _ in range(2):
        loss = model(input_ids=x, labels=x).loss
        training_steps.zero_grad()
        loss.backward()
        training_steps.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(n.endswith("magnitude") for n in changed) and any(n.endswith("lora_B") for n in changed)


def test_with_the_rest(tmp_path):
    """With LoRA on the same sites and LoHa on the MLP: set_active, disabled, save/load in surgery's format."""
    model, x = tiny.build("llama"), ids()
    before = snapshot(model)
    with torch.no_grad():
        reference = logits(model, x)
    sets = {"d": rule(r=4, alpha=8, dropout=0.1), "l": "lora-qv", "h": rule("loha", ["mlp.up", "mlp.down"], r=2)}
    for i, (name, rules) in enumerate(sets.items()):
        surgery.attach(model, rules, name=name)
        nudge(model, lambda n, name=name: f".branches.{name}." in n, seed=i, std=0.2)
    with torch.no_grad():
        everything = logits(model, x)
        alone = {}
        for name in sets:
            surgery.set_active(model, [name])
            alone[name] = logits(model, x)
            assert (alone[name] - reference).abs().max() > 1e-3, name
            surgery.save(model, tmp_path / name, name=name)
        surgery.set_active(model, list(sets))
        torch.testing.assert_close(logits(model, x), everything, rtol=0, atol=0)
        with surgery.disabled(model):
            torch.testing.assert_close(logits(model, x), reference, rtol=0, atol=0)
        fresh = tiny.build("llama")
        surgery.load(fresh, tmp_path / "d")
        torch.testing.assert_close(logits(fresh, x), alone["d"], rtol=0, atol=0)
        fresh = tiny.build("llama")
        surgery.attach(fresh, "lora-qv", name="l")
        surgery.load(fresh, tmp_path / "d")
        surgery.set_active(fresh, ["d"])
        torch.testing.assert_close(logits(fresh, x), alone["d"], rtol=0, atol=0)
    for name in sets:
        surgery.detach(model, name)
    assert_bit_identical(model, before)


def test_a_forward_under_torch_compile_equals_eager():
    torch._dynamo.reset()
    model, x = tiny.build("llama").train(), ids()
    surgery.attach(model, rule(r=4, alpha=8), name="d")
    nudge(model, dora_tensor, std=0.2)
    eager = model(input_ids=x).logits
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # no graph break in DoRA's forward
    out = compiled(input_ids=x).logits
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
    surgery.detach(compiled, "d")
    assert not any(isinstance(m, surgery.Host) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    def grads(checkpointing):
        model = tiny.build(arch).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        surgery.attach(model, rule(r=4, alpha=8, dropout=0.2), name="d")
        nudge(model, dora_tensor, std=0.2)
        torch.manual_seed(123)
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)


def test_peft_options_that_cannot_be_mapped_are_refused(tmp_path):
    base = tiny.build("llama")
    before = snapshot(base)
    peft_model = get_peft_model(tiny.build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                use_dora=True, layers_to_transform=[1]))
    peft_model.save_pretrained(tmp_path / "layers")
    with pytest.raises(AdapterFileError, match="cannot map: layers_to_transform=\\[1\\]"):
        surgery.load(base, tmp_path / "layers")
    peft_model = get_peft_model(tiny.build("llama"), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"],
                                                                use_dora=True))
    peft_model.save_pretrained(tmp_path / "embedding")
    with pytest.raises(MismatchError, match="site 'model.embed_tokens' is a embedding layer; surgery's dora adapts"):
        surgery.load(base, tmp_path / "embedding")
    peft_model = get_peft_model(tiny.build("llama"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    peft_model.save_pretrained(tmp_path / "flag")
    config = (tmp_path / "flag" / "adapter_config.json")
    config.write_text(config.read_text().replace('"use_dora": true', '"use_dora": false'))
    with pytest.raises(MismatchError, match="a DoRA magnitude \\(lora_magnitude_vector\\) but use_dora is not set"):
        surgery.load(base, tmp_path / "flag")
    assert_bit_identical(base, before)
    surgery.attach(base, surgery.RuleSet(name="m", rules=[
        surgery.Rule(select=surgery.Selector(roles=["attention.query"]), method="dora"),
        surgery.Rule(select=surgery.Selector(roles=["attention.value"]), method="lora")]), name="m")
    with pytest.raises(SurgeryError, match="use_dora is one flag for the whole adapter"):
        surgery.save(base, tmp_path / "out", name="m", format="peft")
    assert not (tmp_path / "out").exists()


def test_a_zero_magnitude_is_not_merged():
    model = tiny.build("llama")
    before = snapshot(model)
    surgery.attach(model, rule(r=4, alpha=8), name="d")
    with torch.no_grad():
        branches(model, "d")["model.layers.1.self_attn.v_proj"].magnitude[2] = 0.0
    with pytest.raises(surgery.plugin.NotMergeableError, match="dora at 'model.layers.1.self_attn.v_proj'"):
        surgery.merge(model, "d")
    surgery.detach(model, "d")
    assert_bit_identical(model, before)


def test_the_plain_formula_runs_where_another_branch_shares_the_site():
    """With LoRA on the same site the Host runs both in turn: DoRA then reads W x from the weight (not the base
    output, which the LoRA changed)."""
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="l")
    surgery.attach(model, rule(r=4, alpha=8), name="d")
    nudge(model, dora_tensor, std=0.2)
    path = "model.layers.0.self_attn.q_proj"
    host, part, lora = model.get_submodule(path), branches(model, "d")[path], branches(model, "l")[path]
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        w = host.base.weight
        n = torch.linalg.norm(w + part.scale * part.lora_B @ part.lora_A, dim=1)
        expected = (F.linear(x, w) + lora.delta(x)) + (part.magnitude / n - 1) * F.linear(x, w) \
            + part.magnitude / n * part.scale * F.linear(F.linear(x, part.lora_A), part.lora_B)
        torch.testing.assert_close(host(x), expected, rtol=1e-5, atol=1e-5)


def test_on_a_quantized_linear_dora_reads_the_dequantized_weight():
    from tests.test_quantized import glm, glm_ids, same_bytes, stored_bytes

    model, x = glm(8), glm_ids()
    stored = stored_bytes(model)
    rules = surgery.RuleSet(name="dq", rules=[surgery.Rule(select=surgery.Selector(kinds=["quantized_linear"]),
                                                           method="dora", params={"r": 4, "alpha": 8})])
    with torch.no_grad():
        reference = model(x)
    surgery.attach(model, rules, name="d", args=(x,))
    nudge(model, dora_tensor, std=0.2)
    path = "encoder.layers.0.self_attention.query_key_value"
    host, part = model.get_submodule(path), branches(model, "d")[path]
    h = torch.randn(2, 3, part.lora_A.shape[1])
    with torch.no_grad():
        assert not torch.equal(model(x), reference)
        w = host.base.dequantized(torch.float64)
        n = torch.linalg.norm(w + part.scale * part.lora_B.double() @ part.lora_A.double(), dim=1)
        bias = 0 if host.base.bias is None else host.base.bias.double()
        expected = (part.magnitude.double() / n) * (h.double() @ w.T + part.scale * h.double() @ part.lora_A.double().T
                                                    @ part.lora_B.double().T) + bias
        torch.testing.assert_close(host(h).double(), expected, rtol=1e-4, atol=1e-4)
        adapted = model(x)
        surgery.merge(model, "d", into="float")
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-4)
        surgery.unmerge(model, "d")
    surgery.detach(model, "d")
    assert same_bytes(stored_bytes(model), stored)


def test_per_sample_routing_runs_each_sample_through_its_own_adapter():
    model, x = tiny.build("llama"), ids(batch=3)
    surgery.attach(model, rule(r=4, alpha=8), name="d")
    surgery.attach(model, "lora-qv", name="l")
    nudge(model, dora_tensor, std=0.2)
    with torch.no_grad():
        alone = {}
        for name in ("d", "l"):
            surgery.set_active(model, [name])
            alone[name] = logits(model, x)
        with surgery.disabled(model):
            alone[None] = logits(model, x)
        surgery.set_active(model, ["d", "l"])
        with surgery.per_sample(model, ["d", None, "l"]):
            routed = logits(model, x)
    for i, name in enumerate(["d", None, "l"]):
        torch.testing.assert_close(routed[i], alone[name][i], rtol=1e-5, atol=1e-5)


def test_the_norm_of_a_bf16_weight_is_read_without_widening_it_and_stays_accurate():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g).bfloat16()
    a, b = (torch.randn(*shape, generator=g) * 0.1 for shape in [(16, 128), (256, 16)])
    for a_, b_ in ((a.bfloat16(), b.bfloat16()), (a, b)):  # adapters in the model's dtype, and in float32
        exact = torch.linalg.norm(w.double() + 2.0 * b_.double() @ a_.double(), dim=1)
        n = dora.row_norm_by_parts(w, a_, b_, 2.0)
        assert n.dtype == torch.float32
        # bf16 itself resolves 3.9e-3: the norm (then g = m / n) is far inside one of its steps
        assert ((n.double() - exact).abs() / exact).max() < 2e-4
