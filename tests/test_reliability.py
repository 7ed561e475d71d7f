"""The guarantees under a careful and a hostile user (issue 22): names, all-or-nothing passes, merges that keep
the function or refuse, safe merges, bit-exact unmerge, threads and processes, and the save that touches only
the adapter's own files."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import surgery
import surgery.engine.merge
from surgery import tiny
from surgery.engine.host import Host
from surgery.errors import LedgerError, NotMergeableError
from tests.conftest import ids, logits
from tests.fingerprint import assert_unchanged, fingerprint


def randomize(model, seed: int = 0, std: float = 0.05, only: str | None = None) -> None:
    """Give every trainable tensor (of attachment `only`, if given) random values around its own."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (only is None or f".{only}." in name):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return bool((a.float() - b.float()).abs().max() <= tol * (1 + b.float().abs().max()))


# ---- 1. names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["x.y", "", "../../x", "a b", "float", "train", "keys", "x" * 65, "-a", 3, None])
def test_bad_names_are_refused_before_anything_changes(bad):
    model = tiny.build("llama")
    before = fingerprint(model)
    with pytest.raises(LedgerError, match="is not valid"):
        surgery.attach(model, "lora-qv", name=bad)
    assert_unchanged(model, before, f"name {bad!r}")
    surgery.attach(model, "lora-qv", name="ok")  # the next attach does not nest a wrapper
    assert type(model.model.layers[0].self_attn.q_proj.base) is nn.Linear
    with pytest.raises(LedgerError, match="is not valid"):
        surgery.combine(model, {"ok": 1.0}, name=bad)


@pytest.mark.parametrize("at", [1, 3, 4])
def test_a_failure_in_the_hosts_add_at_a_later_site_rolls_back(monkeypatch, at):
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="first")
    before = fingerprint(model)
    calls, original = [], Host.add

    def flaky(self, name, branch):
        calls.append(name)
        if len(calls) == at:
            raise RuntimeError("add failed")
        original(self, name, branch)

    monkeypatch.setattr(Host, "add", flaky)
    with pytest.raises(RuntimeError, match="add failed"):
        surgery.attach(model, "lora-all-linear", name="second")
    monkeypatch.undo()
    assert_unchanged(model, before)
    surgery.attach(model, "lora-all-linear", name="second")
    assert all(type(h.base) is nn.Linear for h in model.modules() if isinstance(h, Host))


# ---- 2. merging beside other attachments ----------------------------------------------------------------------

def test_merge_beside_ia3_keeps_the_function_or_refuses():
    model = tiny.build("llama")
    x = ids()
    surgery.attach(model, "lora-qv", name="l")
    surgery.attach(model, "ia3", name="i")
    randomize(model, std=0.3)
    reference = logits(model, x)
    state = fingerprint(model)
    with pytest.raises(NotMergeableError, match=r"'i' merged into the weights at 'model\.layers\.0\.self_attn\.v_proj'.*'l'"):
        surgery.merge(model, "i")
    assert_unchanged(model, state)
    surgery.merge(model, "l")  # l comes first: its addition is folded under i's scaling
    assert close(logits(model, x), reference)
    surgery.merge(model, "i")
    assert close(logits(model, x), reference)
    assert surgery.active(model) == ["l", "i"]
    state = fingerprint(model)
    with pytest.raises(NotMergeableError, match="'i' merged"):  # i merged again over an unmerged l would not commute
        surgery.unmerge(model, "l")
    assert_unchanged(model, state)
    surgery.unmerge(model, "i")
    surgery.unmerge(model, "l")
    assert close(logits(model, x), reference)


@pytest.mark.parametrize("first, second", [("ia3", "lora-qv"), ("adapter-houlsby", "lora-all-linear")])
def test_merging_lora_behind_a_non_additive_branch_is_refused(first, second):
    model = tiny.build("llama")
    surgery.attach(model, first, name="before")
    surgery.attach(model, second, name="l")
    randomize(model, std=0.3)
    state = fingerprint(model)
    with pytest.raises(NotMergeableError, match=r"'before' \(attached earlier\) changes the output"):
        surgery.merge(model, "l")
    with pytest.raises(NotMergeableError):
        surgery.bake(model, "l")
    assert_unchanged(model, state)


def test_input_scaling_beside_lora_and_attach_beside_a_merged_scaling():
    model = tiny.build("llama")
    x = ids()
    down = surgery.RuleSet(name="d", rules=[surgery.Rule(select=surgery.Selector(roles=["mlp.down"]), method="lora")])
    surgery.attach(model, down, name="l")
    surgery.attach(model, "ia3", name="i")  # scales the input of down_proj, which l reads too
    randomize(model, std=0.3)
    reference = logits(model, x)
    with pytest.raises(NotMergeableError, match="may read the input"):
        surgery.merge(model, "i")
    surgery.merge(model, "l")
    surgery.merge(model, "i")
    assert close(logits(model, x), reference)
    surgery.unmerge(model, "i")
    surgery.unmerge(model, "l")
    surgery.detach(model, "l")
    reference = logits(model, x)
    surgery.merge(model, "i")
    state = fingerprint(model)
    with pytest.raises(NotMergeableError, match="cannot attach 'late' at 'model.layers.0.mlp.down_proj' while 'i' is merged"):
        surgery.attach(model, down, name="late")
    assert_unchanged(model, state)
    assert close(logits(model, x), reference)


def test_merged_attachments_count_as_active():
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="a")
    surgery.attach(model, "lora-qv", name="b")
    randomize(model)
    surgery.set_active(model, ["b"])
    surgery.merge(model, "a")  # a acts now, so it is active
    assert surgery.active(model) == ["a", "b"]
    with pytest.raises(LedgerError, match="'a' is merged into the weights and keep acting"):
        surgery.set_active(model, [])
    assert surgery.active(model) == ["a", "b"]
    surgery.unmerge(model, "a")
    surgery.set_active(model, [])
    assert surgery.active(model) == []
    with surgery.disabled(model), pytest.raises(LedgerError, match="inside surgery.disabled"):
        surgery.merge(model, "a")


# ---- 3. non-finite and overflowing updates ----------------------------------------------------------------------

def test_nan_in_an_update_is_refused_by_merge_and_bake_naming_the_site():
    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="a")
    randomize(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.branches["a"].lora_B[3, 0] = float("nan")
    state = fingerprint(model)
    for merge in (lambda: surgery.merge(model, "a"), lambda: surgery.merge(model, "a", exact=False),
                  lambda: surgery.bake(model, "a")):
        with pytest.raises(NotMergeableError, match=r"merge at 'model\.layers\.1\.self_attn\.v_proj' refused.*non-finite"):
            merge()
        assert_unchanged(model, state)


@pytest.mark.parametrize("method", ["loha", "lokr", "oft", "vera"])
def test_every_merging_method_refuses_a_non_finite_update_naming_the_site(method):
    if method not in surgery.plugin.manager().methods:
        pytest.skip(f"{method} is not installed")
    model = tiny.build("llama")
    surgery.attach(model, method, name="a")
    randomize(model)
    with torch.no_grad():
        branch = model.model.layers[1].self_attn.v_proj.branches["a"]
        trained = [p for p in branch.parameters() if p.requires_grad and p.is_floating_point()]
        trained[-1].view(-1)[0] = float("inf") if method == "oft" else float("nan")
    state, x = fingerprint(model), ids()
    with torch.no_grad():
        surgery.set_active(model, [])
        base = logits(model, x)
        surgery.set_active(model, ["a"])
    for merge in (lambda: surgery.merge(model, "a"), lambda: surgery.merge(model, "a", exact=False),
                  lambda: surgery.bake(model, "a")):
        with pytest.raises(NotMergeableError, match=r"merge at 'model\.layers\.1\.self_attn\.v_proj' refused"):
            merge()
        assert_unchanged(model, state)
    surgery.detach(model, "a")
    with torch.no_grad():
        assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize("method", ["loha", "lokr", "vera"])
def test_additive_methods_merge_beside_ia3_as_lora_does(method):
    """LoHa, LoKr and VeRA fold as additions: merged under an earlier IA3 output scaling they would act before it,
    so the merge is refused; attached before IA3 they merge and keep the function."""
    if method not in surgery.plugin.manager().methods:
        pytest.skip(f"{method} is not installed")
    x = ids()
    model = tiny.build("llama")
    surgery.attach(model, "ia3", name="i")
    surgery.attach(model, method, name="a")
    randomize(model, std=0.2)
    state = fingerprint(model)
    with pytest.raises(NotMergeableError, match="'i' \\(attached earlier\\) changes the output"):
        surgery.merge(model, "a")
    assert_unchanged(model, state)
    model = tiny.build("llama")
    surgery.attach(model, method, name="a")
    surgery.attach(model, "ia3", name="i")
    randomize(model, std=0.2)
    with torch.no_grad():
        before = logits(model, x)
        surgery.merge(model, "a")
        assert close(logits(model, x), before)
        surgery.merge(model, "i")
        assert close(logits(model, x), before)


def test_overflow_is_refused_and_an_inexact_merge_that_would_lose_the_base_is_refused():
    model = tiny.build("llama", dtype=torch.float16)
    surgery.attach(model, "lora-qv", name="a")
    with torch.no_grad():
        branch = model.model.layers[0].self_attn.q_proj.branches["a"]
        branch.lora_A.fill_(100.0)
        branch.lora_B.fill_(100.0)  # 8 * 100 * 100 * scale 1 = 80,000 > the largest float16
    state = fingerprint(model)
    with pytest.raises(NotMergeableError, match="overflows float16"):
        surgery.merge(model, "a")
    assert_unchanged(model, state)

    model = tiny.build("llama")
    x = ids()
    surgery.attach(model, "lora-qv", name="a")
    with torch.no_grad():
        branch = model.model.layers[0].self_attn.q_proj.branches["a"]
        branch.lora_A.fill_(1e6)
        branch.lora_B.zero_()[0] = 1e6  # row 0 of the update is ~1e13: the weight's row 0 drowns in it
    state = fingerprint(model)
    with pytest.raises(NotMergeableError, match="inexact unmerge"):
        surgery.merge(model, "a", exact=False)
    assert_unchanged(model, state)
    surgery.merge(model, "a")  # the exact merge keeps what rounding loses: its unmerge gives the row back
    surgery.unmerge(model, "a")
    assert_unchanged(model, state)
    assert torch.isfinite(logits(model, x)).all()


# ---- 7, 8. bit-exact means bit-exact --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_keeps_negative_zeros_of_a_pruned_model(dtype):
    model = tiny.build("llama", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                pruned = torch.rand(p.shape, generator=g) < 0.3
                p[pruned] = torch.where(torch.rand(p.shape, generator=g) < 0.5, -0.0, 0.0)[pruned].to(dtype)
    negative = sum(int((torch.signbit(p) & (p == 0)).sum()) for p in model.parameters())
    assert negative > 1000
    before = fingerprint(model)
    surgery.attach(model, "lora-all-linear", name="a")
    randomize(model, std=0.2)
    surgery.merge(model, "a")
    surgery.unmerge(model, "a")
    surgery.detach(model, "a")
    assert_unchanged(model, before)


def test_a_refused_bake_is_rolled_back_bit_for_bit():
    model = tiny.build("llama")
    surgery.attach(model, "ia3", name="a")
    randomize(model, std=0.3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.branches["a"].ia3_l[5] = 0.0  # the last site
    state = fingerprint(model)
    with pytest.raises(NotMergeableError, match="down_proj' cannot be merged"):
        surgery.bake(model, "a")
    assert_unchanged(model, state)


# ---- 9. passes that fail half-way -------------------------------------------------------------------------------

def test_a_detach_that_fails_at_the_second_site_changes_nothing(monkeypatch):
    model = tiny.build("llama")
    x = ids()
    surgery.attach(model, "lora-qv", name="a")
    randomize(model)
    adapted, state = logits(model, x), fingerprint(model)
    calls, original = [], Host.remove

    def flaky(self, name):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("remove failed")
        return original(self, name)

    monkeypatch.setattr(Host, "remove", flaky)
    with pytest.raises(RuntimeError, match="remove failed"):
        surgery.detach(model, "a")
    monkeypatch.undo()
    assert_unchanged(model, state)
    assert torch.equal(logits(model, x), adapted)
    surgery.detach(model, "a")
    assert "_surgery_ledger" not in model.__dict__


def test_an_unmerge_whose_re_merge_fails_changes_nothing(monkeypatch):
    model = tiny.build("llama", dtype=torch.bfloat16)
    x = ids()
    surgery.attach(model, "lora-qv", name="a")
    surgery.attach(model, "lora-attention", name="b")
    randomize(model, std=0.3)
    surgery.merge(model, "a")
    surgery.merge(model, "b")
    merged, state = logits(model, x), fingerprint(model)
    calls, original = [], surgery.engine.merge.apply_edit

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # while b is merged again after a came out
            raise RuntimeError("re-merge failed")
        return original(*args, **kwargs)

    monkeypatch.setattr(surgery.engine.merge, "apply_edit", flaky)
    with pytest.raises(RuntimeError, match="re-merge failed"):
        surgery.unmerge(model, "a")
    monkeypatch.undo()
    assert_unchanged(model, state)
    assert surgery.active(model) == ["a", "b"] and torch.equal(logits(model, x), merged)


# ---- 10. threads ----------------------------------------------------------------------------------

def test_threads_attaching_to_one_model_take_turns():
    for trial in range(6):
        model = tiny.build("llama")
        before = fingerprint(model)
        errors, start = [], threading.Barrier(3)

        def work(name, rules):
            try:
                start.wait()
                surgery.attach(model, rules, name=name)
                surgery.set_active(model, surgery.active(model))
                with surgery.per_sample(model, [name, None]):
                    pass
            except Exception as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=work, args=a) for a in (("a", "lora-qv"), ("b", "lora-all-linear"), ("c", "ia3"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        q = model.model.layers[0].self_attn.q_proj
        assert set(q.branches) == {"a", "b"} and type(q.base) is nn.Linear
        assert set(surgery.plugin.attachments(model)) == {"a", "b", "c"}
        for name in ("a", "b", "c"):
            surgery.detach(model, name)
        assert_unchanged(model, before, f"trial {trial}")


def test_a_merged_attachment_changed_while_merged_still_unmerges_bit_for_bit():
    model = tiny.build("llama", dtype=torch.bfloat16)
    before = fingerprint(model)
    surgery.attach(model, "lora-all-linear", name="a")
    randomize(model, std=0.3)
    surgery.merge(model, "a")
    randomize(model, seed=1, std=0.3)  # e.g. a state dict loaded into the merged branches
    changed = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    surgery.unmerge(model, "a")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in changed.items())  # the new values are kept
    surgery.detach(model, "a")
    assert_unchanged(model, before)


@pytest.mark.parametrize("rules", ["adapter-parallel", "lora-attention"])
def test_detaching_a_deep_copy_leaves_the_original_alone(rules):
    import copy

    model = tiny.build("llama")
    x = ids()
    surgery.attach(model, rules, name="a")
    randomize(model)
    adapted, state = logits(model, x), fingerprint(model)
    twin = copy.deepcopy(model)
    surgery.detach(twin, "a")  # the plugins' undo closures act on the copy's branches, not the original's
    assert_unchanged(model, state)
    assert torch.equal(logits(model, x), adapted)
    if rules == "lora-attention":
        assert model.model.layers[0].self_attn.q_proj.branches["a"].shared is not None


# ---- the guarantees for what main added: parameter sites, plain save_pretrained, task-head copies on bake --------

def _Once(real, k: int):
    """`real` (a method), but raising at its k-th call (once)."""
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise RuntimeError(f"injected at call {k}")
        return real(*args, **kwargs)

    return step


EXPERT_RULES = surgery.RuleSet(name="experts", rules=[surgery.Rule(
    select=surgery.Selector(kinds=["experts"]), method="lora", params={"r": 2, "alpha": 4})])


@pytest.mark.parametrize("at", [1, 2])
def test_a_failing_attach_on_expert_parameters_rolls_the_parametrizations_back(monkeypatch, at):
    from surgery.engine.host import ParameterHost
    from tests import zoo

    torch.manual_seed(0)
    model = zoo.build("mixtral")
    before = fingerprint(model)
    monkeypatch.setattr(ParameterHost, "add", _Once(ParameterHost.add, at))
    with pytest.raises(RuntimeError, match="injected"):
        surgery.attach(model, EXPERT_RULES, name="a")
    monkeypatch.undo()
    assert_unchanged(model, before)
    surgery.attach(model, EXPERT_RULES, name="a")
    surgery.detach(model, "a")
    assert_unchanged(model, before)


def test_a_failing_detach_on_expert_parameters_puts_the_same_parametrizations_back(monkeypatch):
    from surgery.engine.host import ParameterHost
    from tests import zoo

    torch.manual_seed(0)
    model = zoo.build("mixtral")
    original = fingerprint(model)
    surgery.attach(model, EXPERT_RULES, name="a")
    randomize(model)
    x = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).logits
    before = fingerprint(model)
    monkeypatch.setattr(ParameterHost, "remove", _Once(ParameterHost.remove, 2))
    with pytest.raises(RuntimeError, match="injected"):
        surgery.detach(model, "a")
    monkeypatch.undo()
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(x).logits, expected)
    surgery.merge(model, "a")
    surgery.unmerge(model, "a")
    surgery.detach(model, "a")
    assert_unchanged(model, original)


def test_a_failing_detach_puts_the_plain_save_pretrained_back(monkeypatch, tmp_path):
    from surgery.engine.plain_save import PlainSave

    model = tiny.build("llama")
    surgery.attach(model, "lora-qv", name="a")
    assert isinstance(model.__dict__.get("save_pretrained"), PlainSave)
    before = fingerprint(model)
    monkeypatch.setattr(surgery.engine.ledger.Ledger, "refresh", _Once(surgery.engine.ledger.Ledger.refresh, 1))
    with pytest.raises(RuntimeError, match="injected"):
        surgery.detach(model, "a")
    monkeypatch.undo()
    assert_unchanged(model, before)
    assert isinstance(model.__dict__.get("save_pretrained"), PlainSave)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "adapters" / "a" / "surgery_adapter.json").is_file()
    surgery.detach(model, "a")
    assert "save_pretrained" not in model.__dict__


def test_a_failing_bake_leaves_the_task_head_copy_as_it_was(monkeypatch):
    from surgery.engine import copies

    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny.config("bert", num_labels=3, pad_token_id=0)).eval()
    surgery.attach(model, "lora-qv", name="a", task="sequence-classification")
    randomize(model)
    before = fingerprint(model)
    real = copies.put_in_place

    def fails_after(ledger, found, journal=None):
        real(ledger, found, journal)
        raise RuntimeError("injected after the copy was put in place")

    monkeypatch.setattr(surgery.engine.passes, "put_in_place", fails_after)
    with pytest.raises(RuntimeError, match="injected"):
        surgery.bake(model, "a")
    monkeypatch.undo()
    assert_unchanged(model, before)
    head = model.classifier.branches["a"].module
    surgery.bake(model, "a")
    assert model.classifier is head and not hasattr(model, "_surgery_ledger")
