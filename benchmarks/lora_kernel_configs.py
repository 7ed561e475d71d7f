"""Tile sizes for the LoRA kernels (plugins/lora_kernels.py): each candidate timed on the shapes of the
benchmark model's training step (checked against torch first), next to the torch ops of the same step and to
the time its memory traffic needs at the measured copy bandwidth. GPU only.

    python benchmarks/lora_kernel_configs.py [--out results.json] [--kernels down grads merged]

Prints, per kernel, the candidates ranked by their summed time over one layer's calls, and writes the best
of each (the values for lora_kernels.CONFIGS) with every timing to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton.testing

from surgery_plugins import lora_kernels as K

T, R, P = 8192, 16, 0.05
HIDDEN, MLP = 2048, 5632
# One decoder layer's calls: (name, input width, member output widths, whether the input is a product u * v).
GROUPS = [("qkv", HIDDEN, [HIDDEN, 512, 512], False), ("o", HIDDEN, [HIDDEN], False),
          ("gate_up", HIDDEN, [MLP, MLP], False), ("down", MLP, [HIDDEN], True)]


SMOKE = False


def bench(fn) -> float:
    if SMOKE:  # no device to time on: run once
        fn()
        return 0.0
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def candidates(space: dict) -> list[dict]:
    return [dict(zip(space, values)) for values in itertools.product(*space.values())]


def sweep(kind: str, space: dict, cases: list, bandwidth: float) -> dict:
    """Time every candidate of `space` for kernel `kind` on `cases` [(label, run(), check(), bytes)]."""
    rows = []
    saved = dict(K.CONFIGS[kind])
    for config in candidates(space):
        K.CONFIGS[kind] = {**saved, **config}
        K.clear_launches()
        times, bad = {}, None
        for label, run, check, _ in cases:
            try:
                error = check()
                if not error < 1e-2:
                    bad = f"{label}: relative error {error:.2e}"
                    break
                times[label] = bench(run)
            except Exception as e:  # a tile too large for shared memory, say
                bad = f"{label}: {type(e).__name__}: {str(e)[:80]}"
                break
        rows.append({"config": config, "ms": times, "total_ms": sum(times.values()) if bad is None else None,
                     "error": bad})
    K.CONFIGS[kind] = saved
    K.clear_launches()
    good = sorted((r for r in rows if r["error"] is None), key=lambda r: r["total_ms"])
    bound = {label: nbytes / bandwidth * 1e3 for label, _, _, nbytes in cases}
    print(f"\n{kind}: {len(good)} of {len(rows)} candidates ran; bound {sum(bound.values()):.4f} ms per layer")
    for r in good[:6]:
        per = " ".join(f"{k} {v:.4f}" for k, v in r["ms"].items())
        print(f"  {r['total_ms']:.4f} ms  {r['config']}  [{per}]")
    for r in rows:
        if r["error"]:
            print(f"  failed {r['config']}: {r['error']}")
    return {"best": good[0]["config"] if good else None, "bound_ms": bound, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="lora-kernel-configs.json")
    parser.add_argument("--quick", action="store_true", help="a few candidates each (a smoke run)")
    parser.add_argument("--smoke-on-cpu", action="store_true", help="tiny float32 shapes under TRITON_INTERPRET=1")
    parser.add_argument("--kernels", nargs="*", default=["down", "grads", "merged"], choices=["down", "grads", "merged"])
    args = parser.parse_args()
    global T, GROUPS, SMOKE
    dev, dt = "cuda", torch.bfloat16
    if args.smoke_on_cpu:
        dev, dt, T, SMOKE = "cpu", torch.float32, 256, True
        K.DEVICES, K.DTYPES = {"cpu"}, {torch.float32}
        GROUPS = [("qkv", 64, [64, 32, 32], False), ("down", 96, [64], True)]
    big = torch.randn(2**20 if args.smoke_on_cpu else 256 * 2**20, device=dev, dtype=dt)
    bandwidth = 2 * big.numel() * 2 / (max(bench(lambda: big.clone()), 1e-3) / 1e3)
    del big
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, device=dev, dtype=dt, generator=g) * std

    torch_ms: dict[str, float] = {}
    down_cases, grads_cases, merged_cases = [], [], []
    for name, fin, outs, product in GROUPS:
        n = len(outs)
        u, v = rnd(T, fin), rnd(T, fin)
        x = u * v if product else u
        a = rnd(n * R, fin, std=0.02)
        dh = rnd(T, n * R)
        dx = rnd(T, fin)
        ins = (u, v) if product else (x,)
        down_cases.append((f"{name} p={P}", lambda x=x, a=a, n=n: K.dropped_down(x, a, n, P, 1),
                           lambda x=x, a=a, n=n: rel(K.dropped_down(x, a, n, 1e-9, 1), x.float() @ a.float().T),
                           x.numel() * 2 + T * n * R * 2))
        for p in (0.0, P):
            update = None if (product and p == 0) else dx  # a wide-in layer without dropout updates dx by matmul
            nbytes = sum(t.numel() * 2 for t in ins) + (2 * dx.numel() * 2 if update is not None else 0)
            grads_cases.append((f"{name} p={p}", lambda ins=ins, dh=dh, a=a, n=n, p=p, up=update:
                                K.input_grads(ins, dh, a, n, p, 1, up),
                                lambda ins=ins, dh=dh, a=a, n=n, x=x: rel(K.input_grads(ins, dh, a, n, 0.0, 1, None),
                                                                          dh.float().T @ x.float()), nbytes))
        torch_ms[f"{name} x @ A.T (cuBLAS)"] = bench(lambda x=x, a=a: x @ a.t())
        torch_ms[f"{name} dA = dh.T @ x (cuBLAS)"] = bench(lambda x=x, dh=dh: dh.t() @ x)
        torch_ms[f"{name} dx.addmm_(dh, A)"] = bench(lambda dx=dx, dh=dh, a=a: dx.addmm_(dh, a))
        for i, out in enumerate(outs):
            w, b_m, a_m = rnd(out, fin, std=0.02), rnd(out, R, std=0.02), rnd(R, fin, std=0.02)
            merged_cases.append((f"{name}[{i}] W + s B @ A",
                                 lambda w=w, a=a_m, b=b_m: K.merged_weights([w], [a], [b], [2.0]),
                                 lambda w=w, a=a_m, b=b_m: rel(K.merged_weights([w], [a], [b], [2.0])[0],
                                                               w.float() + 2.0 * b.float() @ a.float()),
                                 2 * w.numel() * 2))
            torch_ms[f"{name}[{i}] torch.addmm(W, B, A)"] = bench(lambda w=w, a=a_m, b=b_m: torch.addmm(w, b, a, alpha=2.0))
            dy, b, h = rnd(T, out), rnd(out, R, std=0.02), dh[:, i * R:(i + 1) * R]
            torch_ms[f"{name}[{i}] dh = dy @ B (cuBLAS)"] = bench(lambda dy=dy, b=b: dy @ b)
            torch_ms[f"{name}[{i}] dB = dy.T @ h (cuBLAS)"] = bench(lambda dy=dy, h=h: dy.t() @ h)
    print("\ntorch ops of the same step:")
    for k, v in torch_ms.items():
        print(f"  {v:.4f} ms  {k}")

    if args.quick:
        spaces = {"down": {"BM": [64], "BK": [64, 128], "num_warps": [4]},
                  "grads": {"BM": [64], "BK": [64], "num_warps": [4, 8], "waves": [4]},
                  "merged": {"BM": [64], "BN": [64, 128], "num_warps": [4]}}
    else:
        spaces = {"down": {"BM": [64, 128], "BK": [64, 128], "num_warps": [4, 8]},
                  "grads": {"BM": [32, 64, 128], "BK": [64, 128], "num_warps": [4, 8], "waves": [2, 4, 8]},
                  "merged": {"BM": [32, 64, 128], "BN": [64, 128, 256], "num_warps": [4, 8]}}
    result = {"bandwidth_tb_s": bandwidth / 1e12, "torch_ms": torch_ms,
              "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__}
    for kind, cases in (("down", down_cases), ("grads", grads_cases), ("merged", merged_cases)):
        if kind in args.kernels:
            result[kind] = sweep(kind, spaces[kind], cases, bandwidth)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("\nbest:", json.dumps({k: result[k]["best"] for k in args.kernels}))


if __name__ == "__main__":
    main()
