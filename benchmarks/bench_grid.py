"""LoRA training steps over a grid of shapes, surgery against HF PEFT in one process: every row against the floor
(the frozen base, gradients to its input only), PEFT's default (fp32 adapters) and PEFT with adapters in the
model's dtype; peak memory of each; and the unmerged no-grad forward against the base's.

    python benchmarks/bench_grid.py --device cuda                 # every row of GRID
    python benchmarks/bench_grid.py --device cuda --rows 0 3 7    # some rows
    python benchmarks/bench_grid.py                               # CPU: tiny versions of the rows (r <= 8)
    python benchmarks/bench_grid.py --device cuda --rows 0 7 8 --graphed   # also each step as one CUDA graph
    python benchmarks/bench_grid.py --device cuda --rows 6 --profile       # also one step of each profiled

Deep models are measured as a slice of a few layers (`layers`), which keeps every row on one GPU and within a
call; the per-layer work is the full model's. The rows are spread over the grid's axes (hidden 1024-8192,
r 8-128, MHA and GQA, with and without attention bias, dropout 0-0.1, sequence 512-4096, bf16 and fp16), not its
full product. On a GPU, the first steps of each shape tune the LoRA kernels' tiles (plugins/lora/tiles.py), before
the timed steps. With `--graphed`, the floor, PEFT (adapters in the model's dtype) and surgery are measured again
with each step replayed as one CUDA graph (`harness.graphed`), which takes the host's issue time out of all three:
what the small rows, bound by the host, cost on the GPU. Results: benchmarks/results/bench_grid-<device>.json, each row written as soon as it is measured.
"""
from __future__ import annotations

import argparse
import os
import statistics

import harness
import torch

import surgery

# name, model config, batch x sequence, LoRA rank, dropout, dtype
GRID = [
    ("h1024 MHA r8 p0 s512 bf16", dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                                       num_key_value_heads=16, num_hidden_layers=8), 8, 512, 8, 0.0, "bf16"),
    ("h2048 GQA r16 p.05 s2048 bf16", dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                                           num_key_value_heads=8, num_hidden_layers=4), 4, 2048, 16, 0.05, "bf16"),
    ("qwen2-1.5b r64 p.05 s2048 bf16", dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                                            num_key_value_heads=2, num_hidden_layers=6, attention_bias=True,
                                            vocab_size=151936, tie_word_embeddings=True), 4, 2048, 64, 0.05, "bf16"),
    ("qwen2-1.5b r64 p0 s2048 bf16", dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                                          num_key_value_heads=2, num_hidden_layers=6, attention_bias=True,
                                          vocab_size=151936, tie_word_embeddings=True), 4, 2048, 64, 0.0, "bf16"),
    ("h4096 MHA r128 p.1 s2048 bf16", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                           num_key_value_heads=32, num_hidden_layers=2), 2, 2048, 128, 0.1, "bf16"),
    ("h4096 GQA r16 p.1 s4096 fp16", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                          num_key_value_heads=8, num_hidden_layers=2), 1, 4096, 16, 0.1, "fp16"),
    ("h8192 GQA r64 p.05 s2048 bf16", dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                                           num_key_value_heads=8, num_hidden_layers=2), 1, 2048, 64, 0.05, "bf16"),
    ("h3072 GQA bias r128 p0 s1024 fp16", dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24,
                                               num_key_value_heads=8, num_hidden_layers=3, attention_bias=True),
     2, 1024, 128, 0.0, "fp16"),
    ("h2048 MHA bias r8 p.1 s512 fp16", dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
                                             num_key_value_heads=16, num_hidden_layers=4, attention_bias=True),
     8, 512, 8, 0.1, "fp16"),
    ("h5120 MHA r16 p0 s4096 bf16", dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                                         num_key_value_heads=40, num_hidden_layers=2), 1, 4096, 16, 0.0, "bf16"),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BASE = {"vocab_size": 32000, "max_position_embeddings": 4096}


CPU_RANK = 8  # the most the CPU versions take: their narrowest site (a GQA row's k/v) has 16 features


def cpu_version(config: dict) -> dict:
    """The row's structure at a width the CPU runs in seconds (same heads ratio, bias, tying)."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    small = {"hidden_size": 16 * min(heads, 8), "intermediate_size": 48 * min(heads, 8),
             "num_attention_heads": min(heads, 8), "num_key_value_heads": max(1, min(heads, 8) * kv // heads),
             "num_hidden_layers": 2, "vocab_size": 512}
    return {**config, **small}


PROFILE_TOP = 16  # kernels listed per profiled step
GRAPH_WARM = 8  # steps before the timed ones of a graphed row: 2 eager, the capture, 3 replays timed, then kept


def measure(work: harness.Workload, build, step_of, warm: int | None = None,
            profile: dict | None = None) -> tuple[float, float | None, dict]:
    """(ms per step, peak GiB, and for a graphed step what ran eagerly and why) of `step_of(build())`; with a
    `profile` dict, its "kernels" set to one step's kernels (harness.profile, after the timed steps)."""
    work.fresh()
    model = build()
    model.train()
    step = step_of(model)
    ms = work.time_ms(step, warm=warm)
    peak = work.peak_gib()
    if profile is not None:
        profile["kernels"] = harness.profile(step, work.device, top=PROFILE_TOP, warm=0)
    eager = {str(k): v for k, v in step.graphs.eager.items()} if hasattr(step, "graphs") else {}
    del model, step
    work.fresh()
    return ms, peak, eager


def graphed_rows(work: harness.Workload, r: int, p: float, warm: int) -> dict:
    """The floor, PEFT with adapters in the model's dtype, and surgery, each step replayed as one CUDA graph
    (harness.graphed: the graphs of surgery.jobs, capturable AdamW), against each other."""
    warm = max(warm, GRAPH_WARM)
    out: dict = {}
    rows = (("floor", work.base, lambda m: work.floor_step(m, graph=True)),
            ("peft_dtype", lambda: work.peft(p, autocast=False, r=r), lambda m: work.train_step(m, graph=True)),
            ("surgery", lambda: work.ours(p, r=r), lambda m: work.train_step(m, graph=True)))
    for name, build, step_of in rows:
        out[f"{name}_graph_ms"], out[f"{name}_graph_gib"], eager = measure(work, build, step_of, warm)
        if eager:
            out[f"{name}_graph_eager"] = eager
    return out


def row(device: str, name: str, config: dict, batch: int, seq: int, r: int, p: float, dtype: str,
        steps: int, warm: int, graph: bool = False, profile: bool = False) -> dict:
    cuda = device.startswith("cuda")
    config = {**BASE, **config} if cuda else cpu_version({**BASE, **config})
    batch, seq, r = (batch, seq, r) if cuda else (2, 64, min(r, CPU_RANK))
    work = harness.Workload(device, {"config": config, "batch": batch, "seq": seq, "mixed_batch": 1, "mixed_seq": 8,
                                     "dtype": DTYPES[dtype] if cuda else torch.float32, "steps": steps,
                                     "warm": warm})
    out: dict = {"config": config, "batch": batch, "seq": seq, "r": r, "dropout": p, "dtype": dtype}
    found = {k: {} if profile else None for k in ("floor", "peft_dtype", "surgery")}
    out["floor_ms"], out["floor_gib"], _ = measure(work, work.base, work.floor_step, profile=found["floor"])
    out["peft_default_ms"], out["peft_default_gib"], _ = measure(
        work, lambda: work.peft(p, autocast=True, r=r), work.train_step)
    out["peft_dtype_ms"], out["peft_dtype_gib"], _ = measure(
        work, lambda: work.peft(p, autocast=False, r=r), work.train_step, profile=found["peft_dtype"])
    out["surgery_ms"], out["surgery_gib"], _ = measure(work, lambda: work.ours(p, r=r), work.train_step,
                                                       profile=found["surgery"])
    if profile:
        out["profile"] = {k: v["kernels"] for k, v in found.items()}
    if graph:
        out |= graphed_rows(work, r, p, warm)
    with torch.no_grad():  # unmerged inference forward against the base's
        model = work.base().eval()
        ids = work.ids
        out["fwd_base_ms"] = work.time_ms(lambda: model(input_ids=ids, use_cache=False))
        surgery.attach(model, harness.lora_rules(r=r), name="a")
        out["fwd_unmerged_ms"] = work.time_ms(lambda: model(input_ids=ids, use_cache=False))
        del model
    work.fresh()
    for k in list(out):
        if k.endswith("_ms"):
            out[k] = round(out[k], 2)
    out["x_floor"] = round(out["surgery_ms"] / out["floor_ms"], 3)
    out["x_peft_dtype"] = round(out["surgery_ms"] / out["peft_dtype_ms"], 3)
    out["x_peft_default"] = round(out["surgery_ms"] / out["peft_default_ms"], 3)
    out["mem_x_floor"] = round(out["surgery_gib"] / out["floor_gib"], 3) if out["floor_gib"] else None
    out["fwd_x_base"] = round(out["fwd_unmerged_ms"] / out["fwd_base_ms"], 3)
    print(f"| {name} | {out['floor_ms']} | {out['peft_default_ms']} | {out['peft_dtype_ms']} | {out['surgery_ms']} "
          f"| {out['x_floor']} | {out['x_peft_dtype']} | {out['mem_x_floor']} | {out['fwd_x_base']} |", flush=True)
    for key, kernels in out.get("profile", {}).items():
        harness.print_profile(f"{name}, {key}", kernels)
    if graph:
        out["x_floor_graph"] = round(out["surgery_graph_ms"] / out["floor_graph_ms"], 3)
        out["x_peft_dtype_graph"] = round(out["surgery_graph_ms"] / out["peft_dtype_graph_ms"], 3)
        out["x_floor_graph_vs_eager_floor"] = round(out["surgery_graph_ms"] / out["floor_ms"], 3)
        print(f"|   graphed | {out['floor_graph_ms']} | | {out['peft_dtype_graph_ms']} | {out['surgery_graph_ms']} "
              f"| {out['x_floor_graph']} | {out['x_peft_dtype_graph']} | | | dropped graphs: "
              f"{ {k: v for k, v in out.items() if k.endswith('_graph_eager')} }", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", nargs="*", type=int, default=list(range(len(GRID))))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--graphed", action="store_true",
                        help="also the floor, PEFT dtype and surgery with each step one CUDA graph (CUDA only)")
    parser.add_argument("--profile", action="store_true",
                        help="also one step of the floor, PEFT dtype and surgery under torch.profiler: kernels, "
                             "their time, the top ones")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    print("| row | floor ms | PEFT default | PEFT dtype adapters | surgery | × floor | × PEFT dtype | mem × floor "
          "| fwd × base |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = {}
    for i in args.rows:
        name, config, batch, seq, r, p, dtype = GRID[i]
        rows[name] = row(args.device, name, config, batch, seq, r, p, dtype, args.steps, args.warm,
                         args.graphed and args.device.startswith("cuda"), args.profile)
        harness.write_results("bench_grid", args.device, {"rows": {name: rows[name]}}, args.out)  # kept if cut off
    summary = {k: statistics.median(v[k] for v in rows.values()) for k in ("x_floor", "x_peft_dtype", "fwd_x_base")}
    summary |= {f"worst_{k}": max(v[k] for v in rows.values()) for k in ("x_floor", "x_peft_dtype", "fwd_x_base")}
    print("median and worst:", summary)
    path = harness.write_results("bench_grid", args.device, {"rows": rows, "summary": summary}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
