"""Batched per-sample routing (`Branch.prepare_routes`/`route_output`) of IA3 and serial bottleneck adapters: a
mixed batch equals each sample run alone with its own adapter (float64), in outputs and in gradients, and sites
whose branches cannot be batched fall back to running each group of samples."""
import pytest
import torch

import surgery
from surgery import tiny
from surgery.engine.host import Host
from tests.conftest import ids, logits

NAMES = ["b", None, "a", "b", "a"]


def randomize(model, name, seed):
    """Every parameter of attachment `name`'s branches away from its start (ones, zeros), so each one acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in model._surgery_ledger.attachments[name].branches.values():
            for p in branch.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def build(attachments, arch="llama"):
    """A float64 model with the attachments {name: rules}, randomized."""
    model = tiny.build(arch, dtype=torch.float64)
    for i, (name, rules) in enumerate(attachments.items()):
        surgery.attach(model, rules, name=name)
        randomize(model, name, seed=i)
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


def batched_sites(model):
    """Paths of the hosts that routed the batch at once (their prepare_routes state is kept in inference)."""
    return {path for path, m in model.named_modules() if isinstance(m, Host) and "state" in m._routes}


def assert_mixed_batch_equals_each_sample_alone(model, names=NAMES):
    x = ids(batch=len(names))
    with torch.no_grad(), surgery.per_sample(model, names):
        mixed = logits(model, x)
        batched = batched_sites(model)
    for i, name in enumerate(names):
        with torch.no_grad():
            torch.testing.assert_close(mixed[i:i + 1], alone(model, name, x[i:i + 1]), rtol=1e-10, atol=1e-10)
    return batched


def assert_routed_gradients_equal_each_sample_alone(model, names=NAMES):
    """The gradients of a mixed batch's loss equal the sums of each sample's own, run alone."""
    x = ids(batch=len(names))
    weights = torch.randn(len(names), x.shape[1], model.config.vocab_size, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(9))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with surgery.per_sample(model, names):
        routed = torch.autograd.grad((logits(model, x) * weights).sum(), list(params.values()), allow_unused=True)
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for i, name in enumerate(names):
        if name is None:
            continue
        grads = torch.autograd.grad((alone(model, name, x[i:i + 1]) * weights[i:i + 1]).sum(), list(params.values()),
                                    allow_unused=True)
        for n, grad in zip(params, grads):
            if grad is not None:
                want[n] += grad
    for n, got in zip(params, routed):
        got = torch.zeros_like(want[n]) if got is None else got
        torch.testing.assert_close(got, want[n], rtol=1e-9, atol=1e-12)


def test_ia3_routes_output_scaling_at_once_and_input_scaling_per_group():
    model = build({"a": "ia3", "b": "ia3"})
    batched = assert_mixed_batch_equals_each_sample_alone(model)
    ia3_sites = set(model._surgery_ledger.attachments["a"].branches)
    output_sites = {p for p, b in model._surgery_ledger.attachments["a"].branches.items() if b.side == "output"}
    assert output_sites and batched == output_sites  # k and v at once; down (input scaling) per group
    assert ia3_sites - output_sites


def test_ia3_routes_channels_of_a_fused_projection():
    kv = surgery.RuleSet(name="kv", rules=[surgery.Rule(
        select=surgery.Selector(roles=["attention.key", "attention.value"]), method="ia3")])
    model = build({"a": kv, "b": kv}, arch="gpt2")
    batched = assert_mixed_batch_equals_each_sample_alone(model)
    assert batched == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}


def test_ia3_routed_gradients_equal_each_sample_alone():
    assert_routed_gradients_equal_each_sample_alone(build({"a": "ia3", "b": "ia3"}).train())


def adapter(name, **params):
    return surgery.RuleSet(name=name, rules=[surgery.Rule(
        select=surgery.Selector(roles=["attention.output", "mlp.down"]), method="adapter", params=params)])


@pytest.mark.parametrize("norm", [False, True])
def test_serial_adapters_of_different_widths_route_at_once(norm):
    model = build({"a": adapter("a", bottleneck=8, scaling=0.5, activation="gelu", layer_norm=norm),
                   "b": adapter("b", bottleneck=3, scaling=2.0, activation="gelu", layer_norm=norm)})
    batched = assert_mixed_batch_equals_each_sample_alone(model)
    assert batched == set(model._surgery_ledger.attachments["a"].branches)


def test_serial_adapters_of_different_kinds_run_per_group():
    model = build({"a": adapter("a", bottleneck=4, activation="relu"),
                   "b": adapter("b", bottleneck=4, activation="silu", layer_norm=True)})
    assert assert_mixed_batch_equals_each_sample_alone(model) == set()


def test_serial_adapter_routed_gradients_equal_each_sample_alone():
    model = build({"a": adapter("a", bottleneck=8, layer_norm=True), "b": adapter("b", bottleneck=5, layer_norm=True)})
    assert_routed_gradients_equal_each_sample_alone(model.train())


def test_serial_adapters_with_dropout_in_training_run_per_group():
    model = build({"a": adapter("a", bottleneck=4, dropout=0.5), "b": adapter("b", bottleneck=4, dropout=0.5)})
    host = model.model.layers[0].mlp.down_proj
    state = type(host.branches["a"]).prepare_routes
    model.eval()  # a branch starts in training mode, as a new module does
    assert state([host.branches["a"], host.branches["b"]]) is not None  # eval: batched
    model.train()
    with pytest.raises(NotImplementedError):
        state([host.branches["a"], host.branches["b"]])


LORA_QV = surgery.RuleSet(name="qv", rules=[surgery.Rule(
    select=surgery.Selector(roles=["attention.query", "attention.value"]), method="lora", params={"r": 3})])


@pytest.mark.parametrize("attachments", [
    {"a": "ia3", "b": "ia3"},
    {"a": adapter("a", bottleneck=8, layer_norm=True), "b": adapter("b", bottleneck=3, layer_norm=True)},
    {"a": LORA_QV, "b": LORA_QV}], ids=["ia3", "adapters", "lora"])
def test_a_routing_kept_in_inference_sees_branches_written_in_place(attachments):
    """What a batched route keeps in inference (stacked vectors, weights or pairs) is made again once a branch's
    parameter is written in place inside the same per_sample block (as an optimizer step between two evaluations
    does): the second call equals each sample alone on the new parameters."""
    model = build(attachments)
    x = ids(batch=len(NAMES))
    with torch.no_grad(), surgery.per_sample(model, NAMES):
        first = logits(model, x)
        assert batched_sites(model), "no site routed the batch at once"
        randomize(model, "a", seed=7)
        randomize(model, "b", seed=8)
        again = logits(model, x)
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            torch.testing.assert_close(again[i:i + 1], alone(model, name, x[i:i + 1]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(first[0], again[0])


def test_a_routing_is_kept_across_blocks_routed_alike_and_its_copies_dropped_when_a_block_ends():
    """A site keeps what it derived for a routing (groups, branches) for the next per_sample block routed alike,
    as surgery.jobs enters one per step, and drops the copies of branch tensors a route kept in inference when
    its block ends. A branch replaced between two such blocks (detached, attached again) is the one that runs."""
    model = build({"a": LORA_QV, "b": LORA_QV})
    host = model.model.layers[0].self_attn.q_proj
    x = ids(batch=len(NAMES))
    with torch.no_grad(), surgery.per_sample(model, NAMES):
        logits(model, x)
        kept = host._routes
        assert "state" in kept
    assert "state" not in kept and host.routing is None
    with torch.no_grad(), surgery.per_sample(model, NAMES):
        assert host._routes is kept  # the groups and branches found before
        logits(model, x)
    with torch.no_grad(), surgery.per_sample(model, ["b", "a"]):
        assert host._routes is not kept  # another routing
    assert_mixed_batch_equals_each_sample_alone(model)
    surgery.detach(model, "b")
    surgery.attach(model, LORA_QV, name="b")
    randomize(model, "b", seed=11)
    assert_mixed_batch_equals_each_sample_alone(model)  # routed alike again: the new "b" runs


def test_a_routed_call_knows_each_samples_group_on_the_host(monkeypatch):
    """`surgery.plugin.group_numbers`: the `group` tensor a branch class is given, as host integers (a routed
    call's repeated samples, as generate's beams make them, included); None for a tensor the engine did not make."""
    from surgery import plugin
    from surgery_plugins.lora.branches import LoraBranch
    model = build({"a": LORA_QV, "b": LORA_QV})
    seen = []
    monkeypatch.setattr(LoraBranch, "route_call", classmethod(
        lambda cls, state, group, base, args, kwargs: seen.append(group) or NotImplemented))
    with torch.no_grad(), surgery.per_sample(model, ["b", "a", None, "b"]):
        logits(model, ids(batch=8))  # each name's sample twice
    assert seen and all(plugin.group_numbers(g) == (0, 0, 1, 1, 2, 2, 0, 0) for g in seen)
    assert torch.equal(seen[0].cpu(), torch.tensor([0, 0, 1, 1, 2, 2, 0, 0]))
    assert plugin.group_numbers(torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])) is None
