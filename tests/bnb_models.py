"""Tiny models whose linears are bitsandbytes layers, and the checks the bitsandbytes tests share (CPU and GPU).

bitsandbytes quantizes a layer's weight when the layer is moved with `.to(device)`; on a CPU with AVX512-BF16 it
also repacks a 4-bit weight, lossily, for its CPU inference kernel on the first no-grad forward in eval mode. The
models here turn that repacking off, so that their packed bytes stay as quantized.
"""
from __future__ import annotations

import torch
from torch import nn

import surgery
from surgery import tiny


def to_bnb(model: nn.Module, bits: int, device: str, compute_dtype: torch.dtype,
           double_quant: bool = False) -> nn.Module:
    """`model` with every nn.Linear but its output head replaced by a bitsandbytes layer (4 bits: NF4 `Linear4bit`;
    8 bits: int8 `Linear8bitLt`), quantized by moving it to `device`; the HF PEFT flag of a 4-bit load set."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, linear in list(parent.named_children()):
            if type(linear) is not nn.Linear or linear is head:
                continue
            bias = linear.bias is not None
            if bits == 4:
                new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                        compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8)
                new.support_avx512bf16_for_cpu = False
            else:
                new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                          has_fp16_weights=False, threshold=0.0)
            new.load_state_dict(linear.state_dict())
            setattr(parent, name, new)
    model.is_loaded_in_4bit = bits == 4  # what transformers sets on a 4-bit load: PEFT then wraps Linear4bit itself
    return model.to(device)


def bnb_model(arch: str, bits: int, device: str, dtype: torch.dtype, double_quant: bool = False) -> nn.Module:
    """A tiny `arch` (surgery.tiny) in `dtype` on `device`, its linears but the head bitsandbytes layers computing
    in `dtype`, in eval mode."""
    return to_bnb(tiny.build(arch, dtype=dtype), bits, device, dtype, double_quant).eval()


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


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits.float()


def round_trip(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """LoRA on every linear of a bitsandbytes `model`: it changes the logits; gradients reach the LoRA tensors
    only; merge (requantized), unmerge (the quantized bytes exactly as they were), merge into float, detach (every
    tensor bit for bit, every module put back, the base logits). Returns what the merges changed (reported, not
    bounded: rounding into 4 or 8 bits is the format's)."""
    with torch.no_grad():
        base = logits(model, x)
    before, modules = tensors(model), dict(model.named_modules())
    surgery.attach(model, "lora-all-linear", name="a")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
        adapted = logits(model, x)
    assert (adapted - base).abs().max() > 0, "the adapter has no effect"

    logits(model, x).square().mean().backward()
    named = dict(model.named_parameters())
    assert all(p.grad is not None for n, p in named.items() if "lora_" in n), "a LoRA tensor got no gradient"
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n), "a base tensor got a gradient"

    with torch.no_grad():
        reports = surgery.merge(model, "a")  # requantized into the bitsandbytes layers
        merged = logits(model, x)
        surgery.unmerge(model, "a")
        assert_same(base_tensors(model), before)  # exact unmerge: the quantized bytes as they were
        back = logits(model, x)
        surgery.merge(model, "a", into="float")
        float_merged = logits(model, x)
        surgery.detach(model, "a")
        after = logits(model, x)
    assert_same(tensors(model), before)  # detach: the model's tensors bit for bit
    assert all(model.get_submodule(n) is m for n, m in modules.items()), "a module was not put back"
    assert torch.equal(after, base), "logits after detach differ from the base model's"
    return {"sites": len(reports),
            "mean_relative_weight_error": sum(r["relative_weight_error"] for r in reports.values()) / len(reports),
            "mean_relative_update_error": sum(r["relative_update_error"] for r in reports.values()) / len(reports),
            "max_abs_output_change": max(r["max_abs_output_change"] for r in reports.values()),
            "merged_vs_adapted_logits": float((merged - adapted).abs().max()),
            "unmerged_vs_adapted_logits": float((back - adapted).abs().max()),
            "float_merge_vs_adapted_logits": float((float_merged - adapted).abs().max())}
