"""LoRA against HF PEFT: the same A/B weights in both give the same outputs and gradients (float32)."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import surgery
from surgery import tiny
from tests.conftest import ids, logits

CASES = {
    # name: (arch, surgery rules, peft target_modules, fan_in_fan_out)
    "llama-qv": ("llama", "lora-qv", ["q_proj", "v_proj"], False),
    "llama-all-linear": ("llama", "lora-all-linear", "all-linear", False),
    "gpt2-c_attn": ("gpt2", surgery.RuleSet(name="c_attn", rules=[surgery.Rule(
        select=surgery.Selector(paths=["*.c_attn"]), method="lora", params={"r": 8, "alpha": 16})]), ["c_attn"], True),
    "bert-qv": ("bert", "lora-qv", ["query", "value"], False),
}


def lora_pairs(ours, peft_model, name="a"):
    """(our branch, peft layer) for every adapted path."""
    pairs = []
    inner = peft_model.base_model.model
    for path in ours._surgery_ledger.attachments[name].branches:
        pairs.append((ours.get_submodule(path).branches[name], inner.get_submodule(path)))
    return pairs


@pytest.mark.parametrize("case", list(CASES))
def test_lora_matches_peft(case):
    arch, rules, targets, fan_in_fan_out = CASES[case]
    ours = tiny.build(arch)
    theirs = get_peft_model(copy.deepcopy(ours), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                            fan_in_fan_out=fan_in_fan_out))
    surgery.attach(ours, rules, name="a")
    pairs = lora_pairs(ours, theirs)
    assert len(pairs) == len([n for n, _ in theirs.named_modules() if n.endswith("lora_A.default")])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for branch, layer in pairs:
            assert branch.lora_A.shape == layer.lora_A["default"].weight.shape
            branch.lora_A.copy_(torch.randn(branch.lora_A.shape, generator=g) * 0.1)
            branch.lora_B.copy_(torch.randn(branch.lora_B.shape, generator=g) * 0.1)
            layer.lora_A["default"].weight.copy_(branch.lora_A)
            layer.lora_B["default"].weight.copy_(branch.lora_B)
    x = ids()
    out_ours, out_theirs = logits(ours, x), logits(theirs, x)
    with surgery.disabled(ours):
        base = logits(ours, x)
    assert (out_ours - base).abs().max() > 1e-3, "the LoRA branches did not change the output"
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    worst = 0.0
    for branch, layer in pairs:
        for mine, other in ((branch.lora_A, layer.lora_A["default"].weight), (branch.lora_B, layer.lora_B["default"].weight)):
            torch.testing.assert_close(mine.grad, other.grad, rtol=1e-4, atol=1e-6)
            worst = max(worst, float((mine.grad - other.grad).abs().max()))
    print(f"{case}: max |logit diff| {float((out_ours - out_theirs).detach().abs().max()):.2e}, max |grad diff| {worst:.2e}")
    # the trainable parameter sets agree too
    ours_trainable = surgery.trainable_parameters(ours).trainable
    theirs_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert ours_trainable == theirs_trainable


def test_merged_matches_peft_merge():
    ours = tiny.build("llama")
    theirs = get_peft_model(copy.deepcopy(ours), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    surgery.attach(ours, "lora-all-linear", name="a")
    with torch.no_grad():
        for branch, layer in lora_pairs(ours, theirs):
            branch.lora_B.normal_(std=0.05)
            layer.lora_A["default"].weight.copy_(branch.lora_A)
            layer.lora_B["default"].weight.copy_(branch.lora_B)
    surgery.merge(ours, "a")
    merged = theirs.merge_and_unload()
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(merged, x), rtol=1e-5, atol=1e-5)
    w_ours = ours.model.layers[0].self_attn.q_proj.base.weight
    torch.testing.assert_close(w_ours, merged.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=1e-6)
