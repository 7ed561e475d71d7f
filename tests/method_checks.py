"""Checks every method plugin of issue 20 goes through: the same outputs and gradients as HF PEFT with the same
weights (both ways through the PEFT format), merge/unmerge/detach, a short training run."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel, get_peft_model

import surgery
from surgery import tiny
from tests.conftest import assert_bit_identical, ids, logits, snapshot, train_steps

PeftParam = Callable[[torch.nn.Module, str, str], torch.Tensor]
"""(PEFT's inner model, site path, our branch parameter name) -> PEFT's parameter."""


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def branches(model, name: str) -> dict:
    return surgery.plugin.attachment(model, name).branches


def nudge(model: torch.nn.Module, select: Callable[[str], bool], seed: int = 0, std: float = 0.1) -> None:
    """Add seeded noise to the parameters whose name `select` accepts, so that every adapter changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if select(n):
                p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def peft_both_ways(tmp: Path, arch: str, config, peft_param: PeftParam, trainable_names: Callable[[str], bool],
                   std: float = 0.1) -> dict[str, float]:
    """A PEFT model of `config` with random adapter weights, saved by PEFT and loaded with `surgery.load`: outputs
    and gradients equal; then saved by surgery in PEFT's format and loaded by PEFT: outputs equal. Returns the
    largest differences (and checks the adapter does change the outputs and the trainable counts are equal)."""
    base = tiny.build(arch)
    theirs = get_peft_model(copy.deepcopy(base), config)
    nudge(theirs, trainable_names, std=std)
    theirs.save_pretrained(tmp / "peft")
    ours = copy.deepcopy(base)
    surgery.load(ours, tmp / "peft", name="p")
    assert surgery.trainable_parameters(ours).trainable == count(theirs)
    x = ids()
    out_ours, out_theirs = logits(ours, x), logits(theirs, x)
    assert (out_ours - logits(base, x)).abs().max() > 1e-3  # the adapter does act
    loaded = float((out_ours - out_theirs).detach().abs().max())
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()
    inner = theirs.base_model.model
    grad = 0.0
    for path, branch in branches(ours, "p").items():
        for name, p in branch.named_parameters():
            other = peft_param(inner, path, name)
            torch.testing.assert_close(p.grad, other.grad.reshape(p.shape), rtol=1e-4, atol=1e-6)
            grad = max(grad, float((p.grad - other.grad.reshape(p.shape)).abs().max()))
    surgery.save(ours, tmp / "back", name="p", format="peft")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp / "back")
    with torch.no_grad():
        out_again = logits(again, x)
        torch.testing.assert_close(out_again, out_ours, rtol=1e-5, atol=1e-5)
    saved = float((out_again - out_ours).detach().abs().max())
    print(f"{arch} {type(config).__name__}: PEFT->surgery {loaded:.2e} (grads {grad:.2e}), surgery->PEFT {saved:.2e}")
    return {"loaded": loaded, "grad": grad, "saved": saved}


def merge_unmerge_detach(arch: str, rules, trainable_names: Callable[[str], bool], dtype=torch.float32,
                         std: float = 0.1) -> float:
    """Attach, perturb, merge (outputs kept to dtype tolerance), unmerge (weights back bit for bit), detach (the
    model bit-identical to the original). Returns the largest output change of the merge."""
    model, x = tiny.build(arch, dtype=dtype), ids()
    before = snapshot(model)
    with torch.no_grad():
        reference = logits(model, x)
        surgery.attach(model, rules, name="a")
        torch.testing.assert_close(logits(model, x), reference, rtol=0, atol=0)  # every method starts at the base
        nudge(model, trainable_names, std=std)
        adapted = logits(model, x)
        assert (adapted - reference).abs().max() > 1e-3
        weights = {k: v for k, v in snapshot(model).items() if ".branches." not in k}
        surgery.merge(model, "a")
        merged = logits(model, x)
        changed = {k for k, v in snapshot(model).items() if k in weights and not torch.equal(v, weights[k])}
        assert changed, "the merge changed no weight"
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)
        torch.testing.assert_close(merged, adapted, **tol)
        surgery.unmerge(model, "a")
        assert_bit_identical_subset(model, weights)
        torch.testing.assert_close(logits(model, x), adapted, rtol=0, atol=0)
        surgery.detach(model, "a")
    assert_bit_identical(model, before)
    return float((merged - adapted).abs().max())


def assert_bit_identical_subset(model, saved: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(now[k], v) and now[k].dtype == v.dtype, f"tensor {k} changed"


def training_changes_only_the_method(arch: str, rules, lr: float = 1e-2, steps: int = 6) -> list[float]:
    """A few Adam steps lower the loss, and only the attachment's tensors change."""
    model = tiny.build(arch).train()
    surgery.attach(model, rules, name="a")
    before = snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    mine = {id(p) for b in branches(model, "a").values() for p in b.parameters()}
    assert params and {id(p) for p in params} == mine
    losses = train_steps(model, params, ids(), lr=lr, steps=steps)
    assert losses[-1] < losses[0], losses
    names = {n for n, p in model.named_parameters() if id(p) in mine}
    changed = {k for k, v in snapshot(model).items() if not torch.equal(v, before[k])}
    assert changed and changed <= names, changed - names
    return losses
