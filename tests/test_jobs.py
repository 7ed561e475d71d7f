"""Several jobs trained at once on one base (surgery.jobs): each job's loss and gradients equal training it alone,
its optimizer steps only its attachment, and batches of different lengths are padded without changing a result."""
import pytest
import torch

import surgery
from surgery import tiny


def model_with(names, arch="llama"):
    model = tiny.build(arch)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    for name in names:
        surgery.attach(model, "lora-qv", name=name)
    with torch.no_grad():  # non-zero B, so every branch acts and has gradients to A
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def params_of(model, name):
    """Attachment `name`'s trainable parameters by qualified name (checked against surgery.adapter_parameters)."""
    by_name = {n: p for n, p in model.named_parameters() if f".branches.{name}." in n}
    assert {id(p) for p in by_name.values()} == {id(p) for p in surgery.adapter_parameters(model, name)}
    return by_name


def batches(vocab=100):
    g = torch.Generator().manual_seed(7)
    short = torch.randint(1, vocab, (2, 5), generator=g)
    mask = torch.ones_like(short)
    mask[1, 4:] = 0  # a job's own padding
    return {"a": {"input_ids": torch.randint(1, vocab, (1, 9), generator=g)},
            "b": {"input_ids": short, "attention_mask": mask},
            "c": {"input_ids": torch.randint(1, vocab, (3, 7), generator=g)}}


def equal_batches(vocab=100):
    """Jobs of one length, no masks: the joint step passes none (the model's own causal attention)."""
    g = torch.Generator().manual_seed(8)
    return {n: {"input_ids": torch.randint(1, vocab, (b, 6), generator=g)} for n, b in (("a", 1), ("b", 2), ("c", 1))}


@pytest.mark.parametrize("arch, make", [("llama", batches), ("gpt2", batches), ("llama", equal_batches)])
def test_each_job_steps_as_if_trained_alone(arch, make):
    names = ["a", "b", "c"]
    joint, alone = model_with(names, arch), model_with(names, arch)
    data = make()
    opts = {n: torch.optim.SGD(params_of(joint, n).values(), lr=1.0) for n in names}  # the update is the gradient
    before = {n: {k: v.detach().clone() for k, v in params_of(joint, n).items()} for n in names}
    losses = surgery.jobs(joint, opts).step(data)
    for n in names:
        surgery.set_active(alone, [n])
        batch = data[n]
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        labels = batch["input_ids"].masked_fill(mask == 0, -100)
        opt = torch.optim.SGD(params_of(alone, n).values(), lr=1.0)
        loss = alone(input_ids=batch["input_ids"], attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        assert losses[n].dim() == 0 and not losses[n].requires_grad  # read when the caller wants (no sync)
        assert abs(float(losses[n]) - loss.item()) < 1e-5
        grads = {k: p.grad.clone() for k, p in params_of(alone, n).items()}
        opt.step()
        for k, p in params_of(joint, n).items():
            assert not torch.equal(p, before[n][k])  # the job moved
            torch.testing.assert_close(p, params_of(alone, n)[k], rtol=1e-5, atol=1e-6)
        assert all(g.abs().sum() > 0 for g in grads.values())


def test_a_step_over_some_jobs_leaves_the_others_untouched():
    model = model_with(["a", "b"])
    opts = {n: torch.optim.SGD(params_of(model, n).values(), lr=0.1) for n in "ab"}
    before = {k: v.detach().clone() for k, v in params_of(model, "b").items()}
    surgery.jobs(model, opts).step({"a": batches()["a"]})
    assert all(torch.equal(p, before[k]) for k, p in params_of(model, "b").items())
    assert all(p.grad is None for p in params_of(model, "b").values())


def test_unknown_jobs_are_refused_by_name():
    model = model_with(["a"])
    with pytest.raises(surgery.SurgeryError, match="zzz"):
        surgery.jobs(model, {"zzz": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)})
    jobs = surgery.jobs(model, {"a": torch.optim.SGD(params_of(model, "a").values(), lr=1)})
    with pytest.raises(surgery.SurgeryError, match="'q'"):
        jobs.step({"q": batches()["a"]})


def test_cuda_graph_refuses_an_optimizer_that_cannot_be_captured_naming_its_job():
    model = model_with(["a", "b"])
    opts = {"a": torch.optim.AdamW(params_of(model, "a").values(), capturable=True),
            "b": torch.optim.AdamW(params_of(model, "b").values())}
    with pytest.raises(surgery.SurgeryError, match="job 'b'.*capturable=True"):
        surgery.jobs(model, opts, cuda_graph=True)


def test_cuda_graph_refuses_batches_off_cuda_and_changes_nothing():
    model = model_with(["a"])
    opt = torch.optim.AdamW(params_of(model, "a").values(), capturable=False)
    opt.param_groups[0]["capturable"] = True  # as made on a GPU; the batches below are on the CPU
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    jobs = surgery.jobs(model, {"a": opt}, cuda_graph=True)
    with pytest.raises(surgery.SurgeryError, match="cuda_graph=True.*on cpu"):
        jobs.step({"a": batches()["a"]})
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()) and not opt.state
    assert all(p.grad is None for p in params_of(model, "a").values())


def test_jobs_of_one_dropout_rate_route_together_without_reading_the_device(monkeypatch):
    """What a CUDA graph of the step needs (jobs(cuda_graph=True)): no generic routing (`nonzero`, which waits for
    the device) when every job has the same dropout rate."""
    model = tiny.build("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    rules = surgery.RuleSet(name="d", rules=[surgery.Rule(
        select=surgery.Selector(kinds=["linear"]), exclude=surgery.Selector(roles=["lm_head"]), method="lora",
        params={"r": 4, "alpha": 8, "dropout": 0.1})])
    for name in "ab":
        surgery.attach(model, rules, name=name)
    model.train()
    opts = {n: torch.optim.SGD(params_of(model, n).values(), lr=0.1) for n in "ab"}
    before = {n: {k: v.detach().clone() for k, v in params_of(model, n).items()} for n in "ab"}

    def refuse(*args, **kwargs):
        raise AssertionError("nonzero: the generic routing ran")
    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    losses = surgery.jobs(model, opts).step({n: equal_batches()[n] for n in "ab"})
    assert all(torch.isfinite(v) for v in losses.values())
    for n in "ab":  # both jobs trained (B starts at zero, so A moves from the second step: B is checked)
        moved = [k for k, p in params_of(model, n).items() if not torch.equal(p, before[n][k])]
        assert any("lora_B" in k for k in moved)
