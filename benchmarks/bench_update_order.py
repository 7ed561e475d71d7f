"""The two orders of a LoRA output's base matmul and update (plugins/lora/update_first.py), per shape: the base
matmul then the update added in place (`F.linear(x, W).addmm_(h, B.T)`), against the update first with the base
matmul added onto it (`torch.mm(h, B.T).addmm_(x, W.T)`), and the update inside the base matmul (shared.py's
`_update_inside`), each as × the base matmul alone; and which order `update_first` takes, and whether a gate/up
pair of the shape takes the update inside (`_update_inside`'s cost model). h = x @ A.T is given, not timed; the
inside column copies [x | h] for one member (in shared.py gate and up share that copy) and no zero blocks.

    python benchmarks/bench_update_order.py --device cuda

Use it to check `update_first.FIRST_OUT` and `FIRST_ELEMENTS` on another GPU. Results:
benchmarks/results/bench_update_order-<device>.json.
"""
from __future__ import annotations

import argparse

import harness
import torch
import torch.nn.functional as F

# (tokens, in, out, rank): the mixed batch's q/o and k/v (8 adapters of rank 16 joined), one adapter's, the grid's
SHAPES = [(16384, 2048, 2048, 128), (16384, 2048, 512, 128), (16384, 2048, 2048, 16), (4096, 4096, 4096, 16),
          (4096, 4096, 1024, 16), (4096, 4096, 14336, 16), (2048, 2048, 2048, 8), (32, 2048, 2048, 128)]


def orders_ms(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, b: torch.Tensor, device: str) -> tuple:
    """ms of the base matmul alone, of the update after it, of the update first, and of the update inside the base
    matmul as shared.py's wide members take it, [x | h] @ [W | B].T with both concatenations made per call (medians
    of 30)."""
    def time(fn):
        return harness.time_ms(fn, device, 30, 3)
    return (time(lambda: F.linear(x, w)), time(lambda: F.linear(x, w).addmm_(h, b.t())),
            time(lambda: torch.mm(h, b.t()).addmm_(x, w.t())),
            time(lambda: F.linear(torch.cat([x, h], dim=1), torch.cat([w, b], dim=1))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="*", type=int, default=None, help="tokens, in, out, rank quadruples")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shapes = SHAPES if not args.shapes else list(zip(*[iter(args.shapes)] * 4))
    internals = harness.lora_internals()
    update_first, shared = internals.update_first, internals.shared

    device, dtype, rows = args.device, torch.bfloat16, []
    for tokens, k, n, r in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, k, device=device, generator=g).to(dtype)
        w = (torch.randn(n, k, device=device, generator=g) / k ** 0.5).to(dtype)
        h = torch.randn(tokens, r, device=device, generator=g).to(dtype)
        b = (torch.randn(n, r, device=device, generator=g) * 0.05).to(dtype)
        base, after, first, inside = orders_ms(x, w, h, b, device)
        row = {"shape": {"tokens": tokens, "in": k, "out": n, "rank": r}, "base_ms": base,
               "after_x_base": round(after / base, 3), "first_x_base": round(first / base, 3),
               "inside_x_base": round(inside / base, 3), "takes_first": update_first.update_first(tokens, n),
               "gate_up_inside": shared._update_inside(w, tokens, 2)}
        print(f"{tokens} x {k} -> {n}, r {r}: base {base:.4f} ms, update after {row['after_x_base']}, update first "
              f"{row['first_x_base']}, inside {row['inside_x_base']}; takes "
              f"{'first' if row['takes_first'] else 'after'}; as a gate/up pair, "
              f"{'inside' if row['gate_up_inside'] else 'the update'}", flush=True)
        rows.append(row)
    print("wrote", harness.write_results("bench_update_order", device, {"shapes": rows}, args.out))


if __name__ == "__main__":
    main()
