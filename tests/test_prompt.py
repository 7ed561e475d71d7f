"""Prompt tuning and P-tuning: a prompt initialised from token ids equals those tokens in front of the input (every
architecture, with masks, positions, token types and labels), HF PEFT, generate(), training, folding the prompt
encoder, stripping outputs, detach, and bad input."""
import copy

import pytest
import torch
from peft import PromptTuningConfig, get_peft_model

import surgery
from surgery import tiny
from surgery.engine.host import Host
from surgery.errors import NotMergeableError, SurgeryError
from surgery_plugins.prompt import freeze_reparam
from tests.conftest import assert_bit_identical, ids, snapshot
from tests.custom_models import TinyGLM

N = 4


def prompt_rules(method: str = "prompt-tuning", **params) -> surgery.RuleSet:
    return surgery.RuleSet(name="r", rules=[surgery.Rule(
        select=surgery.Selector(roles=["embedding.input"]), exclude=surgery.Selector(paths=["decoder.*"]),
        method=method, params={"num_virtual_tokens": N, **params})])


def branch(model, name: str = "a"):
    (only,) = model._surgery_ledger.attachments[name].branches.values()
    return only


def build(arch: str):
    return TinyGLM().eval() if arch == "glm" else tiny.build(arch)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5", "glm"])
def test_prompt_from_ids_equals_those_tokens_in_front(arch):
    """init: ids makes the virtual tokens the embeddings of real tokens c: the adapted model on x must then be the
    base model on c + x, bit for bit, with the mask, positions, token types and labels extended to match."""
    model = build(arch)
    c, x = ids(1, N, seed=3, vocab=90), ids(2, 6, seed=4, vocab=90)
    cx = torch.cat([c.expand(2, -1), x], 1)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    full_mask = torch.cat([torch.ones(2, N, dtype=mask.dtype), mask], 1)

    def run(inputs, extra):
        if arch == "glm":
            return model(inputs)
        if arch == "t5":
            return model(input_ids=inputs, decoder_input_ids=x, labels=x, **extra)
        return model(input_ids=inputs, **extra)

    extra_x, extra_cx = {}, {}
    if arch != "glm":
        extra_x, extra_cx = {"attention_mask": mask}, {"attention_mask": full_mask}
    if arch in ("llama", "bert"):
        labels = x.clone()
        labels[0, :2] = -100
        extra_x["labels"] = labels
        extra_cx["labels"] = torch.cat([torch.full((2, N), -100), labels], 1)
    if arch == "bert":
        types = torch.ones_like(x)
        extra_x.update(token_type_ids=types, position_ids=torch.arange(6).expand(2, -1))
        extra_cx.update(token_type_ids=torch.cat([torch.zeros(2, N, dtype=types.dtype), types], 1),
                        position_ids=torch.arange(N + 6).expand(2, -1))
    with torch.no_grad():
        reference = run(cx, extra_cx)
    surgery.attach(model, prompt_rules(init="ids", init_ids=c[0].tolist()), name="a",
                   **({"args": (x,)} if arch == "glm" else {}))
    with torch.no_grad():
        out = run(x, extra_x)
    if arch == "glm":
        assert torch.equal(out, reference)
        return
    assert torch.equal(out.logits, reference.logits)
    if "labels" in extra_x or arch == "t5":
        assert torch.equal(out.loss, reference.loss)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_matches_peft(arch):
    ours = tiny.build(arch)
    theirs = get_peft_model(copy.deepcopy(ours), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    surgery.attach(ours, prompt_rules(), name="a")
    table = theirs.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(branch(ours).prompt)
    x = ids(2, 7)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    labels = x.masked_fill(mask == 0, -100)
    out_ours = ours(x, attention_mask=mask, labels=labels)
    out_theirs = theirs(input_ids=x, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, rtol=1e-5, atol=1e-6)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    torch.testing.assert_close(branch(ours).prompt.grad, table.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_generate_equals_the_base_model_on_the_prompt_tokens(arch):
    model = tiny.build(arch)
    c, x = ids(1, N, seed=3), ids(2, 6, seed=4)
    cx = torch.cat([c.expand(2, -1), x], 1)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    reference, reference_beams = model.generate(cx, **greedy), model.generate(cx, num_beams=3, **greedy)
    base = model.generate(x, **greedy)
    surgery.attach(model, prompt_rules(init="ids", init_ids=c[0].tolist()), name="a")
    drop = 0 if arch == "t5" else N  # decoder-only generate returns its input too
    assert torch.equal(model.generate(x, **greedy), reference[:, drop:])
    assert torch.equal(model.generate(x, use_cache=False, **greedy), reference[:, drop:])
    assert torch.equal(model.generate(x, num_beams=3, **greedy), reference_beams[:, drop:])
    if arch != "t5":
        embeds = model.get_input_embeddings()(x)
        assert torch.equal(model.generate(inputs_embeds=embeds, **greedy), reference[:, N + x.shape[1]:])
    surgery.detach(model, "a")
    assert torch.equal(model.generate(x, **greedy), base)


@pytest.mark.parametrize("method,params", [("prompt-tuning", {"init": "vocab"}),
                                           ("p-tuning", {"encoder": "mlp", "encoder_hidden": 32}),
                                           ("p-tuning", {"encoder": "lstm", "encoder_hidden": 16})])
def test_training_changes_only_the_prompt_and_folding_keeps_outputs(method, params):
    model = tiny.build("gpt2")
    saved = snapshot(model)
    base_params = [(p, p.detach().clone()) for p in model.parameters()]
    surgery.attach(model, prompt_rules(method, **params), name="a")
    mine = [(p, p.detach().clone()) for p in branch(model).parameters()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p, _ in mine}
    optimizer = torch.optim.Adam(trainable, lr=3e-2)
    x = ids(4, 10, seed=5)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, old) for p, old in base_params)
    assert all(not torch.equal(p, old) for p, old in mine)
    with torch.no_grad():
        reference = model(x).logits
        assert freeze_reparam(model, "a") == (1 if method == "p-tuning" else 0)
        torch.testing.assert_close(model(x).logits, reference, rtol=1e-6, atol=1e-6)
    assert branch(model).encoder is None and branch(model).prompt.requires_grad
    with pytest.raises(NotMergeableError):
        surgery.merge(model, "a")
    surgery.detach(model, "a")
    assert_bit_identical(model, saved)


def test_strip_disable_and_detach():
    model = tiny.build("llama")
    x = ids()
    saved, base = snapshot(model), model(x).logits
    surgery.attach(model, prompt_rules(), name="a")
    kept = model(x).logits
    assert kept.shape[1] == N + x.shape[1]
    with surgery.disabled(model):
        assert torch.equal(model(x).logits, base)
    surgery.attach(model, prompt_rules(strip=True), name="b")
    surgery.set_active(model, ["b"])
    with torch.no_grad():
        branch(model, "b").prompt.copy_(branch(model, "a").prompt)
    stripped = model(x, output_hidden_states=True)
    assert stripped.logits.shape[1] == x.shape[1] and all(h.shape[1] == x.shape[1] for h in stripped.hidden_states)
    assert torch.equal(stripped.logits, kept[:, N:])
    surgery.detach(model, "a")
    surgery.detach(model, "b")
    assert_bit_identical(model, saved)
    assert torch.equal(model(x).logits, base)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_bad_input_is_refused_and_the_model_untouched():
    model = tiny.build("t5")
    saved = snapshot(model)
    with pytest.raises(SurgeryError, match=r"encoder.embed_tokens.*init_ids \[999\] are outside"):
        surgery.attach(model, prompt_rules(init="ids", init_ids=[5, 999]), name="a")
    everything = surgery.RuleSet(name="r", rules=[surgery.Rule(select=surgery.Selector(roles=["embedding.input"]),
                                                               method="prompt-tuning", params={"num_virtual_tokens": N})])
    with pytest.raises(SurgeryError, match=r"decoder.embed_tokens.*encoder input"):
        surgery.attach(model, everything, name="a")
    assert not hasattr(model, "_surgery_ledger") and not any(isinstance(m, Host) for m in model.modules())
    assert not model.encoder._forward_pre_hooks and not model.decoder._forward_pre_hooks
    assert_bit_identical(model, saved)
    with pytest.raises(Exception, match="init_ids"):
        surgery.attach(model, prompt_rules(init="ids"), name="a")
    llama = tiny.build("llama")
    surgery.attach(llama, prompt_rules(), name="a")
    with pytest.raises(SurgeryError, match="2-D attention_mask"):
        llama(ids(), attention_mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(SurgeryError, match="static"):
        llama.generate(ids(), attention_mask=torch.ones(2, 8), cache_implementation="static", max_new_tokens=2)


# ---- issue 22: routing and exact cached generation ------------------------------------------------------------------

def _random_prompt(model, name="a", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in branch(model, name).parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))


def test_per_sample_routes_prompt_attachments():
    model = tiny.build("llama")
    x = ids(2, 6)
    base = model(x).logits
    surgery.attach(model, prompt_rules(), name="p")
    _random_prompt(model, "p")
    prompted = model(x).logits
    greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    generated = model.generate(x, **greedy)
    with surgery.per_sample(model, [None, None]):  # no sample takes the prompt: no virtual tokens at all
        assert torch.equal(model(x).logits, base)
    surgery.set_active(model, [])
    with surgery.per_sample(model, ["p", "p"]):  # every sample takes it, active or not
        assert torch.equal(model(x).logits, prompted)
        assert torch.equal(model.generate(x, **greedy), generated)
    with pytest.raises(SurgeryError, match="'p' at site 'model.embed_tokens' is routed to some samples only"):
        with surgery.per_sample(model, ["p", None]):
            model(x)
    assert surgery.active(model) == []
    assert torch.equal(model(x).logits, base)


def test_two_prompt_attachments_stack_in_front_of_the_input():
    model = tiny.build("gpt2")
    c1, c2, x = ids(1, N, seed=3, vocab=90), ids(1, N, seed=5, vocab=90), ids(2, 6, seed=4, vocab=90)
    with torch.no_grad():
        reference = model(torch.cat([c2.expand(2, -1), c1.expand(2, -1), x], 1)).logits
    surgery.attach(model, prompt_rules(init="ids", init_ids=c1[0].tolist()), name="p")
    surgery.attach(model, prompt_rules(init="ids", init_ids=c2[0].tolist()), name="q")
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference)  # the later attachment's tokens come first


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method,params", [("prompt-tuning", {}), ("prompt-tuning", {"strip": True}),
                                           ("p-tuning", {"encoder": "lstm", "encoder_hidden": 16})])
def test_cached_generation_equals_full_forwards(arch, method, params):
    """generate() with a cache computes, step by step, what one forward over the whole sequence computes (with
    generate's own position convention), with and without left padding; a padded row generates what it does alone."""
    model = tiny.build(arch)
    surgery.attach(model, prompt_rules(method, **params), name="a")
    _random_prompt(model)
    x, mask = ids(2, 6, seed=7), torch.ones(2, 6, dtype=torch.long)
    x[0, :2], mask[0, :2] = 0, 0
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(x, attention_mask=mask, use_cache=True, **greedy)
    uncached = model.generate(x, attention_mask=mask, use_cache=False, **greedy)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-5, atol=1e-5)
    sequence = cached.sequences
    full_mask = torch.cat([mask, torch.ones(2, sequence.shape[1] - 6, dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(sequence, attention_mask=full_mask, position_ids=positions).logits
    offset = full.shape[1] - sequence.shape[1]  # the virtual positions, unless stripped
    for step, step_logits in enumerate(cached.logits):
        torch.testing.assert_close(step_logits, full[:, offset + 5 + step], rtol=1e-5, atol=1e-5)
    alone = model.generate(x[:1, 2:], use_cache=True, **greedy)
    assert torch.equal(alone.sequences[0], cached.sequences[0, 2:])
    torch.testing.assert_close(torch.stack(alone.logits)[:, 0], torch.stack(cached.logits)[:, 0], rtol=1e-5, atol=1e-5)
