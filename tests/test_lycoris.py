"""LoHa and LoKr (LyCORIS): against HF PEFT both ways through the PEFT format (outputs, gradients, counts), the
formulas, role slices of fused projections, merge/unmerge, dropout in training, refusals, a short training run."""
import pytest
import torch
from peft import LoHaConfig, LoKrConfig, get_peft_model

import surgery
from surgery import tiny
from surgery.errors import AdapterFileError, RuleFileError, SurgeryError
from surgery_plugins.loha import Loha, LohaPart
from surgery_plugins.lokr import LokrParams, factorization, lokr_shapes
from tests.conftest import assert_bit_identical, ids, logits, snapshot
from tests.method_checks import (branches, count, merge_unmerge_detach, nudge, peft_both_ways,
                                 training_changes_only_the_method)

TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def peft_param(inner, path, name):
    return getattr(inner.get_submodule(path), name)["default"]


def lycoris(n):
    return "hada_" in n or "lokr_" in n


def qv(method, **params):
    return surgery.RuleSet(name=method, rules=[surgery.Rule(
        select=surgery.Selector(roles=["attention.query", "attention.value"]), method=method, params=params)])


@pytest.mark.parametrize("arch", list(TARGETS))
def test_loha_matches_peft_both_ways(tmp_path, arch):
    config = LoHaConfig(r=4, alpha=6, target_modules=TARGETS[arch], rank_pattern={TARGETS[arch][0]: 2},
                        alpha_pattern={TARGETS[arch][1]: 3})
    peft_both_ways(tmp_path, arch, config, peft_param, lycoris)


@pytest.mark.parametrize("arch, options", [("llama", dict(r=2, decompose_both=True)),
                                           ("llama", dict(r=8, decompose_factor=4, rank_dropout_scale=True)),
                                           ("bert", dict(r=2, decompose_both=True)), ("bert", dict(r=16))])
def test_lokr_matches_peft_both_ways(tmp_path, arch, options):
    config = LoKrConfig(alpha=6, target_modules=TARGETS[arch], init_weights="lycoris", **options)
    peft_both_ways(tmp_path, arch, config, peft_param, lycoris)


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("method, config", [("loha", LoHaConfig), ("lokr", LoKrConfig)])
def test_trainable_counts_equal_peft(arch, method, config):
    model = tiny.build(arch)
    theirs = get_peft_model(tiny.build(arch), config(r=8, alpha=8, target_modules=TARGETS[arch]))
    assert surgery.plan(model, method).trainable == count(theirs)
    for r, extra in [(2, dict(decompose_both=True)), (3, dict(decompose_factor=8))] if method == "lokr" else [(3, {})]:
        theirs = get_peft_model(tiny.build(arch), config(r=r, alpha=8, target_modules=TARGETS[arch], **extra))
        assert surgery.plan(model, qv(method, r=r, alpha=8, **extra)).trainable == count(theirs)


def test_formulas():
    model = tiny.build("llama")
    surgery.attach(model, qv("loha", r=3, alpha=6), name="h")
    surgery.attach(model, qv("lokr", r=2, alpha=4, decompose_both=True), name="k")
    nudge(model, lycoris)
    h = branches(model, "h")["model.layers.0.self_attn.v_proj"]
    a1, b1, a2, b2 = (getattr(h, n).double() for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    torch.testing.assert_close(h.delta_weight().double(), (a1 @ b1) * (a2 @ b2) * 2.0)
    k = branches(model, "k")["model.layers.0.self_attn.v_proj"]  # [32, 64]: 32 = 4 x 8, 64 = 8 x 8
    assert factorization(32) == (4, 8) and factorization(64) == (8, 8) and factorization(128, 4) == (4, 32)
    w1 = k.lokr_w1_a.double() @ k.lokr_w1_b.double()
    w2 = k.lokr_w2_a.double() @ k.lokr_w2_b.double()
    assert w1.shape == (4, 8) and w2.shape == (8, 8)
    torch.testing.assert_close(k.delta_weight().double(), torch.kron(w1, w2) * 2.0)
    assert lokr_shapes(64, 32, LokrParams(r=8))[2:] == (True, True)  # r >= max(8, 8) / 2: W2 whole


def test_role_slices_of_a_fused_projection():
    model = tiny.build("gpt2")
    site = surgery.inspect(model).site("transformer.h.0.attn.c_attn")
    surgery.attach(model, "loha", name="a")
    nudge(model, lycoris)
    branch = branches(model, "a")["transformer.h.0.attn.c_attn"]
    assert sorted(branch.parts) == ["query", "value"]
    x = torch.randn(2, 5, 64)
    host = model.get_submodule("transformer.h.0.attn.c_attn")
    with torch.no_grad():
        out, base = host(x), host.base(x)
    k = slice(*site.slices["attention.key"][0])
    assert torch.equal(out[..., k], base[..., k])  # the key channels are untouched
    for role, part in branch.parts.items():
        channels = slice(*site.slices[f"attention.{role}"][0])
        torch.testing.assert_close(out[..., channels], base[..., channels] + x @ part.delta_weight().T)
    assert surgery.plan(tiny.build("gpt2"), "loha").trainable == 2 * 2 * 8 * (64 + 64) * 2


@pytest.mark.parametrize("method", ["loha", "lokr"])
@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("bert", torch.float32), ("gpt2", torch.float32),
                                         ("llama", torch.bfloat16)], ids=lambda v: str(v).replace("torch.", ""))
def test_merge_keeps_outputs_and_unmerge_detach_restore_the_bytes(method, arch, dtype):
    diff = merge_unmerge_detach(arch, method, lycoris, dtype=dtype)
    print(f"{method} {arch} {dtype}: max |logit change| by merge {diff:.2e}")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_training_lowers_the_loss_and_changes_only_the_adapter(method):
    training_changes_only_the_method("llama", qv(method, r=4, alpha=8), lr=2e-2)


def test_rank_and_module_dropout_act_in_training_only():
    model = tiny.build("llama")
    surgery.attach(model, qv("loha", r=4, alpha=8, rank_dropout=0.5), name="a")
    nudge(model, lycoris)
    x = ids()
    with torch.no_grad():
        eval_out = logits(model, x)
        model.train()
        torch.manual_seed(0)
        train_out = logits(model, x)
        model.eval()
        assert not torch.allclose(eval_out, train_out) and torch.equal(logits(model, x), eval_out)
    surgery.detach(model, "a")
    surgery.attach(model, qv("lokr", r=2, alpha=8, module_dropout=0.999999), name="b")
    nudge(model, lycoris)
    with torch.no_grad():
        reference = logits(tiny.build("llama"), x)
        model.train()
        torch.testing.assert_close(logits(model, x), reference, rtol=0, atol=0)  # every branch skipped


def test_peft_options_that_cannot_be_mapped_are_refused(tmp_path):
    base = tiny.build("llama")
    peft_model = get_peft_model(tiny.build("llama"), LoHaConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 layers_to_transform=[1]))
    peft_model.save_pretrained(tmp_path / "layers")
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match="cannot map: layers_to_transform=\\[1\\]"):
        surgery.load(base, tmp_path / "layers")
    assert_bit_identical(base, before)
    gpt2 = tiny.build("gpt2")
    surgery.attach(gpt2, "lokr", name="a")
    with pytest.raises(SurgeryError, match="slices of the fused projection 'transformer.h.0.attn.c_attn' cannot be written"):
        surgery.save(gpt2, tmp_path / "out", name="a", format="peft")
    surgery.detach(gpt2, "a")
    surgery.attach(gpt2, surgery.RuleSet(name="c", rules=[surgery.Rule(select=surgery.Selector(paths=["*.c_attn"]), method="loha")]), name="b")
    with pytest.raises(SurgeryError, match="PEFT's LoHa adapts nn.Linear layers; loha on conv1d site"):
        surgery.save(gpt2, tmp_path / "out", name="b", format="peft")
    surgery.attach(base, surgery.RuleSet(name="m", rules=[
        surgery.Rule(select=surgery.Selector(roles=["attention.query"]), method="lokr", params={"decompose_both": True}),
        surgery.Rule(select=surgery.Selector(roles=["attention.value"]), method="lokr")]), name="m")
    with pytest.raises(SurgeryError, match="decompose_both is one value for the whole adapter"):
        surgery.save(base, tmp_path / "out", name="m", format="peft")


def test_params_are_validated_and_a_failing_attach_changes_nothing(monkeypatch):
    model = tiny.build("llama")
    with pytest.raises(RuleFileError, match="field 'params.decompose_factor'"):
        surgery.plan(model, qv("lokr", decompose_factor=0))
    with pytest.raises(RuleFileError, match="field 'params.rank_dropout'"):
        surgery.plan(model, qv("loha", rank_dropout=1.5))
    surgery.attach(model, "lokr", name="first")
    state = snapshot(model)
    built = []

    def fails_at_the_last_site(self, *args):
        built.append(args)
        if len(built) == 4:
            raise RuntimeError("boom")
        return LohaPart(*args)

    monkeypatch.setattr(Loha, "part", fails_at_the_last_site)
    with pytest.raises(SurgeryError, match="method 'loha' failed at site 'model.layers.1.self_attn.v_proj': boom"):
        surgery.attach(model, "loha", name="a")
    assert_bit_identical(model, state)
    assert list(surgery.plugin.attachments(model)) == ["first"]
