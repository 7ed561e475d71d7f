"""Llama-Adapter (HF PEFT's adaption prompt): against PEFT both ways through the PEFT format (outputs, gradients,
counts) on Llama and GPT-2, sdpa and eager; the zero gate starts the model unchanged; generation with a cache;
other architectures through the attention interface; no merge; the top-L narrowing; a short training run."""
import copy

import pytest
import torch
from peft import AdaptionPromptConfig, get_peft_model

import surgery
from surgery import tiny
from surgery.errors import NotMergeableError, RuleFileError, SurgeryError
from tests.conftest import assert_bit_identical, ids, logits, snapshot
from tests.custom_models import TinyGLM
from tests.method_checks import branches, count, nudge, peft_both_ways, training_changes_only_the_method


def peft_param(inner, path, name):
    return getattr(inner.get_submodule(path), name)


def adaption(n):
    return "adaption_" in n


def rules(**params):
    return surgery.RuleSet(name="la", rules=[surgery.Rule(select=surgery.Selector(kinds=["attention"]),
                                                          method="llama-adapter", params=params)])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layers", [1, 2])
def test_matches_peft_both_ways(tmp_path, arch, layers):
    config = AdaptionPromptConfig(adapter_len=4, adapter_layers=layers, task_type="CAUSAL_LM")
    peft_both_ways(tmp_path, arch, config, peft_param, adaption, std=0.5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainable_counts_equal_peft_and_the_top_layers_are_adapted(arch):
    theirs = get_peft_model(tiny.build(arch), AdaptionPromptConfig(adapter_len=5, adapter_layers=1, task_type="CAUSAL_LM"))
    plan = surgery.plan(tiny.build(arch), rules(adapter_len=5, adapter_layers=1))
    assert plan.trainable == count(theirs) == 5 * 64 + 1
    assert [p.site.path for p in plan.placements] == [{"llama": "model.layers.1.self_attn", "gpt2": "transformer.h.1.attn"}[arch]]
    assert len(surgery.plan(tiny.build(arch), "llama-adapter").placements) == 2  # default: every attention site


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_with_a_cache_equals_peft(attn):
    base = tiny.build("llama", attn=attn)
    theirs = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    ours = copy.deepcopy(base)
    surgery.attach(ours, rules(adapter_len=4), name="a")
    nudge(ours, adaption, std=3.0)
    with torch.no_grad():
        for path, branch in branches(ours, "a").items():
            layer = theirs.base_model.model.get_submodule(path)
            layer.adaption_prompt.copy_(branch.adaption_prompt)
            layer.adaption_gate.copy_(branch.adaption_gate)
    x = ids(batch=1)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = ours.generate(input_ids=x, **kw)
    assert torch.equal(cached, ours.generate(input_ids=x, use_cache=False, **kw))
    assert torch.equal(cached, theirs.generate(input_ids=x, **kw))
    with surgery.disabled(ours):
        assert not torch.equal(cached, ours.generate(input_ids=x, **kw))


def test_the_zero_gate_starts_the_model_unchanged_and_merge_is_refused():
    model, x = tiny.build("llama"), ids()
    before = snapshot(model)
    reference = logits(model, x)
    surgery.attach(model, "llama-adapter", name="a")
    assert model.config._attn_implementation == "surgery_prefix_sdpa"
    with torch.no_grad():
        assert torch.equal(logits(model, x), reference)
    nudge(model, adaption, std=0.5)
    state = snapshot(model)
    with pytest.raises(NotMergeableError, match="method 'llama-adapter'"):
        surgery.merge(model, "a")
    assert_bit_identical(model, state)
    surgery.detach(model, "a")
    assert_bit_identical(model, before)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "bert", "t5"])
def test_other_architectures_through_the_attention_interface(arch):
    if arch == "t5" and not tiny.supports_sdpa("t5"):
        pytest.skip("T5's attention goes through transformers' attention interface from transformers 5.15 on")
    model, x = tiny.build(arch), ids()
    before = snapshot(model)
    with torch.no_grad():
        reference = logits(model, x)
        surgery.attach(model, rules(adapter_len=3, adapter_layers=1), name="a")
        nudge(model, adaption, std=0.5)
        adapted = logits(model, x)
        assert (adapted - reference).abs().max() > 1e-3
        surgery.detach(model, "a")
        assert torch.equal(logits(model, x), reference)
    assert_bit_identical(model, before)


def test_the_formula_on_one_layer():
    model = tiny.build("llama", attn="eager")
    surgery.attach(model, rules(adapter_len=3, adapter_layers=1), name="a")
    nudge(model, adaption, std=0.5)
    branch = branches(model, "a")["model.layers.1.self_attn"]
    attn = model.get_submodule("model.layers.1.self_attn")
    captured = {}
    hook = attn.register_forward_hook(lambda m, a, kw, out: captured.update(kw=kw, out=out), with_kwargs=True)
    x = ids()
    with torch.no_grad():
        logits(model, x)
        hook.remove()
        h, (cos, sin) = captured["kw"]["hidden_states"], captured["kw"]["position_embeddings"]
        base = attn.base
        b, s, _ = h.shape
        q = base.q_proj(h).view(b, s, 4, 16).transpose(1, 2)
        q = q * cos[:, None] + torch.cat([-q[..., 8:], q[..., :8]], dim=-1) * sin[:, None]
        p = branch.adaption_prompt[0]
        k = base.k_proj(p).view(3, 2, 16).transpose(0, 1).repeat_interleave(2, dim=0)
        v = base.v_proj(p).view(3, 2, 16).transpose(0, 1).repeat_interleave(2, dim=0)
        term = branch.adaption_gate * torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        with surgery.disabled(model):
            plain = base(**captured["kw"])[0]
        expected = plain + base.o_proj(term.transpose(1, 2).reshape(b, s, 64))
        torch.testing.assert_close(captured["out"][0], expected, rtol=1e-5, atol=1e-5)


def test_training_lowers_the_loss_and_changes_only_the_adapter():
    training_changes_only_the_method("llama", rules(adapter_len=4), lr=5e-2)


def test_refusals():
    model = tiny.build("llama")
    with pytest.raises(RuleFileError, match="field 'params': adapter_layers is 3, but the rule selects 2 attention sites"):
        surgery.plan(model, rules(adapter_layers=3))
    torch.manual_seed(0)
    glm = TinyGLM().eval()
    args = (torch.randint(0, 96, (2, 8)),)
    with pytest.raises(SurgeryError, match="is not a transformers attention module"):
        surgery.attach(glm, rules(adapter_len=2), name="a", args=args)
    with pytest.raises(SurgeryError, match="PEFT's adaption prompt on gpt2 adds the prompt attention after the output"):
        gpt2 = tiny.build("gpt2")
        surgery.attach(gpt2, rules(adapter_len=2), name="a")
        surgery.save(gpt2, "/nonexistent/never-written", name="a", format="peft")
    bert = tiny.build("bert")
    surgery.attach(bert, rules(adapter_len=2), name="a")
    with pytest.raises(SurgeryError, match="supports model types llama, mistral, gpt2; this model is 'bert'"):
        surgery.save(bert, "/nonexistent/never-written", name="a", format="peft")
