"""The ledger and its passes: attach, detach, merge, unmerge, activation, rollback, and exactness."""
import copy

import pytest
import torch

import surgery
from surgery import tiny
from surgery.analysis.facts import analyze
from surgery.engine.host import Host
from surgery.errors import LedgerError, SurgeryError
from tests.conftest import assert_bit_identical, ids, logits, snapshot

ARCHS = ["llama", "gpt2", "bert", "t5", "phi3", "gpt_neox"]


def graph_signature(model):
    facts = analyze(model)
    return (sorted(facts.linears.items()), sorted((k, sorted(v)) for k, v in facts.roles.items()),
            sorted(facts.slices.items()), sorted(facts.attention))


@pytest.mark.parametrize("arch", ARCHS)
def test_attach_merge_unmerge_detach_roundtrip(arch, randomize_lora):
    model = tiny.build(arch)
    x = ids()
    before, modules = snapshot(model), dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    graph = graph_signature(model)
    reference = logits(model, x)

    surgery.attach(model, "lora-all-linear", name="a")
    randomize_lora(model)
    assert any(isinstance(m, Host) for m in model.modules())
    adapted = logits(model, x)
    assert not torch.allclose(adapted, reference, atol=1e-4)

    surgery.merge(model, "a")
    assert not any(h.running for h in model.modules() if isinstance(h, Host))
    torch.testing.assert_close(logits(model, x), adapted, rtol=1e-4, atol=1e-5)
    surgery.unmerge(model, "a")
    torch.testing.assert_close(logits(model, x), adapted, rtol=1e-5, atol=1e-6)
    surgery.merge(model, "a")
    surgery.detach(model, "a")  # detaching a merged attachment unmerges it first, exactly

    assert_bit_identical(model, before)
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(logits(model, x), reference)
    assert graph_signature(model) == graph
    assert "_surgery_ledger" not in model.__dict__


def test_unmerge_is_bit_exact_in_bf16(randomize_lora):
    model = tiny.build("llama", dtype=torch.bfloat16)
    before = snapshot(model)
    surgery.attach(model, "lora-all-linear", name="a")
    randomize_lora(model, std=0.3)
    surgery.merge(model, "a")
    merged_q = model.model.layers[0].self_attn.q_proj.base.weight
    assert not torch.equal(merged_q, before["model.layers.0.self_attn.q_proj.weight"])
    records = [m.record for m in model._surgery_ledger.attachments["a"].merged]
    # bf16 rounding makes (w + d) - d differ from w in places: the ledger keeps exactly those entries, or the
    # whole original weight where that is smaller (most entries differ)
    assert sum(r.fix_index.numel() if r.saved is None else r.saved["weight"].numel() for r in records) > 0
    surgery.unmerge(model, "a")
    surgery.detach(model, "a")
    assert_bit_identical(model, before)


def test_an_exact_undo_compares_bytes_and_keeps_the_whole_weight_where_that_is_smaller():
    from surgery.core.registry import manager
    from surgery.engine.weight_edits import apply_edit, revert_edit

    linear = torch.nn.Linear(16, 8)
    with torch.no_grad():
        linear.weight.mul_(1e-3)
        linear.weight[0, :2] = -0.0
    before = linear.weight.detach().clone()
    fmt = manager().format_of(linear)
    shift = torch.zeros(8, 16)
    shift[0, :2] = 1.0  # (-0.0 + 1) - 1 is +0.0: equal as numbers, not as bytes
    edit = surgery.WeightEdit(apply=lambda w: w + shift, revert=lambda w: w - shift)
    record = apply_edit(fmt, linear, edit)
    assert record.fix_index.tolist() == [0, 1] and record.saved is None
    revert_edit(fmt, linear, edit, record)
    assert torch.equal(linear.weight.detach().view(torch.int32), before.view(torch.int32))
    edit = surgery.WeightEdit(apply=lambda w: w + 0.3, revert=lambda w: w - 0.3)  # few entries round back
    record = apply_edit(fmt, linear, edit)
    assert record.saved is not None and record.fix_index is None
    revert_edit(fmt, linear, edit, record)
    assert torch.equal(linear.weight.detach().view(torch.int32), before.view(torch.int32))


def test_two_attachments_merged_out_of_order_restore_exactly(randomize_lora):
    model = tiny.build("llama", dtype=torch.bfloat16)
    before = snapshot(model)
    surgery.attach(model, "lora-qv", name="a")
    surgery.attach(model, "lora-attention", name="b")
    randomize_lora(model, std=0.3)
    surgery.merge(model, "a")
    surgery.merge(model, "b")
    surgery.unmerge(model, "a")  # b was merged after a on the same sites: taken out and put back around it
    assert model.model.layers[0].self_attn.q_proj.running == ("a",)
    surgery.detach(model, "b")
    surgery.detach(model, "a")
    assert_bit_identical(model, before)


def test_active_selection_and_disabled():
    model = tiny.build("llama")
    x = ids()
    reference = logits(model, x)
    surgery.attach(model, "lora-qv", name="a")
    surgery.attach(model, "lora-qv", name="b")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01 if ".a." in name else -0.02)
    assert surgery.active(model) == ["a", "b"]
    both = logits(model, x)
    surgery.set_active(model, "a")
    only_a = logits(model, x)
    assert surgery.active(model) == ["a"] and not torch.allclose(only_a, both)
    with surgery.disabled(model):
        torch.testing.assert_close(logits(model, x), reference, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, x), only_a, rtol=0, atol=0)
    surgery.set_active(model, ["b", "a"])
    torch.testing.assert_close(logits(model, x), both, rtol=0, atol=0)
    with pytest.raises(LedgerError, match="no attachment named 'c'"):
        surgery.set_active(model, ["c"])
    surgery.detach(model, "a")
    assert surgery.active(model) == ["b"]
    assert "a" not in model.model.layers[0].self_attn.q_proj.branches


def test_clear_errors_change_nothing():
    model = tiny.build("llama")
    with pytest.raises(LedgerError, match="nothing is attached"):
        surgery.detach(model, "x")
    surgery.attach(model, "lora-qv", name="a")
    state = snapshot(model)
    with pytest.raises(LedgerError, match="already exists"):
        surgery.attach(model, "lora-all-linear", name="a")
    with pytest.raises(LedgerError, match="no attachment named 'zzz'"):
        surgery.detach(model, "zzz")
    with pytest.raises(LedgerError, match="not merged"):
        surgery.unmerge(model, "a")
    surgery.merge(model, "a")
    with pytest.raises(LedgerError, match="already merged"):
        surgery.merge(model, "a")
    with pytest.raises(LedgerError, match="unmerge first"):
        with surgery.disabled(model):
            pass
    surgery.unmerge(model, "a")
    assert_bit_identical(model, state)


def test_failed_attach_rolls_back(monkeypatch):
    from surgery_plugins.lora import Lora

    model = tiny.build("llama")
    model.model.layers[1].requires_grad_(False)  # a user's own freezing must survive
    before, modules = snapshot(model), dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    surgery.attach(model, "lora-qv", name="first")
    calls = {"n": 0}
    original = Lora.build

    def flaky(self, site, module, params, roles):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom at the fifth site")
        return original(self, site, module, params, roles)

    monkeypatch.setattr(Lora, "build", flaky)
    with pytest.raises(SurgeryError, match="failed at site 'model.layers.0.mlp.gate_proj'.*boom"):
        surgery.attach(model, "lora-all-linear", name="second")
    monkeypatch.undo()
    assert surgery.active(model) == ["first"]
    assert all("second" not in h.branches for h in model.modules() if isinstance(h, Host))
    surgery.detach(model, "first")
    assert_bit_identical(model, before)
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_failed_install_rolls_back(monkeypatch):
    model = tiny.build("llama")
    before, modules = snapshot(model), dict(model.named_modules())
    import surgery.engine.passes as passes

    real, seen = passes._install, []

    def failing(model_, ledger, path, name, branch, homes):
        if len(seen) == 4:
            raise RuntimeError("install failed")
        seen.append(path)
        real(model_, ledger, path, name, branch, homes)

    monkeypatch.setattr(passes, "_install", failing)
    with pytest.raises(RuntimeError, match="install failed"):
        surgery.attach(model, "lora-all-linear", name="x")
    assert "_surgery_ledger" not in model.__dict__
    assert_bit_identical(model, before)
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert all(p.requires_grad for p in model.parameters())


def test_trainable_parameters_and_freeze():
    model = tiny.build("llama")
    total = sum(p.numel() for p in model.parameters())
    assert surgery.trainable_parameters(model) == (total, total)
    plan = surgery.plan(model, "lora-qv")
    surgery.attach(model, "lora-qv", name="a")
    count = surgery.trainable_parameters(model)
    assert count.trainable == plan.trainable and count.total == total + plan.trainable
    share = 100 * plan.trainable / count.total
    assert str(count) == f"trainable {share:.2f}% ({plan.trainable:,} / {count.total:,})"


def test_t5_input_embeddings_of_encoder_and_decoder(randomize_lora):
    model = tiny.build("t5")
    x = ids()
    reference = logits(model, x)
    ruleset = surgery.RuleSet(name="emb", rules=[surgery.Rule(select=surgery.Selector(roles=["embedding.input"]), method="lora")])
    attachment = surgery.attach(model, ruleset, name="e")
    assert sorted(attachment.branches) == ["decoder.embed_tokens", "encoder.embed_tokens"]
    randomize_lora(model)
    assert not torch.allclose(logits(model, x), reference)
    surgery.detach(model, "e")
    assert torch.equal(logits(model, x), reference)


class TwiceUsed(torch.nn.Module):
    """One linear reachable under two names, applied twice."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.again = self.proj

    def forward(self, x):
        return self.again(torch.relu(self.proj(x)))


def test_module_shared_under_two_names_is_hosted_under_both():
    model = TwiceUsed()
    x = torch.randn(3, 8)
    reference = model(x)
    ruleset = surgery.RuleSet(name="p", rules=[surgery.Rule(select=surgery.Selector(kinds=["linear"]), method="lora")])
    surgery.attach(model, ruleset, name="a", args=(x,))
    assert isinstance(model.proj, Host) and model.again is model.proj
    with torch.no_grad():
        model.proj.branches["a"].lora_B.fill_(0.1)
    assert not torch.allclose(model(x), reference)
    surgery.detach(model, "a")
    assert model.again is model.proj and isinstance(model.proj, torch.nn.Linear)
    assert torch.equal(model(x), reference)


def test_host_forwards_attributes_and_deepcopies():
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="a")
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight is q.base.weight and q.in_features == 64
    twin = copy.deepcopy(model)
    surgery.detach(twin, "a")
    assert isinstance(model.model.layers[0].self_attn.q_proj, Host)
    assert not isinstance(twin.model.layers[0].self_attn.q_proj, Host)
