"""The eager no-dropout training step with LoRA's three forms, interleaved in one process on one model (GPU only):
the merged weight built by addmm in training (what the code does), built by the Triton kernel in training too,
and the separate LoRA term (no merged weight). Then the host's time per call of the kernel's launch and of the
torch ops it competes with.

    python benchmarks/merged_weight_ab.py [--rounds 4]

Prints, per form, the step's wall and host-issue ms and the forward's, one figure per round.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_vs_peft as bench  # noqa: E402
from surgery_plugins import lora_kernels, lora_merged_weight, lora_shared  # noqa: E402

REAL = lora_merged_weight.merged_all


def kernel_always(weights, a_s, b_s, scales, one_pass):
    return REAL(weights, a_s, b_s, scales, True)


FORMS = {"merged, addmm in training": ({"cuda"}, REAL), "merged, kernel in training": ({"cuda"}, kernel_always),
         "separate term": (set(), REAL)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    b = bench.Bench("cuda")
    model = b.ours(0.0).train()
    step = b.train_step(model)

    def forward():
        model(input_ids=b.ids, labels=b.ids, use_cache=False)

    res = {name: {"step wall": [], "step host": [], "forward wall": [], "forward host": []} for name in FORMS}
    for _ in range(args.rounds):
        for name, (devices, build) in FORMS.items():
            lora_merged_weight.DEVICES = devices
            lora_merged_weight.merged_all = lora_shared.merged_all = build
            host, wall = b.host_and_wall_ms(step, n=6)
            res[name]["step host"].append(host), res[name]["step wall"].append(wall)
            host, wall = b.host_and_wall_ms(forward, n=6)
            res[name]["forward host"].append(host), res[name]["forward wall"].append(wall)
    lora_merged_weight.DEVICES, lora_merged_weight.merged_all = {"cuda"}, REAL
    lora_shared.merged_all = REAL
    for name, rows in res.items():
        print(f"{name}:")
        for what, values in rows.items():
            print(f"  {what:13s} ms " + " / ".join(f"{v:.1f}" for v in values) + f"  (median {statistics.median(values):.1f})")
    dev, dt = "cuda", torch.bfloat16
    w, a, bb = (torch.randn(*s, device=dev, dtype=dt) for s in ((2048, 2048), (16, 2048), (2048, 16)))
    x = torch.randn(8192, 2048, device=dev, dtype=dt)
    calls = {"kernel, one weight": lambda: lora_kernels.merged_weights([w], [a], [bb], [2.0]),
             "kernel, three weights": lambda: lora_kernels.merged_weights([w] * 3, [a] * 3, [bb] * 3, [2.0] * 3),
             "torch.addmm(W, B, A)": lambda: torch.addmm(w, bb, a, alpha=2.0),
             "F.linear, 8192 x 2048 x 2048": lambda: torch.nn.functional.linear(x, w),
             "x @ A.T": lambda: x @ a.t()}
    print("host time per call:")
    for name, fn in calls.items():
        print(f"  {bench.host_us(fn, calls=50, rounds=5, warm=20, pick=min):6.1f} µs  {name}")


if __name__ == "__main__":
    main()
