"""Several adapters on one model: per-sample routing (also through generate), combination, deleting one."""
import pytest
import torch

import surgery
from surgery import tiny
from surgery.errors import LedgerError
from tests.conftest import ids, logits


def with_adapters(arch="llama", rules=("lora-attention", "lora-attention"), names=("a", "b"), **build):
    model = tiny.build(arch, **build)
    for name, rule in zip(names, rules):
        surgery.attach(model, rule, name=name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def alone(model, name, x):
    if name is None:
        with surgery.disabled(model):
            return logits(model, x)
    previous = surgery.active(model)
    surgery.set_active(model, [name])
    try:
        return logits(model, x)
    finally:
        surgery.set_active(model, previous)


r4 = surgery.RuleSet(name="r4", rules=[surgery.Rule(select=surgery.Selector(roles=["attention.query", "attention.value"]),
                                                    method="lora", params={"r": 4, "alpha": 4})])


@pytest.mark.parametrize("arch, rules", [("llama", ("lora-attention", r4)),      # batched LoRA path, mixed ranks
                                         ("gpt2", ("lora-qv", "lora-all-linear")),  # sliced c_attn: per-group path
                                         ("t5", ("lora-attention", "lora-attention"))])
def test_mixed_batch_equals_each_sample_alone(arch, rules):
    model = with_adapters(arch, rules)
    x = ids(batch=5)
    names = ["a", None, "b", "a", "b"]
    with surgery.per_sample(model, names):
        mixed = logits(model, x)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone(model, name, x[i:i + 1])[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], alone(model, None, x[:1])[0], atol=1e-3)


def test_mixed_batch_through_generate_and_beams():
    model = with_adapters("llama")
    prompts = ids(batch=3, seq=5)
    names = ["b", "a", None]
    settings = [dict(do_sample=False, max_new_tokens=6), dict(do_sample=False, num_beams=2, max_new_tokens=4)]
    for kw in settings:
        with surgery.per_sample(model, names):
            together = model.generate(prompts, pad_token_id=0, **kw)
        for i, name in enumerate(names):
            if name is None:
                with surgery.disabled(model):
                    single = model.generate(prompts[i:i + 1], pad_token_id=0, **kw)
            else:
                surgery.set_active(model, [name])
                single = model.generate(prompts[i:i + 1], pad_token_id=0, **kw)
                surgery.set_active(model, ["a", "b"])
            assert torch.equal(together[i], single[0]), (kw, name)


def test_routing_in_training_sends_gradients_to_each_samples_adapter():
    model = with_adapters("llama").train()
    x = ids(batch=2)
    with surgery.per_sample(model, ["a", None]):
        model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".a." in n and "lora_A" in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".b." in n)


def test_routing_refuses_bad_names_and_batches():
    model = with_adapters("llama")
    with pytest.raises(LedgerError, match="no attachment named 'zz'"):
        with surgery.per_sample(model, ["a", "zz"]):
            pass
    with pytest.raises(surgery.SurgeryError, match="2 names given for a batch of 3"):
        with surgery.per_sample(model, ["a", "b"]):
            logits(model, ids(batch=3))
    surgery.merge(model, "a")
    with pytest.raises(LedgerError, match="merged"):
        with surgery.per_sample(model, ["a", "b"]):
            pass


def weight_deltas(model, name):
    return {path: b.weight_delta() for path, b in model._surgery_ledger.attachments[name].branches.items()}


def test_combine_cat_is_the_exact_weighted_sum():
    model = with_adapters("llama", ("lora-attention", "lora-attention"))
    surgery.combine(model, {"a": 0.3, "b": -0.7}, name="ab", how="cat")
    da, db, dc = weight_deltas(model, "a"), weight_deltas(model, "b"), weight_deltas(model, "ab")
    for path in da:
        torch.testing.assert_close(dc[path], 0.3 * da[path] - 0.7 * db[path], rtol=1e-5, atol=1e-6)
    assert model._surgery_ledger.attachments["ab"].plan.placements[0].params.r == 16
    # with weights 1 and 1 the combination behaves like both adapters at once
    surgery.combine(model, {"a": 1.0, "b": 1.0}, name="sum", how="cat")
    x = ids()
    surgery.set_active(model, ["a", "b"])
    both = logits(model, x)
    surgery.set_active(model, ["sum"])
    torch.testing.assert_close(logits(model, x), both, rtol=1e-5, atol=1e-5)


def test_combine_linear_and_sliced():
    model = with_adapters("gpt2", ("lora-qv", "lora-qv"))
    surgery.combine(model, {"a": 0.5, "b": 0.5}, name="lin", how="linear")
    path = "transformer.h.0.attn.c_attn"
    branches = {n: model.get_submodule(path).branches[n] for n in ("a", "b", "lin")}
    for role in ("query", "value"):
        pa, pb, pl = (branches[n].parts[role] for n in ("a", "b", "lin"))
        c = (0.5 * pa.scale) ** 0.5
        torch.testing.assert_close(pl.lora_A, c * pa.lora_A + c * pb.lora_A)
        torch.testing.assert_close(pl.lora_B, c * pa.lora_B + c * pb.lora_B)
    with pytest.raises(LedgerError, match="adapt different sites"):
        surgery.attach(model, "lora-all-linear", name="c")
        surgery.combine(model, {"a": 1.0, "c": 1.0}, name="bad")
    assert "bad" not in model._surgery_ledger.attachments


def test_deleting_one_adapter_leaves_the_others():
    model = with_adapters("llama")
    x = ids()
    surgery.set_active(model, ["b"])
    only_b = logits(model, x)
    surgery.detach(model, "a")
    torch.testing.assert_close(logits(model, x), only_b, rtol=0, atol=0)
    assert surgery.active(model) == ["b"]
