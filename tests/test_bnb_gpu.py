"""bitsandbytes layers through surgery's weight-format hook, on a GPU: LoRA on `Linear4bit` (NF4) and
`Linear8bitLt` (LLM.int8()), merge (requantized), exact unmerge, merge into float, detach.

A tiny random Llama in float16 has every decoder linear replaced by the bitsandbytes layer; nothing is downloaded.
Skipped without CUDA or without bitsandbytes (CPU CI, or a GPU image without it).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from surgery import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes layers need a CUDA device")


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def bnb_llama(bnb, bits: int) -> nn.Module:
    """A tiny float16 Llama on the GPU whose decoder linears are bitsandbytes layers (lm_head stays float)."""
    model = tiny.build("llama", dtype=torch.float16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, nn.Linear):
                    continue
                bias = linear.bias is not None
                if bits == 4:
                    new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                            compute_dtype=torch.float16, quant_type="nf4")
                else:
                    new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                              has_fp16_weights=False, threshold=0.0)
                new.load_state_dict(linear.state_dict())
                setattr(parent, name, new)
    return model.cuda().eval()  # bitsandbytes quantizes when the weights move to the GPU


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state_dict entry (bitsandbytes adds its quant state and SCB) as a CPU copy."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`tensors` of the base model while adapters are attached: branch tensors left out, Host paths undone."""
    return {k.replace(".base.", "."): v for k, v in tensors(model).items() if ".branches." not in k}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    changed = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not changed, f"tensors changed: {changed[:8]}"


@pytest.fixture(params=[4, 8], ids=["nf4", "int8"])
def setup(request, bnb):
    """A bitsandbytes Llama of 4 or 8 bits, an input, its logits and its tensors before any surgery."""
    model = bnb_llama(bnb, request.param)
    x = torch.randint(3, 128, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        model(x)  # one forward first: Linear8bitLt moves its scales into its state on the first call
        base = model(x).logits.float()
    return model, x, base, tensors(model)


def test_inspect_finds_the_bitsandbytes_layers(setup):
    report = surgery.inspect(setup[0])
    quantized = [s for s in report.sites if s.kind == "quantized_linear"]
    assert quantized, f"no bitsandbytes site recognised: {sorted(f'{s.path} {s.kind}' for s in report.sites)}"


def test_lora_merge_unmerge_detach_round_trip(setup):
    model, x, base, before = setup
    modules = dict(model.named_modules())
    surgery.attach(model, "lora-all-linear", name="a")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
        adapted = model(x).logits.float()
    assert (adapted - base).abs().max() > 0, "the adapter has no effect"

    model(x).logits.float().square().mean().backward()
    named = dict(model.named_parameters())
    assert all(p.grad is not None for n, p in named.items() if "lora_" in n), "a LoRA tensor got no gradient"
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n), "a base tensor got a gradient"

    with torch.no_grad():
        reports = surgery.merge(model, "a")  # requantized into the bitsandbytes layers
        merged = model(x).logits.float()
        surgery.unmerge(model, "a")
        assert_same(base_tensors(model), before)  # exact unmerge: the quantized bytes as they were
        back = model(x).logits.float()
        surgery.merge(model, "a", into="float")
        float_merged = model(x).logits.float()
        surgery.detach(model, "a")
        after = model(x).logits.float()
    assert_same(tensors(model), before)  # detach: the model's tensors bit for bit
    assert all(model.get_submodule(n) is m for n, m in modules.items()), "a module was not put back"
    assert torch.equal(after, base), "logits after detach differ from the base model's"
    # reported, not bounded (as the GPU check printed them): run with -s to see
    print({"sites": len(reports),
           "mean_relative_weight_error": sum(r["relative_weight_error"] for r in reports.values()) / len(reports),
           "mean_relative_update_error": sum(r["relative_update_error"] for r in reports.values()) / len(reports),
           "max_abs_output_change": max(r["max_abs_output_change"] for r in reports.values()),
           "merged_vs_adapted_logits": float((merged - adapted).abs().max()),
           "unmerged_vs_adapted_logits": float((back - adapted).abs().max()),
           "float_merge_vs_adapted_logits": float((float_merged - adapted).abs().max())})
