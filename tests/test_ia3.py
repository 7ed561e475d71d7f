"""IA3: against HF PEFT with the same vectors, fused-projection slices, exact merge/unmerge (bias included),
refusal of zero entries, parameter counts, and a short training run."""
import copy

import pytest
import torch
from peft import IA3Config, get_peft_model

import surgery
from surgery import tiny
from surgery.engine.host import Host
from surgery.errors import NotMergeableError, RuleFileError, SurgeryError
from tests.conftest import assert_bit_identical, ids, logits, snapshot, train_steps
from tests.custom_models import Misnamed, TinyGLM

PEFT_TARGETS = {  # arch: (target_modules, feedforward_modules), as PEFT names them
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (r".*\.(key|value)|.*layer\.\d+\.output\.dense", r".*layer\.\d+\.output\.dense"),
}


def branches(model, name="a"):
    return model._surgery_ledger.attachments[name].branches


def base_state(model) -> dict[str, torch.Tensor]:
    """The base tensors under their original names, wherever a Host holds them now."""
    return {k.replace(".base.", "."): v.detach().clone() for k, v in model.state_dict().items() if ".branches." not in k}


def randomize_ia3(model, name="a", seed=0, spread=0.3):
    """Vectors away from one (and from zero), so every IA3 branch changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in branches(model, name).values():
            l = branch.ia3_l
            l.copy_((1 + spread * torch.randn(l.shape, generator=g)).clamp_min(0.05).to(l.dtype))


@pytest.mark.parametrize("arch", list(PEFT_TARGETS))
def test_ia3_matches_peft(arch):
    ours = tiny.build(arch)
    targets, feedforward = PEFT_TARGETS[arch]
    theirs = get_peft_model(copy.deepcopy(ours), IA3Config(target_modules=targets, feedforward_modules=feedforward))
    surgery.attach(ours, "ia3", name="a")
    inner = theirs.base_model.model
    ours_paths = set(branches(ours))
    theirs_paths = {n for n, m in inner.named_modules() if hasattr(m, "ia3_l") and "default" in m.ia3_l}
    assert ours_paths == theirs_paths
    randomize_ia3(ours)
    with torch.no_grad():
        for path, branch in branches(ours).items():
            layer = inner.get_submodule(path)
            assert layer.is_feedforward == (branch.side == "input")
            layer.ia3_l["default"].copy_(branch.ia3_l.reshape(layer.ia3_l["default"].shape))
    x = ids()
    out_ours, out_theirs = logits(ours, x), logits(theirs, x)
    assert not torch.allclose(out_ours, logits(tiny.build(arch), x), atol=1e-3)  # the vectors do act
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    for path, branch in branches(ours).items():
        grad = inner.get_submodule(path).ia3_l["default"].grad
        torch.testing.assert_close(branch.ia3_l.grad, grad.flatten(), rtol=1e-4, atol=1e-6)
    assert surgery.trainable_parameters(ours).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    print(f"{arch}: max |logit diff| vs PEFT {float((out_ours - out_theirs).detach().abs().max()):.2e}")


def _kv_reference(model, path, x, l_full):
    """float64 reference for an output-scaled fused projection: (x W^T + b) * l over all channels."""
    module = model.get_submodule(path)
    base = module.base if isinstance(module, Host) else module
    w = base.weight.double().T if type(base).__name__ == "Conv1D" else base.weight.double()  # dense [out, in]
    return (x.double() @ w.T + base.bias.double()) * l_full.double()


@pytest.mark.parametrize("arch", ["gpt2", "misnamed"])
def test_fused_projection_scales_only_key_and_value_channels(arch):
    if arch == "gpt2":
        model, args, path, width = tiny.build("gpt2"), None, "transformer.h.0.attn.c_attn", 64
    else:
        torch.manual_seed(0)
        model, path, width = Misnamed().eval(), "stack.0.mix.proj_in", 32
        args = (torch.randint(0, 50, (2, 8)),)
    rules = surgery.RuleSet(name="kv", rules=[surgery.Rule(select=surgery.Selector(roles=["attention.key", "attention.value"]),
                                                           method="ia3")])
    report = surgery.inspect(model, args=args)
    site = report.site(path)
    before = snapshot(model)
    surgery.attach(model, rules, name="a", args=args)
    branch = branches(model)[path]
    kv = sorted(c for r in ("attention.key", "attention.value") for a, b in site.channels(r) for c in range(a, b))
    q = [c for a, b in site.channels("attention.query") for c in range(a, b)]
    assert branch.ia3_l.numel() == len(kv) == 2 * width
    assert sorted(branch.channels.tolist()) == kv
    randomize_ia3(model)
    l_full = branch.vector().detach()
    assert torch.all(l_full[q] == 1) and not torch.any(l_full[kv] == 1)
    x = torch.randn(3, site.in_features)
    host = model.get_submodule(path)
    with torch.no_grad():
        torch.testing.assert_close(host(x).double(), _kv_reference(model, path, x, l_full), rtol=1e-5, atol=1e-5)
        adapted = host(x)
        surgery.merge(model, "a")
        merged_state = snapshot(model)
        torch.testing.assert_close(host(x), adapted, rtol=1e-5, atol=1e-5)  # the bias is scaled too
    name = f"{path}.base.weight"
    w0, w1 = before[name.replace(".base", "")], merged_state[name]
    dense0, dense1 = (w0.T, w1.T) if arch == "gpt2" else (w0, w1)  # Conv1D stores [in, out]
    assert torch.equal(dense0[q], dense1[q]) and not torch.equal(dense0[kv], dense1[kv])
    surgery.detach(model, "a")
    assert_bit_identical(model, before)


@pytest.mark.parametrize("arch,dtype", [(a, d) for a in ["llama", "bert", "gpt2", "t5"] for d in (torch.float32, torch.bfloat16)]
                         + [("glm", torch.float32)], ids=lambda v: str(v).replace("torch.", ""))  # the custom TinyGLM does not run in bf16 (its rotary is float32)
def test_merge_matches_branches_and_unmerge_is_bit_exact(arch, dtype):
    if arch == "glm":
        torch.manual_seed(0)
        model, x = TinyGLM().to(dtype).eval(), torch.randint(0, 96, (2, 8))
        args, run = (x,), (lambda m: m(x))
    else:
        model, x = tiny.build(arch, dtype=dtype), ids()
        args, run = None, (lambda m: logits(m, x))
    before = snapshot(model)
    with torch.no_grad():
        reference = run(model)
        surgery.attach(model, "ia3", name="a", args=args)
        assert torch.equal(run(model), reference)  # ones: the model starts unchanged
        randomize_ia3(model)
        adapted = run(model)
        assert not torch.allclose(adapted, reference, atol=1e-3)
        surgery.merge(model, "a")
        merged = base_state(model)
        assert merged.keys() == before.keys() and any(not torch.equal(merged[k], v) for k, v in before.items())
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
        torch.testing.assert_close(run(model), adapted, **tol)
        surgery.unmerge(model, "a")
        assert torch.equal(run(model), adapted)
        surgery.detach(model, "a")
    assert_bit_identical(model, before)
    assert not any(isinstance(m, Host) for m in model.modules())


def test_biased_key_value_merge_scales_the_bias():
    model = tiny.build("bert")
    before = snapshot(model)
    surgery.attach(model, "ia3", name="a")
    randomize_ia3(model)
    key = "bert.encoder.layer.0.attention.self.key"
    down = "bert.encoder.layer.0.output.dense"
    l_key, l_down = branches(model)[key].ia3_l.detach().clone(), branches(model)[down].ia3_l.detach().clone()
    surgery.merge(model, "a")
    now = model.state_dict()
    torch.testing.assert_close(now[f"{key}.base.bias"], before[f"{key}.bias"] * l_key, rtol=0, atol=1e-7)
    torch.testing.assert_close(now[f"{key}.base.weight"], before[f"{key}.weight"] * l_key[:, None], rtol=0, atol=1e-7)
    assert torch.equal(now[f"{down}.base.bias"], before[f"{down}.bias"])  # input scaling leaves the bias alone
    torch.testing.assert_close(now[f"{down}.base.weight"], before[f"{down}.weight"] * l_down[None, :], rtol=0, atol=1e-7)
    surgery.detach(model, "a")
    assert_bit_identical(model, before)


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_merging_a_zero_entry_is_refused_and_changes_nothing(bad):
    model = tiny.build("llama")
    surgery.attach(model, "ia3", name="a")
    randomize_ia3(model)
    late = "model.layers.1.mlp.down_proj"  # the last site: every earlier site is merged before the refusal
    with torch.no_grad():
        branches(model)[late].ia3_l[5] = bad
    state, x = snapshot(model), ids()
    with torch.no_grad():
        adapted = logits(model, x)
    with pytest.raises(NotMergeableError, match=r"ia3 at 'model\.layers\.1\.mlp\.down_proj' cannot be merged.*index 5"):
        surgery.merge(model, "a")
    now = snapshot(model)
    assert list(now) == list(state)
    for key, value in state.items():  # bit for bit (NaN where the vector had one)
        torch.testing.assert_close(now[key], value, rtol=0, atol=0, equal_nan=True)
    assert model._surgery_ledger.attachments["a"].merged is None
    assert all(h.running == ("a",) for h in model.modules() if isinstance(h, Host))
    with torch.no_grad():
        torch.testing.assert_close(logits(model, x), adapted, rtol=0, atol=0, equal_nan=True)


def test_plan_counts_and_trainable_parameters():
    for arch, expected in [("llama", 2 * (32 + 32 + 96)), ("gpt2", 2 * (64 + 64 + 256)), ("bert", 2 * (64 + 64 + 96))]:
        model = tiny.build(arch)
        plan = surgery.plan(model, "ia3")
        assert plan.trainable == expected
        total = sum(p.numel() for p in model.parameters())
        surgery.attach(model, "ia3", name="a")
        assert tuple(surgery.trainable_parameters(model)) == (expected, total + expected)


def test_params_are_validated_and_input_scaling_of_a_slice_is_refused():
    model = tiny.build("gpt2")
    bad = surgery.RuleSet(name="bad", rules=[surgery.Rule(select=surgery.Selector(roles=["mlp.down"]), method="ia3",
                                                          params={"scale": "sideways"})])
    with pytest.raises(RuleFileError, match="rule 0, field 'params.scale'"):
        surgery.plan(model, bad)
    sliced = surgery.RuleSet(name="sliced", rules=[surgery.Rule(select=surgery.Selector(roles=["attention.value"]),
                                                                method="ia3", params={"scale": "input"})])
    before = snapshot(model)
    with pytest.raises(SurgeryError, match="cannot scale the input of 'transformer.h.0.attn.c_attn' for attention.value"):
        surgery.attach(model, sliced, name="a")
    assert_bit_identical(model, before)
    assert "_surgery_ledger" not in model.__dict__


def test_training_changes_only_the_vectors():
    model = tiny.build("llama")
    before = snapshot(model)
    surgery.attach(model, "ia3", name="a")
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(b.ia3_l) for b in branches(model).values()}
    x = ids(batch=4, seq=12)
    losses = train_steps(model, params, x, lr=0.05)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.all(b.ia3_l == 1) for b in branches(model).values())
    surgery.detach(model, "a")  # detach touches no base tensor: they are as before training, bit for bit
    assert_bit_identical(model, before)
