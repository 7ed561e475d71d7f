"""The backward step that reads the output gradient, dh_i = s_i dy_i @ B_i and dB_i = dy_i.T @ h_i, for one decoder
layer's LoRA groups of the benchmark model (8 x 1024 tokens, rank 16): two cuBLAS matmuls per member against
lora_kernels.up_grads (one pass over each dy_i), for a few tile sizes. GPU only.

    python benchmarks/lora_up_grads.py [--out results.json]

GPU time comes from the profiler (the kernels' own time, the reduction of dB and its cast included), not from
timing calls back to back: up_grads costs the host more per call than its kernels take, so a loop of calls
measures the host. The host's time per call is printed beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from surgery_plugins import lora_kernels as K

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_peft import host_us  # noqa: E402
from lora_kernel_configs import rel  # noqa: E402

T, R = 8192, 16
GROUPS = [("qkv", [2048, 512, 512]), ("o", [2048]), ("gate_up", [5632, 5632]), ("down", [2048])]
CONFIGS = [dict(BM=128, BN=64, num_warps=4, num_stages=3), dict(BM=256, BN=64, num_warps=8, num_stages=3),
           dict(BM=128, BN=128, num_warps=8, num_stages=3), dict(BM=64, BN=128, num_warps=4, num_stages=3)]


def gpu_us(fn, n: int = 20) -> float:
    """Summed kernel time of one call, in µs."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="lora-up-grads.json")
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape, std=1.0: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) * std  # noqa: E731
    big = rnd(256 * 2**20)
    bandwidth = 2 * big.numel() * 2 / (gpu_us(big.clone) / 1e6)  # bytes/s of a copy, read and write
    del big
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows, totals = [], {}
    for name, outs in GROUPS:
        n = len(outs)
        dys, b_s = [rnd(T, out) for out in outs], [rnd(out, R, std=0.02) for out in outs]
        h, cols = rnd(T, n * R), [i * R for i in range(n)]

        def cublas():
            dh = torch.empty_like(h)
            for i, (dy, b) in enumerate(zip(dys, b_s)):
                dh[:, i * R:(i + 1) * R].addmm_(dy, b, beta=0, alpha=2.0)
                dy.t() @ h[:, i * R:(i + 1) * R]

        def kernel():
            K.up_grads(dys, b_s, h, cols, torch.empty_like(h), [2.0] * n, [1.0] * n)

        def check(config: dict) -> None:
            dh = torch.empty_like(h)
            d_b = K.up_grads(dys, b_s, h, cols, dh, [2.0] * n, [1.0] * n)
            want_dh = torch.cat([2.0 * dy.float() @ b.float() for dy, b in zip(dys, b_s)], dim=1)
            error = max([rel(dh, want_dh)] + [rel(db, dy.float().T @ h[:, c:c + R].float())
                                              for db, dy, c in zip(d_b, dys, cols)])
            assert error < 1e-2, f"{name} {config}: relative error {error:.2e}"

        bound = sum(dy.numel() * 2 for dy in dys) / bandwidth * 1e6  # one read of every dy_i
        for config in [None] + CONFIGS:
            label, fn = ("cuBLAS, 2 per member", cublas) if config is None else (str(config), kernel)
            if config is not None:
                K.CONFIGS["up"] = config
                K.clear_launches()
                check(config)
            row = {"group": name, "form": label, "gpu_us": round(gpu_us(fn), 1),
                   "host_us": round(host_us(fn, calls=200, rounds=1, warm=3), 1),
                   "bound_us": round(bound, 1)}
            rows.append(row)
            totals[label] = round(totals.get(label, 0.0) + row["gpu_us"], 1)
            print(f"{name:8s} {label:62s} GPU {row['gpu_us']:7.1f} us  host {row['host_us']:6.1f} us  "
                  f"bound {row['bound_us']:5.1f} us", flush=True)
    print("per layer, GPU us:", totals)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "bandwidth_tb_s": bandwidth / 1e12, "rows": rows,
                   "per_layer_gpu_us": totals}, f, indent=1)


if __name__ == "__main__":
    main()
