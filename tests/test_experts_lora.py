"""LoRA on stacked MoE experts (sites of kind `experts`): one (A, B) per expert, checked against a float64 formula
written here (per expert e: W_e + s·B_e·A_e applied to the tokens routed to e), against HF PEFT's
`target_parameters`, through merge/unmerge (bit-exact) and training."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import surgery
from tests import zoo

ARCHS = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss"]
EXPERTS = surgery.RuleSet(name="experts", rules=[surgery.Rule(select=surgery.Selector(kinds=["experts"]), method="lora",
                                                             params={"r": 2, "alpha": 6})])
MLP_ROLES = surgery.RuleSet(name="mlp-roles", rules=[surgery.Rule(
    select=surgery.Selector(roles=["mlp.gate", "mlp.up", "mlp.down"]), method="lora", params={"r": 2, "alpha": 6})])
RULES = {"whole": EXPERTS, "roles": MLP_ROLES}
_BUILT: dict[str, torch.nn.Module] = {}


def build(arch: str) -> torch.nn.Module:
    if arch not in _BUILT:
        torch.manual_seed(0)
        _BUILT[arch] = zoo.build(arch)
    return copy.deepcopy(_BUILT[arch])


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(seed))


def randomize(attachment, std: float = 0.2, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in attachment.branches.values():
            for p in branch.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def experts_module(model, site):
    return surgery.plugin.base_module(model, site.path)


def dense(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.transpose(-1, -2) if transposed else weight


def formula(module, weights: dict, deltas: dict, hidden, index, routing) -> torch.Tensor:
    """The experts block in float64 from its stored weights ([E, out, in] after `dense`) plus each site's ΔW,
    token by token: out_t = Σ_k w_tk · down_e(gate(gate_up_e(x_t))) for e = index_tk."""
    gu = weights["gate_up_proj"] + deltas.get("gate_up_proj", 0)
    dn = weights["down_proj"] + deltas.get("down_proj", 0)
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(index.shape[1]):
            e = int(index[t, k])
            h = gu[e] @ hidden[t]
            if getattr(module, "has_bias", False):
                h = h + module.gate_up_proj_bias[e]
            y = dn[e] @ module._apply_gate(h[None])[0]
            if getattr(module, "has_bias", False):
                y = y + module.down_proj_bias[e]
            out[t] = out[t] + routing[t, k] * y
    return out


def site_delta(site, branch) -> torch.Tensor:
    """ΔW of one experts site [E, out, in] from the branch's pairs, written out per expert and role."""
    parts = list(branch.parts.values()) if hasattr(branch, "parts") else [branch]
    delta = torch.zeros(site.num_experts, site.out_features, site.in_features, dtype=torch.float64)
    for part in parts:
        rows = part.channels if part.channels is not None else torch.arange(site.out_features)
        for e in range(site.num_experts):
            delta[e, rows] += part.scale * (part.lora_B[e].double() @ part.lora_A[e].double())
    return delta


def test_lora_all_linear_and_mlp_rules_adapt_experts_and_counts_in_plan():
    model = build("mixtral")
    report = surgery.inspect(model)
    experts = {s.path: s for s in report.sites if s.kind == "experts"}
    assert len(experts) == 4
    plan = surgery.plan(model, "lora-all-linear")
    placed = {p.site.path: p for p in plan.placements if p.site.kind == "experts"}
    assert set(placed) == set(experts)
    for path, p in placed.items():
        s = experts[path]
        assert p.roles == frozenset() and p.trainable == s.num_experts * 8 * (s.in_features + s.out_features)
    plan = surgery.plan(model, MLP_ROLES)
    gate_up = next(p for p in plan.placements if p.site.path.endswith("layers.0.mlp.experts.gate_up_proj"))
    s = gate_up.site
    assert gate_up.roles == {"mlp.gate", "mlp.up"}
    width = {r: sum(b - a for a, b in s.slices[r]) for r in ("mlp.gate", "mlp.up")}
    assert gate_up.trainable == s.num_experts * 2 * (2 * s.in_features + width["mlp.gate"] + width["mlp.up"])
    attachment = surgery.attach(model, MLP_ROLES)
    assert plan.trainable == attachment.plan.trainable == sum(
        p.numel() for b in attachment.branches.values() for p in b.parameters())
    assert "experts" in str(plan) and f"{plan.trainable:,}" in str(plan)


@pytest.mark.parametrize("how", list(RULES))
@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_and_gradients_match_float64_formula(arch, how):
    model = build(arch).double()
    attachment = surgery.attach(model, RULES[how])
    model.config._experts_implementation = "eager"  # a per-expert loop (grouped_mm takes no float64 on CPU)
    randomize(attachment)
    sites = {p.site.path: p.site for p in attachment.plan.placements if p.site.kind == "experts"}
    assert sites and all((p.roles != frozenset()) == (how == "roles") for p in attachment.plan.placements
                         if p.site.kind == "experts")
    layer = min(sites, key=lambda p: (len(p), p)).rpartition(".")[0]
    module = experts_module(model, sites[f"{layer}.down_proj"])
    seen = {}
    hook = module.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    model(ids())
    hook.remove()
    hidden, index, routing = (a.detach() for a in seen["args"])
    mine = module(hidden, index, routing)
    torch.testing.assert_close(mine, seen["out"])
    names = ("gate_up_proj", "down_proj")
    stored = {n: dense(surgery.plugin.base_module(model, f"{layer}.{n}").parametrizations[n].original.detach(),
                       sites[f"{layer}.{n}"].transposed) for n in names}
    deltas = {n: site_delta(sites[f"{layer}.{n}"], attachment.branches[f"{layer}.{n}"]) for n in names}
    expected = formula(module, stored, deltas, hidden, index, routing)
    with surgery.disabled(model):
        base = module(hidden, index, routing)
    assert (expected - base).abs().max() > 1e-3, "the LoRA pairs did not change the experts' output"
    torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-10)
    # gradients: autograd through the engine against autograd through the formula, on the same pairs
    probe = torch.randn(mine.shape, dtype=mine.dtype, generator=torch.Generator().manual_seed(3))
    (mine * probe).sum().backward()
    leaves = {}
    for n in names:
        branch = attachment.branches[f"{layer}.{n}"]
        for key, p in branch.named_parameters():
            leaves[(n, key)] = p.detach().clone().requires_grad_(True)
    clones = {n: copy.deepcopy(attachment.branches[f"{layer}.{n}"]) for n in names}
    for (n, key), leaf in leaves.items():
        owner, _, attr = f"x.{key}".rpartition(".")
        holder = clones[n] if owner == "x" else clones[n].get_submodule(owner[2:])
        delattr(holder, attr)
        setattr(holder, attr, leaf)
    theirs = formula(module, stored, {n: site_delta(sites[f"{layer}.{n}"], clones[n]) for n in names},
                     hidden, index, routing)
    (theirs * probe).sum().backward()
    for (n, key), leaf in leaves.items():
        grad = attachment.branches[f"{layer}.{n}"].get_parameter(key).grad
        assert grad is not None and grad.abs().max() > 0
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_merge_unmerge_exact_and_detach_restores_the_parameters(arch):
    model = build(arch)  # float32, transformers' default experts implementation (grouped_mm)
    x = ids()
    params_before = dict(model.named_parameters())
    bytes_before = {n: p.detach().clone() for n, p in params_before.items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        base = model(x).logits
    attachment = surgery.attach(model, MLP_ROLES)
    randomize(attachment, std=0.3)
    with torch.no_grad():
        adapted = model(x).logits
    assert (adapted - base).abs().max() > 1e-2
    surgery.merge(model, "default")
    with torch.no_grad():
        merged = model(x).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    changed = [n for n, t in bytes_before.items() if "experts" in n and not torch.equal(
        surgery.plugin.base_module(model, n.rpartition(".")[0]).parametrizations[n.rpartition(".")[2]].original
        if n.rpartition(".")[2] in ("gate_up_proj", "down_proj") else t, t)]
    assert changed, "merge did not write the stacked weights"
    surgery.unmerge(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-4)
    surgery.detach(model, "default")
    after = dict(model.named_parameters())
    assert list(after) == list(params_before)
    again = surgery.attach(model, MLP_ROLES)  # bake: merged for good, the branches gone, a plain model again
    randomize(again, std=0.3)
    surgery.bake(model, "default")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-4)
    assert list(dict(model.named_parameters())) == list(params_before)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    with torch.no_grad():
        for n, p in params_before.items():
            p.copy_(bytes_before[n])
    assert all(after[n] is params_before[n] for n in after)  # the same Parameter objects, in their places
    assert all(torch.equal(after[n].detach(), bytes_before[n]) for n in after)  # bit for bit
    assert {n: type(m) for n, m in model.named_modules()} == classes
    with torch.no_grad():
        assert torch.equal(model(x).logits, base)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])  # experts stored [E, out, in] / [E, in, out]
def test_peft_target_parameters_both_ways(tmp_path, arch):
    model = build(arch)
    rules = surgery.RuleSet(name="mixed", rules=[*MLP_ROLES.rules, surgery.Rule(
        select=surgery.Selector(roles=["attention.query", "attention.value"]), method="lora", params={"r": 2, "alpha": 6})])
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(hash(name) % 2**31)) * 0.2)
    x = ids()
    with torch.no_grad():
        expected = theirs(x).logits
        with theirs.disable_adapter():
            base = theirs(x).logits
    assert (expected - base).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path / "peft")
    loaded = surgery.load(model, tmp_path / "peft", name="p")
    assert {p.site.path for p in loaded.plan.placements if p.site.kind == "experts"} == {
        f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("gate_up_proj", "down_proj")}
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    # and back: surgery writes what PEFT loads to the same outputs (a per-role LoRA becomes one pair of rank 2r)
    other = build(arch)
    attachment = surgery.attach(other, rules, name="q")
    randomize(attachment, std=0.2, seed=5)
    with torch.no_grad():
        ours = other(x).logits
    surgery.save(other, tmp_path / "ours", name="q", format="peft")
    peft_model = PeftModel.from_pretrained(build(arch), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, ours, rtol=1e-5, atol=1e-5)
    # and round trip of the first adapter through surgery's PEFT writer
    surgery.save(model, tmp_path / "again", name="p", format="peft")
    again = PeftModel.from_pretrained(build(arch), tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_training_lowers_the_loss_and_changes_only_lora_tensors():
    model = build("qwen3_moe").train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    attachment = surgery.attach(model, "lora-all-linear")
    trainable = [p for p in model.parameters() if p.requires_grad]
    branch_params = {id(p) for b in attachment.branches.values() for p in b.parameters()}
    assert trainable and all(id(p) in branch_params for p in trainable)
    assert any(p.site.kind == "experts" for p in attachment.plan.placements)
    experts_b = [attachment.branches[p.site.path] for p in attachment.plan.placements if p.site.kind == "experts"]
    before_b = [p.detach().clone() for b in experts_b for p in b.parameters()]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    x = ids(7)
    losses = []
    for _ in range(8):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after_b = [p.detach() for b in experts_b for p in b.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before_b, after_b)), "the experts' pairs did not train"
    surgery.detach(model, "default")
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in model.named_parameters())


def test_dropout_and_per_sample_routing_refused_at_experts():
    model = build("mixtral")
    rules = surgery.RuleSet(name="dropout", rules=[surgery.Rule(
        select=surgery.Selector(roles=["mlp.down"]), method="lora", params={"r": 2, "dropout": 0.1})])
    with pytest.raises(surgery.SurgeryError, match="dropout.*stacked expert weights"):
        surgery.plan(model, rules)
    surgery.attach(model, EXPERTS, name="a")
    with surgery.per_sample(model, ["a", None]), pytest.raises(surgery.SurgeryError, match="per sample"):
        model(ids())
    with surgery.per_sample(model, [None, None]), torch.no_grad():
        with surgery.disabled(model):
            base = model(ids()).logits
        torch.testing.assert_close(model(ids()).logits, base)


def test_combine_and_save_load_at_experts(tmp_path):
    model = build("olmoe")
    a = surgery.attach(model, MLP_ROLES, name="a")
    b = surgery.attach(model, MLP_ROLES, name="b")
    randomize(a, seed=2)
    randomize(b, seed=3)
    c = surgery.combine(model, {"a": 0.5, "b": 1.5}, name="c", how="cat")
    for p in c.plan.placements:
        if p.site.kind == "experts":
            want = 0.5 * site_delta(p.site, a.branches[p.site.path]) + 1.5 * site_delta(p.site, b.branches[p.site.path])
            torch.testing.assert_close(site_delta(p.site, c.branches[p.site.path]), want)
    surgery.set_active(model, ["c"])
    x = ids()
    with torch.no_grad():
        out = model(x).logits
    surgery.save(model, tmp_path / "c", name="c")
    fresh = build("olmoe")
    surgery.load(fresh, tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, out)
