"""The least time a LoRA training step can take on each row of bench_grid's grid, against the time its targets ask.

A LoRA step does the floor's work (the frozen base, gradients to its input only) and more:
- at each adapted linear (T tokens, in -> out, rank r), the formula's six matmuls (x @ A.T and h @ B.T forward; dh,
  dB, dA and the LoRA part of dx backward), 6·T·r·(in + out) flops in all (`lora_flops`);
- AdamW over the adapters: fused, it reads each parameter, its gradient and two states and writes three, 7 ×
  the element's bytes per parameter (`adamw_bytes`);
- in every implementation we know (PEFT's, surgery's), one more read of each adapted layer input in backward, for
  dA: the floor's backward never reads those inputs (`da_read_bytes`);
- made of kernels apart from the base matmuls (PEFT's and surgery's are), at least: each distinct layer input read
  twice (for h and for dA) and its dx term written once, and at each linear its output's term written and its dy
  read once (dh and dB from one pass): `separate_bytes`.

On a GPU it measures three rates: cuBLAS on the row's own base matmuls (the forward's and the input gradient's
shapes, each linear weighted by its flops: `base_tflops`); cuBLAS on an 8192³ matmul, the best it runs
(`best_tflops`); and the bandwidth of a 1 GiB copy (`copy_gbps`). With the floor's, PEFT's and surgery's times
of each row from bench_grid results files (`--grid`, later files win), it gives:

- `strict_ms`: floor + LoRA flops at the best rate + AdamW bytes at the copy bandwidth: no LoRA step whose
  matmuls run at most at cuBLAS's best rate is faster.
- `cublas_ms`: floor + LoRA flops at the base matmuls' rate + (AdamW bytes + dA reads) at the copy bandwidth: a
  step whose skinny LoRA matmuls ran as fast as cuBLAS runs the base's big ones, and that added nothing else.
- `separate_ms`: floor + the larger of LoRA flops at the best rate and `separate_bytes` at the copy bandwidth, +
  AdamW bytes: the least for LoRA in kernels of its own, beside cuBLAS's base matmuls.
- `target_ms`: min(1.15 × floor, 0.90 × PEFT dtype), the issue's two time targets in one; `needed_tflops`, the
  rate at which LoRA's flops would have to run to fit between the floor and the target (on the CPU too).
- the same for the graphed steps where the grid file has them, and for the unmerged forward: base forward +
  forward LoRA flops (2·T·r·(in + out) per linear) at the best rate, against 1.03 × the base.

A row whose `strict_ms` exceeds its target cannot meet it; one whose `cublas_ms` does would need LoRA's matmuls
to beat cuBLAS's rate on the base's own; one whose `separate_ms` does needs LoRA inside the base matmuls (a GEMM
of our own at cuBLAS's speed). The bounds use the grid file's floor, measured on another call of the same GPU
model (on the CPU, any); the rates are this call's.

    python benchmarks/bench_bounds.py --device cuda --grid benchmarks/results/bench_grid-h100.json
    python benchmarks/bench_bounds.py --grid ...        # CPU: every row's flops, bytes and needed rate

Results: benchmarks/results/bench_bounds-<device>.json.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import harness
import torch
from bench_grid import BASE, DTYPES, GRID

TARGET_X_FLOOR, TARGET_X_PEFT, TARGET_FWD_X_BASE = 1.15, 0.90, 1.03


def linears(config: dict, names: tuple[str, ...] = ()) -> tuple[Counter, tuple[int, int]]:
    """The model's adapted linears as a count of (in, out) shapes (every nn.Linear but the head; with `names`,
    only those whose module name ends in one of them), and the head's (in, out): read off the model built on the
    meta device."""
    model = harness.meta_llama({**BASE, **config})
    head = model.get_output_embeddings()
    shapes = Counter((m.in_features, m.out_features) for path, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and m is not head and (not names or path.endswith(names)))
    return shapes, (head.in_features, head.out_features)


def lora_flops(shapes: Counter, tokens: int, r: int) -> int:
    """The formula's six matmuls at every linear of `shapes`, forward and backward: 6·T·r·(in + out) each."""
    return sum(n * 6 * tokens * r * (i + o) for (i, o), n in shapes.items())


def base_flops(shapes: Counter, head: tuple[int, int], tokens: int) -> int:
    """The floor's linear flops: forward and input gradient of every linear of `shapes` and of the head."""
    return sum(n * 4 * tokens * i * o for (i, o), n in (shapes + Counter([head])).items())


def layer_inputs(config: dict) -> int:
    """Elements per token of the distinct inputs of one decoder layer's adapted linears: q/k/v's (shared), o's,
    gate/up's (shared) and down's."""
    c = {**BASE, **config}
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["hidden_size"] + c["num_attention_heads"] * head_dim + c["intermediate_size"]


def counts(config: dict, tokens: int, r: int, element: int) -> dict:
    """A row's work beyond the floor: LoRA flops (training, forward only), AdamW and dA bytes; and the floor's
    linear flops (forward and input gradient, head included) for scale."""
    shapes, head = linears(config)
    lora = lora_flops(shapes, tokens, r)
    params = sum(n * r * (i + o) for (i, o), n in shapes.items())
    floor_mm = base_flops(shapes, head, tokens)
    inputs = tokens * layer_inputs(config) * config["num_hidden_layers"]  # elements of the distinct inputs
    outputs = sum(n * tokens * o for (i, o), n in shapes.items())
    return {"lora_flops": lora, "lora_fwd_flops": lora // 3, "lora_params": params,
            "adamw_bytes": 7 * element * params, "da_read_bytes": element * inputs,
            "separate_bytes": element * (3 * inputs + 2 * outputs),
            "floor_linear_flops": floor_mm, "lora_x_floor_linear_flops": round(lora / floor_mm, 4)}


def base_matmul_ms(tokens: int, i: int, o: int, dtype: torch.dtype, device: str) -> float:
    """ms of one linear's forward matmul plus its input gradient's (medians of 20 calls each)."""
    x, w, dy = (torch.randn(*s, device=device, dtype=dtype) for s in ((tokens, i), (o, i), (tokens, o)))
    y, dx = torch.empty(tokens, o, device=device, dtype=dtype), torch.empty_like(x)
    return (harness.time_ms(lambda: torch.mm(x, w.t(), out=y), device, 20, 3)
            + harness.time_ms(lambda: torch.mm(dy, w, out=dx), device, 20, 3))


def base_tflops(config: dict, tokens: int, dtype: torch.dtype, device: str) -> float:
    """cuBLAS's rate on the row's base matmuls (forward and input gradient of every linear, the head included),
    weighted by their flops."""
    shapes, head = linears(config)
    ms = sum(n * base_matmul_ms(tokens, i, o, dtype, device) for (i, o), n in (shapes + Counter([head])).items())
    return base_flops(shapes, head, tokens) / ms / 1e9


def best_tflops(dtype: torch.dtype, device: str, n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty_like(a)
    return 2 * n ** 3 / harness.time_ms(lambda: torch.mm(a, b, out=out), device, 20, 3) / 1e9


def copy_gbps(device: str, gib: int = 1) -> float:
    src = torch.empty(gib * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / harness.time_ms(lambda: dst.copy_(src), device, 20, 3) / 1e6


def grid_rows(paths: list[str], device: str | None) -> dict:
    """Each grid row's times from the bench_grid results files (measured on GPU model `device`, where one is
    given; later files win; a section of rows measured again, such as `row3_new`, wins over its file's `rows`)."""
    rows: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if device is not None and data["meta"]["device"] != device:
            print(f"skipped {path}: measured on {data['meta']['device']}, not on {device}")
            continue
        sections = ["rows"] + [k for k in data if k.endswith("_new") and isinstance(data[k], dict)]
        for section in sections:
            for name, row in data[section].items():
                rows[name] = {**row, "source": f"{path}, {section} ({data['meta']['date']})"}
    return rows


def bounds(work: dict, rates: dict | None, measured: dict) -> dict:
    """Each time bound of one row (see the module docstring) with the target it is held against; without `rates`
    (on the CPU), only the rate LoRA's flops would need to fit between the floor and the target."""
    out: dict = {}
    extras = {}
    if rates:
        best, base, gbps = rates["best_tflops"] * 1e9, rates["base_tflops"] * 1e9, rates["copy_gbps"] * 1e6  # /ms
        extras = {"strict": work["lora_flops"] / best + work["adamw_bytes"] / gbps,
                  "cublas": work["lora_flops"] / base + (work["adamw_bytes"] + work["da_read_bytes"]) / gbps,
                  "separate": max(work["lora_flops"] / best, work["separate_bytes"] / gbps)
                  + work["adamw_bytes"] / gbps}
        out |= {f"{k}_extra_ms": round(v, 3) for k, v in extras.items()}
    for suffix in ("", "_graph"):
        floor, peft = measured.get(f"floor{suffix}_ms"), measured.get(f"peft_dtype{suffix}_ms")
        if floor is None or peft is None:
            continue
        target = min(TARGET_X_FLOOR * floor, TARGET_X_PEFT * peft)
        ours = measured.get(f"surgery{suffix}_ms")
        out |= {f"target{suffix}_ms": round(target, 2), f"surgery{suffix}_ms": ours,
                f"needed{suffix}_tflops": round(work["lora_flops"] / (target - floor) / 1e9) if target > floor
                else None}
        out |= {f"{k}{suffix}_ms": round(floor + v, 2) for k, v in extras.items()}
        if extras:
            out[f"verdict{suffix}"] = (
                "met" if ours is not None and ours <= target else
                "unreachable" if floor + extras["strict"] > target else
                "unreachable at cuBLAS's base rate" if floor + extras["cublas"] > target else
                "unreachable by separate kernels" if floor + extras["separate"] > target else "reachable")
    if rates and measured.get("fwd_base_ms"):
        fwd_base = measured["fwd_base_ms"]
        out["fwd_target_ms"] = round(TARGET_FWD_X_BASE * fwd_base, 3)
        out["fwd_strict_ms"] = round(fwd_base + work["lora_fwd_flops"] / best, 3)
        out["fwd_unmerged_ms"] = measured.get("fwd_unmerged_ms")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", nargs="*", type=int, default=list(range(len(GRID))))
    parser.add_argument("--grid", nargs="*", default=[], help="bench_grid results files (later ones win)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    measured = grid_rows(args.grid, harness.device_name(args.device) if cuda else None)
    results, best = {}, {}
    copy = copy_gbps(args.device) if cuda else None
    print("| row | LoRA / floor linear flops | needed TFLOP/s | target ms | strict ms | cuBLAS ms | separate ms "
          "| surgery ms | verdict |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for i in args.rows:
        name, config, batch, seq, r, p, dtype = GRID[i]
        dt = DTYPES[dtype]
        work = counts(config, batch * seq, r, torch.finfo(dt).bits // 8)
        row = {"row": i, "tokens": batch * seq, "r": r, "dropout": p, "dtype": dtype, **work}
        if cuda:
            if dtype not in best:
                best[dtype] = best_tflops(dt, args.device)
            rates = {"best_tflops": round(best[dtype], 1), "copy_gbps": round(copy, 1),
                     "base_tflops": round(base_tflops({**BASE, **config}, batch * seq, dt, args.device), 1)}
            row |= rates
        row |= bounds(work, rates if cuda else None, measured.get(name, {}))
        row["grid_source"] = measured.get(name, {}).get("source")
        results[name] = row
        print(f"| {i}: {name} | {work['lora_x_floor_linear_flops']} | {row.get('needed_tflops', '')} | "
              f"{row.get('target_ms', '')} | {row.get('strict_ms', '')} | {row.get('cublas_ms', '')} | "
              f"{row.get('separate_ms', '')} | {row.get('surgery_ms', '')} | {row.get('verdict', '')} |", flush=True)
    print("wrote", harness.write_results("bench_bounds", args.device, {"rows": results}, args.out))


if __name__ == "__main__":
    main()
