"""One linear with its LoRA update added (y = x @ W.T + b + s·h @ B.T, h = x @ A.T given), per shape: cuBLAS's
matmul alone (the base), cuBLAS then addmm_ of the update into its output, the merged weight W + s·B @ A built
and used, and the kernel of plugins/lora/kernels.py with each of its candidate tiles; which way
`linear_update.py` chooses, and its error against float64 beside cuBLAS's.

    python benchmarks/bench_linear_update.py --device cuda

The shapes are the mixed batch's (32 x 512 tokens of width 2048, 8 adapters of rank 16 joined: rank 128) and the
grid's linears (docs/performance.md), in bf16. Results: benchmarks/results/bench_linear_update-<device>.json.
"""
from __future__ import annotations

import argparse

import harness
import torch
import torch.nn.functional as F

# (tokens, in, out, rank): the mixed batch's q and k/v, its one adapter; the grid's q, k/v, MLP up and down
SHAPES = [(16384, 2048, 2048, 128), (16384, 2048, 512, 128), (16384, 2048, 2048, 16), (16384, 2048, 5632, 16),
          (16384, 5632, 2048, 16), (4096, 4096, 4096, 16), (4096, 4096, 1024, 16), (4096, 4096, 14336, 16),
          (2048, 8192, 8192, 64), (8192, 1536, 8960, 64), (4096, 5120, 5120, 16), (2048, 2048, 2048, 8),
          (1000, 3072, 3072, 128), (32, 2048, 2048, 128)]


def error(y: torch.Tensor, want: torch.Tensor) -> float:
    return float((y.double() - want).norm() / want.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lora = harness.lora_internals()
    kernels, tiles = lora.kernels, lora.tiles
    from surgery_plugins.lora import linear_update  # internal: path may move

    device, dtype, rows = args.device, torch.bfloat16, []
    time = lambda fn: harness.time_ms(fn, device, 20, 3)  # noqa: E731
    for tokens, k, n, r in SHAPES:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, k, device=device, generator=g).to(dtype)
        w = (torch.randn(n, k, device=device, generator=g) / k ** 0.5).to(dtype)
        a = (torch.randn(r, k, device=device, generator=g) / k ** 0.5).to(dtype)
        b = (torch.randn(n, r, device=device, generator=g) * 0.05).to(dtype)
        bias = None
        h = x @ a.t()
        want = F.linear(x.double(), w.double()) + 2.0 * h.double() @ b.double().t()
        row = {"shape": {"tokens": tokens, "in": k, "out": n, "rank": r},
               "base_ms": time(lambda: F.linear(x, w)),
               "h_ms": time(lambda: x @ a.t()),
               "cublas_addmm_ms": time(lambda: F.linear(x, w, bias).addmm_(h, b.t(), alpha=2.0)),
               "merged_ms": time(lambda: F.linear(x, torch.addmm(w, b, a, alpha=2.0)))}
        row["cublas_error"] = error(F.linear(x, w, bias).addmm_(h, b.t(), alpha=2.0), want)
        kernel_ms = {}
        for config in tiles.CANDIDATES["update"][1:]:
            name = "x".join(str(config[key]) for key in ("BM", "BN", "BK", "num_warps", "num_stages"))
            try:
                kernel_ms[name] = time(lambda c=config: kernels.linear_update(x, w, bias, h, b, 2.0, c))
            except Exception as e:  # noqa: BLE001 - a candidate this GPU cannot run is reported, not fatal
                kernel_ms[name] = repr(e)[:80]
        row["kernel_ms"] = kernel_ms
        chosen = linear_update._config(x, w, bias, h, b, 2.0)
        row["chosen"] = "cublas" if chosen is None or "cublas" in chosen else \
            "x".join(str(chosen[key]) for key in ("BM", "BN", "BK", "num_warps", "num_stages"))
        row["chosen_ms"] = time(lambda: linear_update.linear_update(x, w, bias, h, b, 2.0, True))
        row["chosen_error"] = error(linear_update.linear_update(x, w, bias, h, b, 2.0, True), want)
        for key in ("cublas_addmm_ms", "merged_ms", "chosen_ms"):
            row[key.replace("_ms", "_x_base")] = round(row[key] / row["base_ms"], 3)
        row["chosen_x_cublas_addmm"] = round(row["chosen_ms"] / row["cublas_addmm_ms"], 3)
        best = min((v for v in kernel_ms.values() if isinstance(v, float)), default=None)
        row["best_kernel_x_base"] = None if best is None else round(best / row["base_ms"], 3)
        print(f"{tokens}x{k}->{n} r{r}: base {row['base_ms']:.4f} ms, cublas+addmm_ {row['cublas_addmm_x_base']}, "
              f"merged {row['merged_x_base']}, best kernel {row['best_kernel_x_base']}, chosen {row['chosen']} "
              f"{row['chosen_x_base']} x base ({row['chosen_x_cublas_addmm']} x cublas+addmm_), h "
              f"{row['h_ms'] / row['base_ms']:.3f} x base; error {row['chosen_error']:.2e} vs cublas "
              f"{row['cublas_error']:.2e}", flush=True)
        rows.append(row)
        del x, w, a, b, h, want
    path = harness.write_results("bench_linear_update", device, {"shapes": rows}, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
