"""What widening a base matmul by the LoRA rank columns costs cuBLAS, for the model's linear shapes: forward
`[x | h] @ [W | B].T` with K = in + R, and backward `dy @ [W | B]` with N = in + R (also accumulated in place, as
a second member's is). GPU only; M = 8192 tokens, bf16.

    python benchmarks/widened_gemms.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from lora_gemm_layouts import time_ms  # noqa: E402

M = 8192
SHAPES = [(2048, 2048), (2048, 512), (2048, 5632), (5632, 2048)]  # (in, out)
WIDTHS = [0, 16, 32, 48, 64, 80, 96]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="widened-gemms.json")
    args = parser.parse_args()
    dt, dev = torch.bfloat16, "cuda"
    res = {}
    for i, o in SHAPES:
        for r in WIDTHS:
            x = torch.randn(M, i + r, device=dev, dtype=dt)
            w = torch.randn(o, i + r, device=dev, dtype=dt)
            dy = torch.randn(M, o, device=dev, dtype=dt)
            acc = torch.randn(M, i + r, device=dev, dtype=dt)
            res[f"{i}->{o} R={r}"] = {k: round(time_ms(fn, 40), 4) for k, fn in (
                ("fwd", lambda: F.linear(x, w)), ("bwd", lambda: dy @ w), ("bwd_acc", lambda: acc.addmm_(dy, w)))}
            print(f"{i}->{o} R={r}", res[f"{i}->{o} R={r}"], flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
