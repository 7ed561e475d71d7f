"""OFT: against HF PEFT both ways through the PEFT format (outputs, gradients, counts) for its variants (block size
or count, exact Cayley or Neumann series, COFT, shared blocks), the rotation is orthogonal, the multiplicative merge
keeps outputs and unmerge gives back the bytes, fused projections, a short training run."""
import pytest
import torch
from peft import OFTConfig, get_peft_model

import surgery
from surgery import tiny
from surgery.errors import AdapterFileError, RuleFileError, SiteError
from tests.conftest import ids, logits
from tests.method_checks import (branches, count, merge_unmerge_detach, nudge, peft_both_ways,
                                 training_changes_only_the_method)

TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}


def peft_param(inner, path, name):
    return inner.get_submodule(path).oft_R["default"].weight


def oft(n):
    return "oft_R" in n


def qv(**params):
    return surgery.RuleSet(name="oft", rules=[surgery.Rule(
        select=surgery.Selector(roles=["attention.query", "attention.value"]), method="oft", params=params)])


VARIANTS = [dict(oft_block_size=16), dict(oft_block_size=0, r=2, use_cayley_neumann=False),
            dict(oft_block_size=8, coft=True, eps=1.0), dict(oft_block_size=16, block_share=True)]


@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_oft_matches_peft_both_ways(tmp_path, arch, options):
    config = OFTConfig(target_modules=TARGETS[arch], init_weights=False, **options)
    peft_both_ways(tmp_path, arch, config, peft_param, oft, std=0.0)  # PEFT's random init (normal, std 0.1) acts


@pytest.mark.parametrize("arch", list(TARGETS))
def test_trainable_counts_equal_peft(arch):
    model = tiny.build(arch)
    assert surgery.plan(model, "oft").trainable == count(get_peft_model(tiny.build(arch), OFTConfig(target_modules=TARGETS[arch])))
    for options, ours in [(dict(oft_block_size=0, r=4), dict(block_size=0, r=4)),
                          (dict(oft_block_size=24), dict(block_size=24)),  # 24 does not divide 64: both take 16
                          (dict(oft_block_size=8, block_share=True), dict(block_size=8, block_share=True))]:
        theirs = get_peft_model(tiny.build(arch), OFTConfig(target_modules=TARGETS[arch], **options))
        assert surgery.plan(model, qv(**ours)).trainable == count(theirs)
    with pytest.warns(UserWarning, match="block_size 24 does not divide the input width 64; using 16"):
        surgery.attach(model, qv(block_size=24), name="a")


@pytest.mark.parametrize("neumann", [False, True])
def test_the_rotation_is_block_diagonal_and_orthogonal(neumann):
    model = tiny.build("llama")
    surgery.attach(model, qv(block_size=16, use_cayley_neumann=neumann), name="a")
    nudge(model, oft, std=0.02)
    branch = branches(model, "a")["model.layers.0.self_attn.q_proj"]
    r = branch.rotations().detach().double()
    assert r.shape == (4, 16, 16)
    eye = torch.eye(16, dtype=torch.float64).expand_as(r)
    error = (r @ r.transpose(-1, -2) - eye).abs().max()
    assert error < (1e-6 if not neumann else 2e-3)  # the series is orthogonal up to its last term, O(|Q|^4)
    x = torch.randn(3, 64)
    host = model.get_submodule("model.layers.0.self_attn.q_proj")
    full = torch.block_diag(*r)
    with torch.no_grad():
        torch.testing.assert_close(host(x).double(), (x.double() @ full) @ host.base.weight.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("bert", torch.float32), ("llama", torch.bfloat16)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_merge_keeps_outputs_and_unmerge_detach_restore_the_bytes(arch, dtype):
    diff = merge_unmerge_detach(arch, qv(block_size=16), oft, dtype=dtype, std=0.05)
    print(f"oft {arch} {dtype}: max |logit change| by merge {diff:.2e}")


def test_training_lowers_the_loss_and_changes_only_the_adapter():
    training_changes_only_the_method("llama", qv(block_size=16), lr=2e-2)


def test_a_fused_projection_is_rotated_whole_or_not_at_all():
    model = tiny.build("gpt2")
    with pytest.raises(SiteError, match="oft rotates the input of 'transformer.h.0.attn.c_attn'.*attention.query, attention.value only"):
        surgery.plan(model, "oft")
    whole = surgery.RuleSet(name="w", rules=[surgery.Rule(select=surgery.Selector(paths=["*.c_attn"]), method="oft",
                                                          params={"block_size": 16})])
    assert surgery.plan(model, whole).trainable == 2 * 4 * 120
    merge_unmerge_detach("gpt2", whole, oft, std=0.05)  # Conv1D: the engine hands oft the dense [out, in] weight


def test_module_dropout_replaces_blocks_by_identity_in_training():
    model = tiny.build("llama")
    surgery.attach(model, qv(block_size=8, module_dropout=0.5), name="a")
    nudge(model, oft)
    branch = branches(model, "a")["model.layers.0.self_attn.q_proj"]
    r = branch.rotations()
    branch.train()
    dropped = branch._dropped(r)
    same = [bool(torch.equal(dropped[i], r[i])) for i in range(8)]
    eye = [bool(torch.equal(dropped[i], torch.eye(8))) for i in range(8)]
    assert sum(eye) == 4 and all(s or e for s, e in zip(same, eye))
    branch.eval()
    assert torch.equal(branch._dropped(r), r)


def test_params_and_peft_options_are_checked(tmp_path):
    model = tiny.build("llama")
    with pytest.raises(RuleFileError, match="field 'params': .*give exactly one of r \\(4\\) and block_size \\(32\\)"):
        surgery.plan(model, qv(r=4))
    peft_model = get_peft_model(tiny.build("llama"), OFTConfig(target_modules=["q_proj"], oft_block_size=16, bias="all"))
    peft_model.save_pretrained(tmp_path / "bias")
    with pytest.raises(AdapterFileError, match="cannot map: bias='all'"):
        surgery.load(model, tmp_path / "bias")
    x = ids()
    assert torch.equal(logits(model, x), logits(tiny.build("llama"), x))
