"""What merging LoRA into INT4/INT8 weights costs: the figures `surgery.merge` reports, on two setups.

    python benchmarks/quantized_merge_error.py [--steps 40]

1. The ChatGLM-like test model (tests/custom_models.py), its linears quantized, LoRA (r=8, alpha=16) on every
   quantized linear trained for a few steps on a toy task: per-site figures (mean and max over the 8 sites) and
   the model-level change (max |logit diff| merged vs unmerged, probe loss).
2. One ChatGLM2-6B-shaped query_key_value [4608, 4096], weights N(0, 0.02), with a random rank-8 update scaled to
   ||dW|| / ||W|| = 0.1%, 1% and 10%: how much of the update survives requantization.

Figures (what `surgery.merge` returns per site): relative weight error ||Q(W + dW) - (W + dW)|| / ||W + dW||;
relative update error ||Q(W + dW) - (W + dW)|| / ||dW|| (1 = the update is lost entirely); max |dy| =
max |x (Q - (W + dW))^T| over a standard-normal probe batch of 32 rows. Writes
benchmarks/results/quantized_merge_error-cpu.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from torch import nn

import surgery

sys.path.append(str(Path(__file__).resolve().parent.parent))  # after PYTHONPATH: an A/B install still wins
from tests.custom_models import TinyGLM

LORA = surgery.RuleSet(name="lora-quantized", rules=[surgery.Rule(
    select=surgery.Selector(kinds=["quantized_linear"]), method="lora", params={"r": 8, "alpha": 16})])
KEYS = ("relative_weight_error", "relative_update_error", "max_abs_output_change")


def toy_batch(generator: torch.Generator, size: int = 8, seq: int = 16, vocab: int = 96) -> torch.Tensor:
    return (torch.randint(0, vocab, (size, 1), generator=generator) + torch.arange(seq)) % vocab


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def trained_glm(bits: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = TinyGLM().train()
    harness.quantize(model, bits, exclude=["output_layer"])
    generator = torch.Generator().manual_seed(0)
    probe = toy_batch(generator)
    surgery.attach(model, LORA, name="a", args=(probe,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(steps):
        lm_loss(model, toy_batch(generator)).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        adapted, adapted_loss = model(probe), lm_loss(model, probe).item()
        reports = surgery.merge(model, "a")
        merged, merged_loss = model(probe), lm_loss(model, probe).item()
    result = {k: {"mean": statistics.mean(r[k] for r in reports.values()), "max": max(r[k] for r in reports.values())}
              for k in KEYS}
    result |= {"sites": len(reports), "max_abs_logit_diff": (merged - adapted).abs().max().item(),
               "probe_loss_unmerged": adapted_loss, "probe_loss_merged": merged_loss}
    cells = [f"{result[k]['mean']:.2e} / {result[k]['max']:.2e}" for k in KEYS]
    print(f"TinyGLM INT{bits}  {len(reports)} sites  " + "  ".join(f"{k}: {c}" for k, c in zip(KEYS, cells)))
    print(f"             max |logit diff| merged vs unmerged {result['max_abs_logit_diff']:.3e}; "
          f"probe loss unmerged {adapted_loss:.4f}, merged {merged_loss:.4f}")
    surgery.detach(model, "a")
    return result


def chatglm2_qkv(bits: int, ratio: float) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(4096, 4608, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4608, 4096, generator=g) * 0.02)
    model = nn.Sequential(linear)
    harness.quantize(model, bits, scale_dtype=torch.float16)
    surgery.attach(model, LORA, name="a", args=(torch.randn(2, 4096),))
    host = model[0]
    branch = host.branches["a"]
    with torch.no_grad():
        branch.lora_A.copy_(torch.randn(branch.lora_A.shape, generator=g))
        branch.lora_B.copy_(torch.randn(branch.lora_B.shape, generator=g))
        base = host.base.dequantized()
        branch.lora_B.mul_(ratio * base.norm() / branch.weight_delta().norm())
    report = surgery.merge(model, "a")["0"]
    surgery.detach(model, "a")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None,
                        help="results file (default: benchmarks/results/quantized_merge_error-cpu.json)")
    args = parser.parse_args()
    results: dict = {"meta": {"steps": args.steps}, "tiny_glm": {}, "chatglm2_qkv": {}}
    print("1. trained LoRA on the ChatGLM-like test model (mean / max over sites)")
    for bits in (4, 8):
        results["tiny_glm"][f"int{bits}"] = trained_glm(bits, args.steps)
    print("\n2. ChatGLM2-6B query_key_value shape [4608, 4096], W ~ N(0, 0.02), random rank-8 update")
    print(f"{'bits':>4s} {'|dW|/|W|':>9s} " + " ".join(f"{k:>22s}" for k in KEYS))
    for bits in (4, 8):
        for ratio in (0.001, 0.01, 0.1):
            r = chatglm2_qkv(bits, ratio)
            results["chatglm2_qkv"][f"int{bits} dW/W={ratio}"] = {k: r[k] for k in KEYS}
            print(f"{bits:4d} {ratio:9.3f} " + " ".join(f"{r[k]:22.3e}" for k in KEYS))
    print(f"wrote {harness.write_results('quantized_merge_error', 'cpu', results, args.out)}")


if __name__ == "__main__":
    main()
