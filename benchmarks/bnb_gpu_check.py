"""bitsandbytes layers through surgery's weight-format hook, on a GPU: LoRA on `Linear4bit` (NF4) and
`Linear8bitLt` (LLM.int8()), merge (requantized), exact unmerge, merge into float, detach.

    python benchmarks/bnb_gpu_check.py

Exits 0 with a message when bitsandbytes or CUDA is missing (CPU CI, or a GPU image without bitsandbytes).
A tiny random Llama in float16 has every decoder linear replaced by the bitsandbytes layer; nothing is downloaded.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgery  # noqa: E402
from surgery import tiny  # noqa: E402


def available() -> str | None:
    """None if the check can run, else why not."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def bnb_llama(bits: int) -> nn.Module:
    """A tiny float16 Llama on the GPU whose decoder linears are bitsandbytes layers (lm_head stays float)."""
    import bitsandbytes as bnb

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


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def check(bits_list: tuple[int, ...] = (4, 8)) -> list[dict]:
    """Run the round trip for each bit width; return one result dict each (also printed)."""
    results = []
    for bits in bits_list:
        model = bnb_llama(bits)
        x = torch.randint(3, 128, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with torch.no_grad():
            model(x)  # one forward first: Linear8bitLt moves its scales into its state on the first call
            base = model(x).logits.float()
        before, modules = tensors(model), dict(model.named_modules())
        try:
            report = surgery.inspect(model)
        except Exception as err:  # the graph analysis could not read the bitsandbytes layers
            result = {"bits": bits, "unmerge_bit_exact": False, "detach_bit_exact": False,
                      "note": f"inspect failed: {type(err).__name__}: {err}"[:2000]}
            print(result)
            results.append(result)
            continue
        kinds = sorted({f"{s.kind}[{s.format}]" for s in report.sites if s.kind == "quantized_linear"})
        quantized = sum(s.kind == "quantized_linear" for s in report.sites)
        result = {"bits": bits, "quantized_sites": quantized, "formats": kinds, "unknown": report.unknown}
        if not quantized:
            result.update(unmerge_bit_exact=False, detach_bit_exact=False, note="no bitsandbytes site recognised")
            print(result)
            results.append(result)
            continue
        surgery.attach(model, "lora-all-linear", name="a")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
            adapted = model(x).logits.float()
        model(x).logits.float().square().mean().backward()
        lora_grads = all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
        frozen = all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        with torch.no_grad():
            reports = surgery.merge(model, "a")
            merged = model(x).logits.float()
            surgery.unmerge(model, "a")
            unmerged_exact = same(base_tensors(model), before)
            back = model(x).logits.float()
            surgery.merge(model, "a", into="float")
            float_merged = model(x).logits.float()
            surgery.detach(model, "a")
            after = model(x).logits.float()
        result.update(
            lora_grads=lora_grads, frozen_base=frozen,
            adapter_effect=float((adapted - base).abs().max()),
            mean_relative_weight_error=sum(r["relative_weight_error"] for r in reports.values()) / len(reports),
            mean_relative_update_error=sum(r["relative_update_error"] for r in reports.values()) / len(reports),
            max_abs_output_change=max(r["max_abs_output_change"] for r in reports.values()),
            merged_vs_adapted_logits=float((merged - adapted).abs().max()),
            unmerged_vs_adapted_logits=float((back - adapted).abs().max()),
            float_merge_vs_adapted_logits=float((float_merged - adapted).abs().max()),
            unmerge_bit_exact=unmerged_exact,
            detach_bit_exact=same(tensors(model), before)
            and all(model.get_submodule(n) is m for n, m in modules.items()),
            detach_logits_equal=bool(torch.equal(after, base)),
        )
        print(result)
        results.append(result)
    return results


def main() -> int:
    reason = available()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    import bitsandbytes

    print(f"bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    results = check()
    ok = all(r["unmerge_bit_exact"] and r["detach_bit_exact"] for r in results)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
