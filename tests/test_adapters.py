"""Bottleneck adapters: serial (Houlsby, Pfeiffer) and parallel (He et al.) placements on llama, gpt2, bert, t5
and the custom TinyGLM; the sublayer maths against a float64 formula; merge refused; detach exact; pairing
errors; training."""
import copy

import pytest
import torch
import torch.nn.functional as F

import surgery
from surgery import tiny
from surgery.errors import NotMergeableError, RuleFileError, SiteError
from tests.conftest import assert_bit_identical, ids, logits, snapshot, train_steps
from tests.custom_models import TinyGLM

RULE_SETS = ["adapter-houlsby", "adapter-pfeiffer", "adapter-parallel"]
PLACED_ROLES = {"adapter-houlsby": ["attention.output", "mlp.down"], "adapter-pfeiffer": ["mlp.down"],
                "adapter-parallel": ["mlp.down"]}  # where each rule set puts parameters


def build(arch, dtype=torch.float32):
    """(model, example args for the analysis or None, a function running the model on fixed inputs)."""
    if arch == "glm":
        torch.manual_seed(0)
        model, x = TinyGLM().to(dtype).eval(), torch.randint(0, 96, (2, 8))
        return model, (x,), lambda m: m(x)
    model, x = tiny.build(arch, dtype=dtype), ids()
    return model, None, lambda m: logits(m, x)


def randomize_adapters(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".branches." in name:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def adapter_count(d: int, m: int) -> int:
    return d * m + m + m * d + d  # down weight and bias, up weight and bias


@pytest.mark.parametrize("arch,dtype", [(a, torch.float32) for a in ["llama", "gpt2", "bert", "t5", "glm"]]
                         + [("llama", torch.bfloat16)], ids=lambda v: str(v).replace("torch.", ""))
def test_placements_start_unchanged_change_outputs_refuse_merge_and_detach_exactly(arch, dtype):
    model, args, run = build(arch, dtype)
    before, modules = snapshot(model), dict(model.named_modules())
    total = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        reference = run(model)
    for rules in RULE_SETS:
        surgery.attach(model, rules, name=rules, args=args)
    with torch.no_grad():
        for rules in RULE_SETS:  # the up projections start at zero: outputs unchanged, bit for bit
            surgery.set_active(model, rules)
            assert torch.equal(run(model), reference), rules
    report = surgery.inspect(model)
    d = report.with_role("mlp.down")[0].out_features
    expected = {r: adapter_count(d, d // 16) * sum(len(report.with_role(role)) for role in PLACED_ROLES[r])
                for r in RULE_SETS}
    assert {r: surgery.plan(model, r).trainable for r in RULE_SETS} == expected
    assert tuple(surgery.trainable_parameters(model)) == (sum(expected.values()), total + sum(expected.values()))
    randomize_adapters(model)
    with torch.no_grad():
        outputs = {}
        for rules in RULE_SETS:
            surgery.set_active(model, rules)
            outputs[rules] = run(model)
            assert not torch.allclose(outputs[rules].float(), reference.float(), atol=1e-3), rules
    for one, other in [(0, 1), (0, 2), (1, 2)]:  # three different placements
        assert not torch.allclose(outputs[RULE_SETS[one]], outputs[RULE_SETS[other]], atol=1e-4)
    state = snapshot(model)
    with pytest.raises(NotMergeableError, match="cannot be merged: method 'adapter"):
        surgery.merge(model, "adapter-houlsby")
    assert_bit_identical(model, state)
    for rules in RULE_SETS:
        surgery.detach(model, rules)
    assert_bit_identical(model, before)
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    with torch.no_grad():
        assert torch.equal(run(model), reference)


def _call_io(module):
    """Record the first input and the (first) output of every call of `module`."""
    seen = []

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x.detach().clone(), (out[0] if isinstance(out, tuple) else out).detach().clone()))

    return seen, module.register_forward_hook(hook, with_kwargs=True)


def _formula(branch, x):
    """scaling * up(act(down(norm(x)))) in float64 from the branch's parameters."""
    act = {torch.nn.ReLU: F.relu, torch.nn.SiLU: F.silu, torch.nn.GELU: F.gelu}[type(branch.act)]
    x = x.double()
    if isinstance(branch.norm, torch.nn.LayerNorm):
        x = F.layer_norm(x, x.shape[-1:], branch.norm.weight.double(), branch.norm.bias.double(), branch.norm.eps)
    h = act(x @ branch.down.weight.double().T + branch.down.bias.double())
    return (h @ branch.up.weight.double().T + branch.up.bias.double()) * branch.scaling


CASES = {  # name: (arch, rule set, the sublayer module whose output the adapter changes, the branch's site)
    "serial-llama-attention": ("llama", "adapter-houlsby", "model.layers.0.self_attn", "model.layers.0.self_attn.o_proj"),
    "serial-gpt2-mlp": ("gpt2", "adapter-pfeiffer", "transformer.h.0.mlp", "transformer.h.0.mlp.c_proj"),
    "parallel-llama-mlp": ("llama", "adapter-parallel", "model.layers.0.mlp", "model.layers.0.mlp.down_proj"),
    "parallel-t5-mlp": ("t5", "adapter-parallel", "encoder.block.0.layer.1.DenseReluDense",
                        "encoder.block.0.layer.1.DenseReluDense.wo"),
    "parallel-glm-mlp": ("glm", "adapter-parallel", "encoder.layers.0.mlp", "encoder.layers.0.mlp.dense_4h_to_h"),
    "parallel-glm-attention": ("glm", "attention", "encoder.layers.0.self_attention",
                               "encoder.layers.0.self_attention.dense"),
    "serial-bert-mlp-norm": ("bert", "norm", "bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.output.dense"),
}
SERIAL_NORM = surgery.RuleSet(name="serial-norm", rules=[surgery.Rule(
    select=surgery.Selector(roles=["mlp.down"]), method="adapter",
    params={"bottleneck": 8, "layer_norm": True, "activation": "gelu", "scaling": 0.5})])
PARALLEL_ATTENTION = surgery.RuleSet(name="parallel-attention", rules=[surgery.Rule(
    select=surgery.Selector(roles=["attention.query", "attention.output"]), method="parallel_adapter",
    params={"bottleneck": 8, "scaling": 2.0})])


@pytest.mark.parametrize("case", list(CASES))
def test_sublayer_output_matches_the_formula(case):
    """Serial: y + f(y) at the sublayer's output y. Parallel: sublayer(x) + f(x), x the sublayer's input."""
    arch, rules, block_path, site = CASES[case]
    model, args, run = build(arch)
    ruleset = {"attention": PARALLEL_ATTENTION, "norm": SERIAL_NORM}.get(rules, rules)
    surgery.attach(model, ruleset, name="a", args=args)
    plan = surgery.plan(model, ruleset)  # from the analysis the attach kept
    if rules == "norm":  # with its LayerNorm: 2 * d * m + m + d + 2 * d per site
        assert plan.trainable == len(plan.placements) * (2 * 64 * 8 + 8 + 64 + 2 * 64)
    randomize_adapters(model)
    seen, handle = _call_io(model.get_submodule(block_path))
    with torch.no_grad():
        run(model)
        with surgery.disabled(model):
            run(model)
    handle.remove()
    (x, adapted), (x_base, base) = seen[0], seen[len(seen) // 2]
    assert torch.equal(x, x_base)  # the adapter is downstream of this sublayer's input
    branch = model.get_submodule(site).branches["a"]
    delta = _formula(branch, x if rules in ("adapter-parallel", "attention") else base)
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(adapted.double(), base.double() + delta, rtol=1e-5, atol=1e-5)


def test_parallel_pairs_follow_the_module_tree_and_survive_deepcopy():
    model, args, run = build("bert")
    surgery.attach(model, "adapter-parallel", name="a", args=args)
    for i in range(2):
        reader = model.get_submodule(f"bert.encoder.layer.{i}.intermediate.dense").branches["a"]
        writer = model.get_submodule(f"bert.encoder.layer.{i}.output.dense").branches["a"]
        assert reader.handoff is writer.handoff and writer.source == f"bert.encoder.layer.{i}.intermediate.dense"
        assert not list(reader.parameters())
    randomize_adapters(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(run(twin), run(model), rtol=0, atol=0)
    twin_reader = twin.bert.encoder.layer[0].intermediate.dense.branches["a"]
    assert twin_reader.handoff is twin.bert.encoder.layer[0].output.dense.branches["a"].handoff
    assert twin_reader.handoff is not model.bert.encoder.layer[0].intermediate.dense.branches["a"].handoff
    with pytest.raises(RuntimeError, match=r"parallel adapter at 'bert\.encoder\.layer\.0\.output\.dense' ran without"):
        model.bert.encoder.layer[0].output.dense(torch.randn(2, 96))  # called alone, without its MLP input


def _rules(roles, method="parallel_adapter", **params):
    return surgery.RuleSet(name="r", rules=[surgery.Rule(select=surgery.Selector(roles=roles), method=method, params=params)])


@pytest.mark.parametrize("rules,error,match", [
    (_rules(["mlp.down"]), SiteError, r"parallel_adapter at 'model\.layers\.0\.mlp\.down_proj' needs one mlp input site"),
    (_rules(["mlp.gate", "mlp.up", "mlp.down"]), SiteError, r"several equally near \(model\.layers\.0\.mlp\.gate_proj"),
    (_rules(["mlp.up"]), SiteError, r"input sites without an output site: model\.layers\.0\.mlp\.up_proj"),
    (_rules(["attention.output"], method="adapter", bottleneck=4, reduction_factor=4), RuleFileError,
     r"rule 0, field 'params'.*either bottleneck or reduction_factor"),
    (_rules(["mlp.down"], method="adapter", activation="softmax"), RuleFileError, r"rule 0, field 'params\.activation'"),
])
def test_bad_placements_are_refused_and_change_nothing(rules, error, match):
    model = tiny.build("llama")
    before, modules = snapshot(model), dict(model.named_modules())
    with pytest.raises(error, match=match):
        surgery.attach(model, rules, name="a")
    assert_bit_identical(model, before)
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert "_surgery_ledger" not in model.__dict__


def test_serial_adapter_on_a_fused_slice_is_refused_at_plan():
    model = tiny.build("gpt2")
    with pytest.raises(SiteError, match=r"'transformer\.h\.0\.attn\.c_attn' is a fused projection.*attention\.value"):
        surgery.plan(model, _rules(["attention.value"], method="adapter"))


@pytest.mark.parametrize("arch,rules", [("llama", "adapter-houlsby"), ("gpt2", "adapter-parallel")])
def test_training_changes_only_the_adapters(arch, rules):
    model = tiny.build(arch)
    before = snapshot(model)
    surgery.attach(model, rules, name="a")
    model.train()
    adapter_params = {id(p) for b in model._surgery_ledger.attachments["a"].branches.values() for p in b.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == adapter_params
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = ids(batch=4, seq=12)
    losses = train_steps(model, params, x, lr=0.02)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start and ".up." in n)
    surgery.detach(model, "a")
    assert_bit_identical(model, before)
