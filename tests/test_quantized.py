"""Quantized linear layers: the ChatGLM INT4/INT8 format, LoRA on it, merge with requantization, exact unmerge,
a float merge, several adapters, a third-party quantized format, the ChatGLM rule file, bitsandbytes."""
import copy
import subprocess
import sys
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

import surgery
import surgery.core.registry
from surgery import tiny
from surgery.analysis.report import Report
from surgery.core.formats import TraceStandIn
from surgery.engine.host import Host
from surgery.engine.weight_edits import PROBE_ROWS
from surgery.errors import RuleFileError
from surgery.rules.plan import plan_sites
from surgery.rules.schema import read_ruleset
from surgery_plugins import bnb_formats
from surgery_plugins.chatglm_format import ChatGLMQuantFormat
from surgery_plugins.quantized_linear import DequantLinear, QuantizedLinear, pack_int4, quantize, unpack_int4
from tests.conftest import assert_bit_identical, snapshot
from tests.custom_models import TinyGLM

RULES = __import__("pathlib").Path(__file__).parent.parent / "rules" / "chatglm.yaml"
WHOLE = surgery.RuleSet(name="lora-quantized", rules=[surgery.Rule(
    select=surgery.Selector(kinds=["quantized_linear"]), method="lora", params={"r": 4, "alpha": 8})])


def glm_ids(seed: int = 1, batch: int = 4, seq: int = 12, vocab: int = 96) -> torch.Tensor:
    """A learnable toy sequence: counting upward from a random start."""
    start = torch.randint(0, vocab, (batch, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(seq)) % vocab


def glm(bits: int, seed: int = 0) -> TinyGLM:
    torch.manual_seed(seed)
    model = TinyGLM().eval()
    quantize(model, bits, exclude=["output_layer"])
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Path -> ChatGLM-format layer, looking through the Hosts swapped in at adapted sites."""
    fmt, found = ChatGLMQuantFormat(), {}
    for path, module in model.named_modules():
        module = module.base if isinstance(module, Host) else module
        if fmt.matches(module) and not path.endswith(".base"):
            found[path] = module
    return found


def stored_bytes(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.weight.clone(), m.weight_scale.clone()) for n, m in quantized_layers(model).items()}


def same_bytes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def randomize(model: nn.Module, name: str, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"branches.{name}." in n:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def ref_quantize(w: torch.Tensor, bits: int, scale_dtype: torch.dtype):
    """The format's formula in float64: scale = max|w| / (2^(bits-1) - 1), kept in scale_dtype; int = round(w/scale)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.double().abs().amax(1) / qmax).to(scale_dtype).double()
    real = torch.nan_to_num(w.double() / scale[:, None])  # a zero row: scale 0, ints 0
    return torch.round(real).clamp(-qmax - 1, qmax), scale, real


# ------------------------------------------------------------------------------------------ the format itself

def test_int4_packing_layout_and_roundtrip():
    values = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.dtype == torch.int8 and packed.shape == (1, 2)
    assert packed.view(torch.uint8).tolist() == [[0x1F, 0x87]]  # even column in the high nibble
    every = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8).reshape(4, 128)
    assert torch.equal(unpack_int4(pack_int4(every)), every)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_follows_the_formula_and_forward_is_a_dequantized_linear(bits):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(32, 12)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(12, 32, generator=g) * 0.2)
        linear.weight[3] = 0.0  # a zero row: scale 0, ints 0
    layer = QuantizedLinear.from_linear(linear, bits, scale_dtype=torch.float16)
    ints = unpack_int4(layer.weight) if bits == 4 else layer.weight
    assert layer.weight.shape == (12, 32 * bits // 8) and layer.weight_scale.dtype == torch.float16
    ref_ints, ref_scale, _ = ref_quantize(linear.weight, bits, torch.float16)
    assert torch.equal(ints.double(), ref_ints) and torch.equal(layer.weight_scale.double(), ref_scale)
    assert ints.abs().max() <= 2 ** (bits - 1) - 1 and not ints[3].any()
    x = torch.randn(5, 32, generator=g)
    expected = F.linear(x.double(), ref_ints * ref_scale[:, None], linear.bias.double())
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_quantized_forward_gives_grad_to_the_input_only():
    layer = QuantizedLinear.from_linear(nn.Linear(16, 6), 4)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    scale = layer.weight_scale.double()
    assert torch.autograd.gradcheck(lambda t: DequantLinear.apply(t, layer.weight, scale, 4), (x,))
    layer(x.float()).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in layer.parameters())


def test_quantize_refuses_bad_input_and_changes_nothing():
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 5), nn.Linear(5, 4))
    before, children = snapshot(model), list(model)
    with pytest.raises(ValueError, match="weight_bit_width must be 4 or 8, got 3"):
        quantize(model, 3)
    with pytest.raises(ValueError, match="cannot quantize '2' to 4 bits: odd in_features 5"):
        quantize(model, 4)
    assert list(model) == children
    assert_bit_identical(model, before)
    assert quantize(model, 8, exclude=["1"]) == ["0", "2"] and isinstance(model[1], nn.Linear)


def test_format_recognises_the_signature_not_the_class():
    fmt = ChatGLMQuantFormat()

    class Anything(nn.Module):  # ChatGLM's layer under another name, scales as a buffer
        def __init__(self, bits, rows=6, cols=4, scale_rows=6):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=torch.int8), requires_grad=False)
            self.register_buffer("weight_scale", torch.ones(scale_rows, dtype=torch.float16))
            self.weight_bit_width = bits

    assert fmt.matches(Anything(4)) and fmt.features(Anything(4)) == (8, 6) and fmt.features(Anything(8)) == (4, 6)
    assert not fmt.matches(Anything(3)) and not fmt.matches(Anything(4, scale_rows=5))
    assert not fmt.matches(nn.Linear(4, 6)) and surgery.core.registry.manager().format_of(Anything(8)) is not None


def test_the_graph_must_confirm_the_format():
    class Liar(nn.Module):
        """Says 4 bits, but its forward reads the int8 tensor as 8-bit: the graph sees 8 inputs, not 16."""

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(6, 8, dtype=torch.int8), requires_grad=False)
            self.weight_scale = nn.Parameter(torch.ones(6), requires_grad=False)
            self.weight_bit_width = 4

        def forward(self, x):
            return F.linear(x, self.weight.to(x.dtype) * self.weight_scale[:, None])

    model = nn.Sequential(Liar(), nn.Linear(6, 3))
    report = surgery.inspect(model, args=(torch.randn(2, 8),))
    assert report.unknown == ["0"] and [s.path for s in report.sites] == ["1"]


# ------------------------------------------------------------------------------------------ LoRA on INT4 / INT8

@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_quantized_glm_trains_merges_and_unmerges_exactly(bits):
    model, x = glm(bits), glm_ids()
    before, modules = snapshot(model), dict(model.named_modules())
    report = surgery.inspect(model, args=(x,))
    fused = report.site("encoder.layers.0.self_attention.query_key_value")
    assert fused.kind == "quantized_linear" and fused.format == "chatglm_int"
    assert fused.slices == {"attention.query": ((0, 64),), "attention.key": ((64, 96),), "attention.value": ((96, 128),)}
    assert sum(s.kind == "quantized_linear" for s in report.sites) == 8

    surgery.attach(model, WHOLE, name="a", args=(x,))
    assert {b.lora_A.dtype for b in model._surgery_ledger.attachments["a"].branches.values()} == {torch.float32}
    layers, stored = quantized_layers(model), stored_bytes(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(8):
        ids = glm_ids(seed=step)
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "branches" not in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert same_bytes(stored_bytes(model), stored)  # training never touches the quantized tensors
    originals = {n: m.dequantized(torch.float64) for n, m in layers.items()}
    with torch.no_grad():
        adapted = model(x)
    deltas = {n: model.get_submodule(n).branches["a"].weight_delta().detach().double() for n in layers}

    reports = surgery.merge(model, "a")
    assert set(reports) == set(layers)
    for path, layer in layers.items():  # the merged bytes are the formula applied to W + B A s, in float64
        target = originals[path] + deltas[path]
        ref_ints, ref_scale, real = ref_quantize(target, bits, layer.weight_scale.dtype)
        ints = unpack_int4(layer.weight) if bits == 4 else layer.weight
        tie = ((real - real.floor()) - 0.5).abs() < 1e-4  # float32 and float64 may round these either way
        assert bool(((ints.double() == ref_ints) | tie).all()), path
        torch.testing.assert_close(layer.weight_scale.double(), ref_scale, rtol=1e-6, atol=0)
        error = layer.dequantized(torch.float64) - target
        probe = torch.randn(PROBE_ROWS, target.shape[1], generator=torch.Generator().manual_seed(0)).double()
        expected = {"relative_weight_error": float(error.norm() / target.norm()),
                    "relative_update_error": float(error.norm() / deltas[path].norm()),
                    "max_abs_output_change": float((probe @ error.T).abs().max())}
        for key, value in expected.items():
            torch.testing.assert_close(reports[path][key], value, rtol=1e-3, atol=1e-7)
    with torch.no_grad():
        merged = model(x)
    assert not torch.equal(merged, adapted)

    surgery.unmerge(model, "a")
    for path, layer in layers.items():
        assert torch.equal(layer.dequantized(torch.float64), originals[path])
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=0)
    surgery.merge(model, "a")
    surgery.detach(model, "a")  # unmerges first
    assert_bit_identical(model, before)
    assert all(model.get_submodule(n) is m for n, m in modules.items())


def test_lora_on_quantized_matches_peft_on_the_dequantized_float_model(tmp_path):
    """HF PEFT refuses the quantized layer; on a float copy holding the dequantized weights it must agree."""
    model, x = glm(4), glm_ids()
    reference = copy.deepcopy(model)
    for path, layer in quantized_layers(reference).items():
        parent, _, attr = path.rpartition(".")
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        setattr(reference.get_submodule(parent), attr, linear)
    theirs = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]))
    surgery.attach(model, WHOLE, name="a", args=(x,))
    g = torch.Generator().manual_seed(0)
    pairs = []
    with torch.no_grad():
        for path, branch in model._surgery_ledger.attachments["a"].branches.items():
            layer = theirs.base_model.model.get_submodule(path)
            branch.lora_A.copy_(torch.randn(branch.lora_A.shape, generator=g) * 0.1)
            branch.lora_B.copy_(torch.randn(branch.lora_B.shape, generator=g) * 0.1)
            layer.lora_A["default"].weight.copy_(branch.lora_A)
            layer.lora_B["default"].weight.copy_(branch.lora_B)
            pairs.append((branch, layer))
    assert len(pairs) == 8
    ours, peft_out = model(x), theirs(x)
    torch.testing.assert_close(ours, peft_out, rtol=1e-5, atol=1e-5)
    ours.square().mean().backward()
    peft_out.square().mean().backward()
    for branch, layer in pairs:
        torch.testing.assert_close(branch.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(branch.lora_B.grad, layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(surgery.SurgeryError, match="float and bitsandbytes layers only.*format chatglm_int"):
        surgery.save(model, tmp_path / "peft", name="a", format="peft")  # PEFT cannot wrap these layers
    assert not (tmp_path / "peft" / "adapter_config.json").exists()


def test_branch_runs_in_the_activation_dtype():
    model = tiny.build("llama")  # float32 activations, float16 scales (ChatGLM's checkpoint layout)
    quantize(model, 8, exclude=["lm_head"], scale_dtype=torch.float16)
    site = surgery.inspect(model).site("model.layers.0.mlp.down_proj")
    assert (site.kind, site.dtype) == ("quantized_linear", torch.float32)
    surgery.attach(model, WHOLE, name="a")
    assert model.model.layers[0].mlp.down_proj.branches["a"].lora_A.dtype == torch.float32

    model = tiny.build("llama")
    quantize(model, 4, exclude=["lm_head"])
    model.to(torch.bfloat16)  # converts scales and biases with the model, as ChatGLM's .half() does
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.int8 and down.weight_scale.dtype == torch.bfloat16
    surgery.attach(model, WHOLE, name="a")
    branch = model.model.layers[0].mlp.down_proj.branches["a"]
    assert branch.lora_A.dtype == torch.bfloat16
    out = model(torch.randint(3, 128, (2, 8))).logits
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert branch.lora_A.grad is not None and branch.lora_A.grad.dtype == torch.bfloat16


def test_several_adapters_on_the_same_quantized_layers():
    model, x = glm(4), glm_ids()
    before = snapshot(model)
    surgery.attach(model, WHOLE, name="a", args=(x,))
    surgery.attach(model, "lora-qv", name="b")  # q and v slices of the fused query_key_value
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    qkv = model.encoder.layers[0].self_attention.query_key_value
    assert set(qkv.branches) == {"a", "b"} and set(qkv.branches["b"].parts) == {"query", "value"}

    original = stored_bytes(model)
    surgery.merge(model, "b")
    b_alone = stored_bytes(model)
    assert not same_bytes(b_alone, original)
    surgery.unmerge(model, "b")
    surgery.merge(model, "a")
    surgery.merge(model, "b")
    surgery.unmerge(model, "a")  # b is taken out and merged again around it
    assert same_bytes(stored_bytes(model), b_alone)
    surgery.unmerge(model, "b")
    assert same_bytes(stored_bytes(model), original)
    surgery.set_active(model, ["a", "b"])
    with torch.no_grad():
        both = model(x)
        surgery.set_active(model, "a")
        only_a = model(x)
        surgery.set_active(model, "b")
        only_b = model(x)
        with surgery.disabled(model):
            base = model(x)
    assert len({tuple(t.flatten().tolist()) for t in (both, only_a, only_b, base)}) == 4
    surgery.detach(model, "a")
    surgery.detach(model, "b")
    assert_bit_identical(model, before)


def test_merge_into_float_swaps_in_a_dequantized_linear_and_back():
    model, x = glm(4), glm_ids()
    before = snapshot(model)
    dense = model.encoder.layers[1].mlp.dense_4h_to_h
    surgery.attach(model, WHOLE, name="a", args=(x,))
    surgery.attach(model, "lora-qv", name="b")
    randomize(model, "a", seed=3)
    randomize(model, "b", seed=4)
    surgery.set_active(model, "a")
    with torch.no_grad():
        adapted = model(x)
    with pytest.raises(ValueError, match="merge into='fp32'"):
        surgery.merge(model, "a", into="fp32")
    reports = surgery.merge(model, "a", into="float")
    host = model.encoder.layers[1].mlp.dense_4h_to_h
    assert type(host.base) is nn.Linear and host.base.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in host.base.parameters())
    assert all(r["relative_weight_error"] == 0.0 for r in reports.values())  # float32 holds W + B A s as computed
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    surgery.merge(model, "b")  # into the float linears where a sits, into the int4 bytes elsewhere
    surgery.unmerge(model, "a")
    assert host.base is dense
    surgery.detach(model, "b")
    surgery.detach(model, "a")
    assert_bit_identical(model, before)
    assert model.encoder.layers[1].mlp.dense_4h_to_h is dense

    surgery.attach(model, WHOLE, name="c", args=(x,))  # merge into float, then bake: a plain float model
    randomize(model, "c", seed=5)
    with torch.no_grad():
        adapted = model(x)
        surgery.merge(model, "c", into="float")
        surgery.bake(model, "c")
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    assert type(model.encoder.layers[1].mlp.dense_4h_to_h) is nn.Linear and not quantized_layers(model)


# ------------------------------------------------------------------------------------------ a format of one's own

class GroupInt8Linear(nn.Module):
    """A made-up layout: int8 `codes` [out, in] with one float scale per group of `group` inputs."""

    def __init__(self, linear: nn.Linear, group: int = 8):
        super().__init__()
        w = linear.weight.detach().reshape(linear.out_features, -1, group)
        scales = w.abs().amax(-1) / 127
        self.group = group
        self.codes = nn.Parameter(torch.round(w / scales[..., None]).to(torch.int8).flatten(1), requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)

    def dense(self) -> torch.Tensor:
        return self.codes.float() * self.scales.repeat_interleave(self.group, dim=1)

    def forward(self, x):
        return F.linear(x, self.dense().to(x.dtype))


class GroupInt8Format:
    name, kind, priority, is_view = "group_int8", "quantized_linear", 5, False

    def matches(self, module):
        codes, scales = getattr(module, "codes", None), getattr(module, "scales", None)
        return (isinstance(codes, torch.Tensor) and codes.dtype == torch.int8 and isinstance(scales, torch.Tensor)
                and isinstance(getattr(module, "group", None), int)
                and scales.shape[1] * module.group == codes.shape[1])

    def features(self, module):
        return module.codes.shape[1], module.codes.shape[0]

    def dense(self, module):
        return module.dense()

    def store(self, module, weight):
        w = weight.reshape(weight.shape[0], -1, module.group)
        scales = w.abs().amax(-1) / 127
        module.codes.copy_(torch.round(w / scales[..., None]).to(torch.int8).flatten(1))
        module.scales.copy_(scales)

    def snapshot(self, module):
        return {"codes": module.codes.clone(), "scales": module.scales.clone()}

    def restore(self, module, saved):
        module.codes.copy_(saved["codes"])
        module.scales.copy_(saved["scales"])


class GroupInt8Plugin:
    @surgery.hookimpl
    def surgery_weight_formats(self):
        return [GroupInt8Format()]


@pytest.fixture
def group_int8_plugin():
    plugin = GroupInt8Plugin()
    surgery.register_plugin(plugin, name="test-group-int8")
    yield
    surgery.core.registry.manager().unregister(plugin)


def test_a_made_up_format_gets_lora_merge_and_unmerge_through_the_hook(group_int8_plugin):
    model = tiny.build("llama")
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            setattr(layer.self_attn, name, GroupInt8Linear(getattr(layer.self_attn, name)))
    before, x = snapshot(model), torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x).logits
    report = surgery.inspect(model)
    site = report.site("model.layers.0.self_attn.v_proj")
    assert (site.kind, site.format, site.roles) == ("quantized_linear", "group_int8", frozenset({"attention.value"}))
    surgery.attach(model, "lora-qv", name="a")
    randomize(model, "a")
    with torch.no_grad():
        adapted = model(x).logits
        reports = surgery.merge(model, "a")
        assert set(reports) == {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")}
        assert all(r["relative_weight_error"] > 0 for r in reports.values())  # requantized: not exact
        assert (model(x).logits - adapted).abs().max() < (adapted - base).abs().max() / 10
    surgery.detach(model, "a")
    assert_bit_identical(model, before)


class Opaque(nn.Module):
    """An int8 layer torch.export cannot trace (its forward leaves torch for numpy)."""

    def __init__(self):
        super().__init__()
        self.codes = nn.Parameter(torch.randint(-127, 128, (6, 8), dtype=torch.int8), requires_grad=False)
        self.scales = nn.Parameter(torch.full((6, 1), 0.01), requires_grad=False)
        self.group = 8

    def forward(self, x):
        return F.linear(x, torch.from_numpy(self.codes.numpy()).to(x.dtype) * self.scales)


class OpaqueFormat(GroupInt8Format):
    name = "opaque_int8"

    def analysis_stand_in(self, module):
        return TraceStandIn(8, 6, False, module.codes.device)


class OpaquePlugin:
    @surgery.hookimpl
    def surgery_weight_formats(self):
        return [OpaqueFormat()]


def test_a_format_can_give_the_analysis_a_stand_in_for_an_untraceable_layer():
    model, x = nn.Sequential(Opaque(), nn.Linear(6, 3)), torch.randn(2, 8)
    with pytest.raises(Exception):
        surgery.inspect(model, args=(x,))
    plugin = OpaquePlugin()
    surgery.register_plugin(plugin, name="test-opaque")
    try:
        report = surgery.inspect(model, args=(x,))
        assert [(s.path, s.kind, s.format) for s in report.sites] == [("0", "quantized_linear", "opaque_int8"),
                                                                      ("1", "linear", None)]
        assert type(model[0]) is Opaque  # put back after the trace
    finally:
        surgery.core.registry.manager().unregister(plugin)


class KernelQuantizedLinear(nn.Module):
    """ChatGLM's layer as its checkpoints load it: same tensors, but dequantized by a kernel outside torch (here
    numpy, there cpm_kernels through ctypes), which torch.export cannot trace."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        self.weight_bit_width = layer.weight_bit_width
        self.weight, self.weight_scale, self.bias = layer.weight, layer.weight_scale, layer.bias

    def forward(self, x):
        ints = torch.from_numpy(unpack_int4(self.weight).numpy() if self.weight_bit_width == 4 else self.weight.numpy())
        return F.linear(x, ints.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None], self.bias)


def test_chatglm_layers_that_export_cannot_trace_are_read_through_a_stand_in():
    model, x = glm(4), glm_ids()
    for path, layer in quantized_layers(model).items():
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, KernelQuantizedLinear(layer))
    before = snapshot(model)
    report = surgery.inspect(model, args=(x,))
    qkv = report.site("encoder.layers.1.self_attention.query_key_value")
    assert (qkv.kind, qkv.format, qkv.module_class.rsplit(".", 1)[-1]) == ("quantized_linear", "chatglm_int",
                                                                           "KernelQuantizedLinear")
    assert qkv.slices == {"attention.query": ((0, 64),), "attention.key": ((64, 96),), "attention.value": ((96, 128),)}
    assert report.site("encoder.layers.1.mlp.dense_h_to_4h").slices == {"mlp.gate": ((0, 80),), "mlp.up": ((80, 160),)}
    assert all(type(m) is KernelQuantizedLinear for m in quantized_layers(model).values())
    surgery.attach(model, "lora-qv", name="a", args=(x,))
    randomize(model, "a")
    surgery.merge(model, "a")
    surgery.detach(model, "a")
    assert_bit_identical(model, before)


# ------------------------------------------------------------------------------------------ the ChatGLM rule file

def test_chatglm_rule_file_declares_what_the_graph_reads_on_chatglm2_6b_shapes():
    with torch.device("meta"):  # ChatGLM2-6B's attention and MLP shapes, one layer, no memory
        model = TinyGLM(vocab=96, dim=4096, heads=32, kv_heads=2, ffn=13696, layers=1)
    quantize(model, 4, exclude=["output_layer"])
    x = torch.zeros(1, 8, dtype=torch.long, device="meta")
    report = surgery.inspect(model, args=(x,))
    ruleset = read_ruleset(RULES)
    assert ruleset.name == "chatglm-lora" and "chatglm-lora" in surgery.rules.schema.builtin_rulesets()
    inferred = plan_sites(ruleset, report, 0)
    stripped = Report(report.model_class, [dataclasses.replace(s, roles=frozenset(), slices={}) for s in report.sites])
    declared = plan_sites(ruleset, stripped, 0)  # the file alone, as for a model whose graph hides the roles
    assert [(p.site.path, p.roles, p.site.slices, p.trainable) for p in declared.placements] == \
           [(p.site.path, p.roles, p.site.slices, p.trainable) for p in inferred.placements]
    qkv = declared.placements[0].site
    assert qkv.kind == "quantized_linear" and qkv.slices["attention.key"] == ((4096, 4352),)
    with pytest.raises(RuleFileError, match=r"chatglm.yaml: role override 0: slice end 4096 exceeds the 128 output"):
        surgery.plan(glm(4), RULES, args=(glm_ids(),))


# ------------------------------------------------------------------------------------------ bitsandbytes

def test_bitsandbytes_plugin_is_empty_without_bitsandbytes():
    if bnb_formats.installed():
        pytest.skip("bitsandbytes is installed")
    assert bnb_formats.surgery_weight_formats() == []


def test_surgery_never_imports_bitsandbytes_itself():
    """Importing bitsandbytes takes seconds: a model without its layers must not pay for it."""
    if not bnb_formats.installed():
        pytest.skip("bitsandbytes is not installed, so nothing could import it")
    script = ("import sys, surgery; from surgery import tiny; m = tiny.build('llama'); surgery.attach(m, 'lora-qv'); "
              "surgery.merge(m, 'default'); print('bitsandbytes' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"
    assert {f.name for f in bnb_formats.surgery_weight_formats()} == {"bnb_4bit", "bnb_int8"}
