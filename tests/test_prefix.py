"""Prefix tuning and P-tuning v2: against the model's own keys/values of a real context, against HF PEFT, under
generate() (cache, no cache, beam search, left padding), sdpa against eager, a ChatGLM-style core attention,
training, folding the reparameterisation, detach, and bad input."""
import copy
import inspect

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import DynamicCache

import surgery
from surgery import tiny
from surgery.engine.host import Host
from surgery.errors import NotMergeableError, SurgeryError
from surgery_plugins.prefix import freeze_reparam
from tests.conftest import assert_bit_identical, ids, snapshot
from tests.custom_models import TinyGLM

# before transformers 5.15, T5's attention had no sdpa and did not go through the attention interface
# (q, k, v): prefix methods refuse it (SurgeryError), so their T5 tests run from 5.15 on
OLD_T5 = not tiny.supports_sdpa("t5")


def prefix_rules(method: str = "p-tuning-v2", n: int = 5, paths: list[str] | None = None, **params) -> surgery.RuleSet:
    select = surgery.Selector(kinds=["attention"], paths=paths)
    return surgery.RuleSet(name="r", rules=[surgery.Rule(select=select, method=method,
                                                         params={"num_virtual_tokens": n, **params})])


def branches(model, name: str = "a") -> list:
    return list(model._surgery_ledger.attachments[name].branches.values())


def randomize(model, name: str = "a", std: float = 0.5, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in branches(model, name):
            for p in branch.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_of_real_keys_and_values_equals_the_real_context(arch, attn):
    """Prefixes set to the keys/values (after rotary) that the model computes for a context c give the logits of
    the model run on c followed by x, at x's positions: the prefix sits after rotary, and masking is right."""
    model = tiny.build(arch, attn=attn)
    p, n = 5, 7
    c, x = ids(1, p, seed=3), ids(1, n, seed=4)
    # llama: c at negative positions so x keeps 0..n-1 in both runs; gpt2: absolute positions 0..p+n-1
    positions = torch.arange(-p, n)[None] if arch == "llama" else torch.arange(p + n)[None]
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model(c, position_ids=positions[:, :p], use_cache=True, **{cache_name: cache})
        reference = model(torch.cat([c, x], 1), position_ids=positions, use_cache=False).logits[:, p:]
    surgery.attach(model, prefix_rules(n=p), name="a")
    with torch.no_grad():
        for layer, branch in enumerate(branches(model)):
            branch.key.copy_(cache.layers[layer].keys[0])
            branch.value.copy_(cache.layers[layer].values[0])
        out = model(x, position_ids=positions[:, p:], use_cache=False).logits
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_matches_peft(arch):
    """The same prefix tensors in PEFT's PrefixTuning and here give the same logits and prefix gradients. PEFT puts
    the real tokens at positions P.., so ours gets those positions explicitly."""
    p, n = 5, 7
    ours = tiny.build(arch)
    theirs = get_peft_model(copy.deepcopy(ours), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p))
    surgery.attach(ours, prefix_rules(n=p), name="a")
    randomize(ours)
    mine = branches(ours)
    table = theirs.prompt_encoder["default"].embedding.weight  # [P, layers * 2 * kv_heads * head_dim]
    layout = (p, len(mine), 2, mine[0].kv_heads, mine[0].head_dim)
    with torch.no_grad():
        for layer, branch in enumerate(mine):
            table.view(layout)[:, layer, 0].copy_(branch.key.transpose(0, 1))
            table.view(layout)[:, layer, 1].copy_(branch.value.transpose(0, 1))
    x = ids(2, n)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding
    out_ours = ours(x, attention_mask=mask, position_ids=(torch.arange(n) + p).expand(2, -1), use_cache=False).logits
    out_theirs = theirs(input_ids=x, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    (out_ours[mask.bool()].square().mean()).backward()
    (out_theirs[mask.bool()].square().mean()).backward()
    grads = table.grad.view(layout)
    for layer, branch in enumerate(mine):
        torch.testing.assert_close(branch.key.grad, grads[:, layer, 0].transpose(0, 1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(branch.value.grad, grads[:, layer, 1].transpose(0, 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_generate_with_and_without_cache_beam_and_padding(arch):
    if arch == "t5" and OLD_T5:
        pytest.skip("T5 of transformers < 5.15")
    model = tiny.build(arch)
    x = ids(2, 6)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    base = model.generate(x, **greedy)
    surgery.attach(model, "p-tuning-v2", name="a")
    randomize(model, std=1.0)
    cached = model.generate(x, use_cache=True, output_logits=True, return_dict_in_generate=True, **greedy)
    uncached = model.generate(x, use_cache=False, output_logits=True, return_dict_in_generate=True, **greedy)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-5)
    assert torch.equal(model.generate(x, num_beams=3, **greedy), model.generate(x, num_beams=3, use_cache=False, **greedy))
    if arch == "llama":  # the prefix never enters the cache, so static caches work unchanged
        assert torch.equal(model.generate(x, cache_implementation="static", **greedy), cached.sequences)
    if arch != "t5":  # a left-padded row generates what it generates alone
        padded, mask = x.clone(), torch.ones_like(x)
        padded[0, :2], mask[0, :2] = 0, 0
        assert torch.equal(model.generate(padded, attention_mask=mask, **greedy)[0, 2:],
                           model.generate(x[:1, 2:], **greedy)[0])
    with surgery.disabled(model):
        assert torch.equal(model.generate(x, **greedy), base)
    surgery.detach(model, "a")
    assert torch.equal(model.generate(x, **greedy), base)


@pytest.mark.parametrize("arch", ["t5", "bert"])
def test_sdpa_and_eager_agree_with_a_prefix(arch):
    """Encoder self-attention (bidirectional, padding mask), T5's decoder self- and cross-attention and its
    position bias: the sdpa and eager paths widen their masks alike."""
    if arch == "t5" and OLD_T5:
        pytest.skip("T5 of transformers < 5.15")
    outs = []
    x = ids(2, 6)
    mask = torch.ones_like(x)
    mask[1, 4:] = 0
    for attn in ("sdpa", "eager"):
        model = tiny.build(arch, attn=attn)
        surgery.attach(model, "p-tuning-v2", name="a")
        randomize(model, std=1.0)
        kw = {"decoder_input_ids": x} if arch == "t5" else {}
        base = None
        with torch.no_grad(), surgery.disabled(model):
            base = model(input_ids=x, attention_mask=mask, **kw).logits
        with torch.no_grad():
            outs.append(model(input_ids=x, attention_mask=mask, **kw).logits)
        assert (outs[-1] - base).abs().max() > 1e-2  # the prefix does something
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_chatglm_style_core_attention():
    """TinyGLM's core attention takes q, k, v [batch, seq, heads, head_dim] (k, v already repeated to all heads)
    and builds its own square causal mask: the prefix goes in as keys/values with dummy query rows."""
    model = TinyGLM().eval()
    x = ids(2, 8, vocab=96)
    saved, base = snapshot(model), model(x)
    surgery.attach(model, prefix_rules(n=3), name="a", args=(x,))
    assert (model(x) - base).abs().max() > 1e-3
    host = model.encoder.layers[0].self_attention.core_attention
    branch = host.branches["a"].double()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        got = host(q, k, v)
        keys = torch.cat([branch.key.repeat_interleave(2, 0).expand(2, -1, -1, -1), k.transpose(1, 2)], 2)
        values = torch.cat([branch.value.repeat_interleave(2, 0).expand(2, -1, -1, -1), v.transpose(1, 2)], 2)
        scores = q.transpose(1, 2) @ keys.transpose(-1, -2) / 4.0
        seen = torch.cat([torch.ones(8, 3, dtype=torch.bool), torch.ones(8, 8, dtype=torch.bool).tril()], 1)
        expected = (scores.masked_fill(~seen, float("-inf")).softmax(-1) @ values).transpose(1, 2).flatten(2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    branch.float()
    with pytest.raises(SurgeryError, match="qkv_layout"):  # seq 4 == heads 4: the layout cannot be read
        model(ids(2, 4, vocab=96))
    surgery.detach(model, "a")
    assert_bit_identical(model, saved)
    assert torch.equal(model(x), base)
    surgery.attach(model, prefix_rules(n=3, qkv_layout="bshd"), name="b", args=(x,))
    assert model(ids(2, 4, vocab=96)).shape == (2, 4, 96)


def test_two_attachments_detach_and_deepcopy():
    model = tiny.build("llama")
    x = ids()
    saved, base = snapshot(model), model(x).logits
    surgery.attach(model, prefix_rules(), name="a")
    surgery.attach(model, prefix_rules("prefix", n=3, paths=["*.layers.1.*"], reparam_hidden=16), name="b")
    randomize(model, "a")
    surgery.set_active(model, ["b"])
    only_b = model(x).logits
    surgery.set_active(model, ["a", "b"])
    both = model(x).logits
    twin = copy.deepcopy(model)
    surgery.detach(model, "a")  # b keeps running through the switched attention function
    assert model.config._attn_implementation == "surgery_prefix_sdpa"
    torch.testing.assert_close(model(x).logits, only_b, rtol=0, atol=0)
    surgery.detach(model, "b")
    assert model.config._attn_implementation == "sdpa"
    assert_bit_identical(model, saved)
    assert torch.equal(model(x).logits, base)
    assert not any(isinstance(m, Host) for m in model.modules())
    torch.testing.assert_close(twin(x).logits, both, rtol=0, atol=0)  # the copy kept its own prefixes
    surgery.detach(twin, "b")
    surgery.detach(twin, "a")
    assert twin.config._attn_implementation == "sdpa" and torch.equal(twin(x).logits, base)


def test_training_changes_only_the_prefix_and_folding_keeps_outputs():
    model = tiny.build("llama")
    saved = snapshot(model)
    base_params = [(p, p.detach().clone()) for p in model.parameters()]
    surgery.attach(model, prefix_rules("prefix", n=4, reparam_hidden=32, init_std=0.5), name="a")
    before = [(p, p.detach().clone()) for b in branches(model) for p in b.parameters()]
    x = ids(4, 12, seed=5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p, _ in before}
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(x, labels=x, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, old) for p, old in base_params)
    assert all(not torch.equal(p, old) for p, old in before)
    with torch.no_grad():
        reference = model(x).logits
        assert freeze_reparam(model, "a") == 2
        torch.testing.assert_close(model(x).logits, reference, rtol=1e-6, atol=1e-6)
    assert all(b.mlp is None and b.key.requires_grad for b in branches(model))
    with pytest.raises(NotMergeableError):
        surgery.merge(model, "a")
    surgery.detach(model, "a")
    assert_bit_identical(model, saved)


def test_plan_counts_what_attach_creates():
    model = tiny.build("gpt2")
    for rules in ("prefix", "p-tuning-v2"):
        plan = surgery.plan(model, rules)
        surgery.attach(model, rules, name=rules)
        assert plan.trainable == sum(p.numel() for b in branches(model, rules) for p in b.parameters())
        surgery.detach(model, rules)


def test_unsupported_attention_is_refused_and_the_model_untouched():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    AttentionInterface.register("my_kernel", ALL_ATTENTION_FUNCTIONS["sdpa"])  # an implementation prefixes don't know
    AttentionMaskInterface.register("my_kernel", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = tiny.build("llama", attn="my_kernel")
    saved = snapshot(model)
    with pytest.raises(SurgeryError, match=r"model.layers.0.self_attn.*my_kernel"):
        surgery.attach(model, "p-tuning-v2", name="a")
    assert model.config._attn_implementation == "my_kernel"
    assert not any(isinstance(m, Host) for m in model.modules()) and not hasattr(model, "_surgery_ledger")
    assert_bit_identical(model, saved)
