"""What merging LoRA into INT4/INT8 weights costs: the figures `surgery.merge` reports, on two setups.

    python benchmarks/quantized_merge_error.py [--steps 40]

1. The ChatGLM-like test model (tests/custom_models.py), its linears quantized, LoRA (r=8, alpha=16) on every
   quantized linear trained for a few steps on a toy task: per-site figures (mean and max over the 8 sites) and
   the model-level change (max |logit diff| merged vs unmerged, probe loss).
2. One ChatGLM2-6B-shaped query_key_value [4608, 4096], weights N(0, 0.02), with a random rank-8 update scaled to
   ||dW|| / ||W|| = 0.1%, 1% and 10%: how much of the update survives requantization.

Figures (see surgery.weights.merge_error): relative weight error ||Q(W + dW) - (W + dW)|| / ||W + dW||; relative
update error ||Q(W + dW) - (W + dW)|| / ||dW|| (1 = the update is lost entirely); max |dy| = max |x (Q - (W + dW))^T|
over a standard-normal probe batch of 32 rows.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import surgery  # noqa: E402
from surgery_plugins.quantized_linear import QuantizedLinear, quantize  # noqa: E402
from tests.custom_models import TinyGLM  # noqa: E402

LORA = surgery.RuleSet(name="lora-quantized", rules=[surgery.Rule(
    select=surgery.Selector(kinds=["quantized_linear"]), method="lora", params={"r": 8, "alpha": 16})])
KEYS = ("relative_weight_error", "relative_update_error", "max_abs_output_change")


def toy_batch(generator: torch.Generator, size: int = 8, seq: int = 16, vocab: int = 96) -> torch.Tensor:
    return (torch.randint(0, vocab, (size, 1), generator=generator) + torch.arange(seq)) % vocab


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def trained_glm(bits: int, steps: int) -> None:
    torch.manual_seed(0)
    model = TinyGLM().train()
    quantize(model, bits, exclude=["output_layer"])
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
    cells = [f"{statistics.mean(r[k] for r in reports.values()):.2e} / {max(r[k] for r in reports.values()):.2e}"
             for k in KEYS]
    print(f"TinyGLM INT{bits}  {len(reports)} sites  " + "  ".join(f"{k}: {c}" for k, c in zip(KEYS, cells)))
    print(f"             max |logit diff| merged vs unmerged {(merged - adapted).abs().max().item():.3e}; "
          f"probe loss unmerged {adapted_loss:.4f}, merged {merged_loss:.4f}")
    surgery.detach(model, "a")


def chatglm2_qkv(bits: int, ratio: float) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(4096, 4608, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4608, 4096, generator=g) * 0.02)
    model = nn.Sequential(QuantizedLinear.from_linear(linear, bits, scale_dtype=torch.float16))
    surgery.attach(model, LORA, name="a", args=(torch.randn(2, 4096),))
    branch = model[0].branches["a"]
    with torch.no_grad():
        branch.lora_A.copy_(torch.randn(branch.lora_A.shape, generator=g))
        branch.lora_B.copy_(torch.randn(branch.lora_B.shape, generator=g))
        base = model[0].base.dequantized()
        branch.lora_B.mul_(ratio * base.norm() / branch.weight_delta().norm())
    report = surgery.merge(model, "a")["0"]
    surgery.detach(model, "a")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("1. trained LoRA on the ChatGLM-like test model (mean / max over sites)")
    for bits in (4, 8):
        trained_glm(bits, args.steps)
    print("\n2. ChatGLM2-6B query_key_value shape [4608, 4096], W ~ N(0, 0.02), random rank-8 update")
    print(f"{'bits':>4s} {'|dW|/|W|':>9s} " + " ".join(f"{k:>22s}" for k in KEYS))
    for bits in (4, 8):
        for ratio in (0.001, 0.01, 0.1):
            r = chatglm2_qkv(bits, ratio)
            print(f"{bits:4d} {ratio:9.3f} " + " ".join(f"{r[k]:22.3e}" for k in KEYS))


if __name__ == "__main__":
    main()
