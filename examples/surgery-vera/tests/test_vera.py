"""The VeRA plugin package: installed through its entry point, its rule file found; against HF PEFT both ways
through the PEFT format (outputs, gradients, counts, the shared projections drawn alike); role slices of GPT-2's
fused c_attn; merge/unmerge/detach; a short training run; with other methods, torch.compile and checkpointing."""
import copy
import os

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model
from surgery_vera import projections

import surgery
from surgery import tiny
from surgery.plugin import AdapterFileError, SurgeryError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"]}


def ids(batch=2, seq=8, seed=1):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    return model(input_ids=x).logits


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, saved):
    now = model.state_dict()
    assert list(now) == list(saved)
    for k, v in saved.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


def count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def nudge(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vera_lambda" in n:
                p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def branches(model, name):
    return surgery.plugin.attachment(model, name).branches


def vera(**params):
    return surgery.RuleSet(name="v", rules=[surgery.Rule(select=surgery.Selector(roles=["attention.query", "attention.value"]),
                                                         method="vera", params=params)])


def test_the_plugin_comes_from_its_entry_point_with_its_rule_file():
    from importlib.metadata import entry_points

    assert "surgery_vera" in {ep.value for ep in entry_points(group="surgery")}
    assert surgery.plan(tiny.build("llama"), "vera").placements[0].method == "vera"
    assert "VERA" in surgery.plugin.peft_mappings()


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("save_projection", [True, False])
def test_matches_peft_both_ways(tmp_path, arch, save_projection):
    base = tiny.build(arch)
    config = VeraConfig(r=16, target_modules=TARGETS[arch], projection_prng_key=7, save_projection=save_projection)
    theirs = get_peft_model(copy.deepcopy(base), config)
    nudge(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    surgery.load(ours, tmp_path / "peft", name="p")
    assert surgery.trainable_parameters(ours).trainable == count(theirs)
    owner = next(iter(branches(ours, "p").values()))
    assert torch.equal(owner.vera_A, theirs.base_model.vera_A["default"])  # drawn alike, or read from the file
    assert torch.equal(owner.vera_B, theirs.base_model.vera_B["default"])
    x = ids()
    out_ours, out_theirs = logits(ours, x), logits(theirs, x)
    assert (out_ours - logits(base, x)).abs().max() > 1e-3
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    inner = theirs.base_model.model
    for path, branch in branches(ours, "p").items():
        for name in ("vera_lambda_b", "vera_lambda_d"):
            other = getattr(inner.get_submodule(path), name)["default"]
            torch.testing.assert_close(getattr(branch, name).grad, other.grad, rtol=1e-4, atol=1e-6)
    surgery.save(ours, tmp_path / "back", name="p", format="peft")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(logits(again, x), out_ours, rtol=1e-5, atol=1e-5)
    print(f"vera {arch}: PEFT->surgery {float((out_ours - out_theirs).detach().abs().max()):.2e}, "
          f"surgery->PEFT {float((logits(again, x) - out_ours).detach().abs().max()):.2e}")


def test_trainable_counts_equal_peft():
    for arch in ("llama", "bert"):
        theirs = get_peft_model(tiny.build(arch), VeraConfig(r=256, target_modules=TARGETS[arch]))
        assert surgery.plan(tiny.build(arch), "vera").trainable == count(theirs)


def test_role_slices_of_gpt2_c_attn_are_written_to_peft_exactly(tmp_path):
    model, x = tiny.build("gpt2"), ids()
    surgery.attach(model, vera(r=16), name="v")
    branch = branches(model, "v")["transformer.h.0.attn.c_attn"]
    assert branch.vera_lambda_b.numel() == 128  # q and v channels only
    assert surgery.plan(tiny.build("gpt2"), vera(r=16)).trainable == 2 * (128 + 16)
    nudge(model)
    expected = logits(model, x)
    surgery.save(model, tmp_path / "out", name="v", format="peft")
    theirs = PeftModel.from_pretrained(tiny.build("gpt2"), tmp_path / "out")
    torch.testing.assert_close(logits(theirs, x), expected, rtol=1e-5, atol=1e-5)
    host = model.get_submodule("transformer.h.0.attn.c_attn")
    h = torch.randn(2, 3, 64)
    with torch.no_grad():
        assert torch.equal(host(h)[..., 64:128], host.base(h)[..., 64:128])  # the key channels are untouched


@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_merge_keeps_outputs_and_unmerge_detach_restore_the_bytes(arch, dtype):
    model, x = tiny.build(arch, dtype=dtype), ids()
    before = state(model)
    with torch.no_grad():
        reference = logits(model, x)
        surgery.attach(model, vera(r=32), name="v")
        assert torch.equal(logits(model, x), reference)  # Λ_b starts at zero
        nudge(model, std=0.5)
        adapted = logits(model, x)
        assert (adapted - reference).abs().max() > 1e-3
        weights = {k: v for k, v in state(model).items() if ".branches." not in k}
        surgery.merge(model, "v")
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)
        torch.testing.assert_close(logits(model, x), adapted, **tol)
        print(f"vera {arch} {dtype}: merge changes logits by {float((logits(model, x) - adapted).abs().max()):.2e}")
        surgery.unmerge(model, "v")
        now = model.state_dict()
        assert all(torch.equal(now[k], v) for k, v in weights.items())
        assert torch.equal(logits(model, x), adapted)
        surgery.detach(model, "v")
    assert_same(model, before)


def test_training_lowers_the_loss_and_changes_only_the_vectors():
    model, x = tiny.build("llama").train(), ids()
    surgery.attach(model, vera(r=64), name="v")
    before = state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=5e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {k for k, v in state(model).items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("vera_lambda_b", "vera_lambda_d")) for k in changed), changed


def test_with_other_methods_compile_and_checkpointing(tmp_path):
    torch._dynamo.reset()
    model, x = tiny.build("llama").train(), ids()
    before = state(model)
    surgery.attach(model, vera(r=32), name="v")
    surgery.attach(model, "lora-qv", name="l")
    nudge(model)
    eager = model(input_ids=x, labels=x)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(input_ids=x, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(input_ids=x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)
    model.gradient_checkpointing_disable()
    model.eval()
    with torch.no_grad():
        surgery.set_active(model, ["v"])
        alone = logits(model, x)
        surgery.save(model, tmp_path / "v", name="v")
        fresh = tiny.build("llama")
        surgery.load(fresh, tmp_path / "v")
        assert torch.equal(logits(fresh, x), alone)
        with surgery.disabled(model):
            assert torch.equal(logits(model, x), logits(tiny.build("llama"), x))
    surgery.detach(model, "l")
    surgery.detach(model, "v")
    assert_same(model, before)


def test_refusals(tmp_path):
    model = tiny.build("llama")
    two = surgery.RuleSet(name="two", rules=[
        surgery.Rule(select=surgery.Selector(roles=["attention.query"]), method="vera", params={"r": 8}),
        surgery.Rule(select=surgery.Selector(roles=["attention.value"]), method="vera", params={"r": 16})])
    before = state(model)
    with pytest.raises(SurgeryError, match="need one r and one projection_prng_key"):
        surgery.attach(model, two, name="v")
    assert_same(model, before)
    theirs = get_peft_model(tiny.build("llama"), VeraConfig(r=8, target_modules=["q_proj"], bias="all"))
    theirs.save_pretrained(tmp_path / "bias")
    with pytest.raises(AdapterFileError, match="cannot map: bias='all'"):
        surgery.load(model, tmp_path / "bias")
    assert_same(model, before)
    a, b = projections(4, 8, 6, key=3)
    assert a.shape == (4, 8) and b.shape == (6, 4) and torch.equal(a, projections(4, 8, 6, key=3)[0])
