"""The host CPU's share of a LoRA step, measured where nothing else is: on the CPU, with a tiny Llama (16 layers,
width 64, 8 tokens), so that every op costs about what it costs the host to issue it on a GPU, side by side with
HF PEFT. The Triton launches are replaced by no-ops (their outputs are not used: this is a timing, not a result),
so the LoRA path is the one a CUDA run takes.

    python benchmarks/host_overhead.py            # ms per step and ratios to the floor, median of 60
    python benchmarks/host_overhead.py --n 20     # quicker, noisier

Also the several-jobs step (surgery.jobs, 4 jobs of 1 x 8 tokens, r 16 on every linear but the head) against one
adapter trained on the same 4 x 8 batch, as bench_jobs.py measures it on a GPU.

On the lent H100s the eager LoRA step is bound by the host (docs/performance.md); this is the quick way to see what
a change does to that, without a GPU. Compare the ratios of one run (or of two installs run alternately, as in
docs/performance.md), not milliseconds between machines. Writes benchmarks/results/host_overhead-cpu.json.
"""
from __future__ import annotations

import argparse
import warnings
from types import SimpleNamespace

import harness
import torch

TINY = {"config": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 16, "num_attention_heads": 4,
                   "num_key_value_heads": 1, "vocab_size": 128, "max_position_embeddings": 64},
        "batch": 1, "seq": 8, "mixed_batch": 2, "mixed_seq": 8, "dtype": torch.float32, "steps": 60, "warm": 5}


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


KERNELS = ("_down_kernel", "_grads_kernel", "_merged_kernel", "_up_kernel", "_mask_kernel")


def take_the_cuda_path() -> None:
    """Make the CPU take the path a CUDA run takes: the Triton kernels' (float32 allowed, Triton or not), with
    launches that do nothing, and the merged weight wherever it is allowed (a CUDA run takes it from as many tokens
    as input features: every training linear at the grid's and bench_jobs' shapes). The dispatch's own knobs are
    set (dispatch.py), so `dispatch.choose` picks on the CPU what it picks on a GPU."""
    lora = harness.lora_internals()
    kernels, dispatch = lora.kernels, lora.dispatch
    dispatch.KERNEL_DEVICES.add("cpu")
    dispatch.KERNEL_DTYPES.add(torch.float32)
    dispatch.merged_pays = lambda tokens, weight: True
    kernels.AVAILABLE = True
    if kernels.triton is None:  # the launches' constants name Triton's accumulator types
        kernels.tl = SimpleNamespace(float32="float32", float64="float64")
    for name in KERNELS:
        setattr(kernels, name, _NoLaunch())
    kernels.clear_launches()


JOBS, JOBS_ONE = 4, "one adapter, the jobs' 4 x 8 tokens"


def jobs_rows(w: harness.Workload, ms) -> dict[str, float]:
    """The joint step of JOBS jobs (1 x 8 tokens each, their own AdamW) and one adapter on the same batch."""
    data = w.job_batches(JOBS, 1, TINY["seq"])
    _, jobs = w.jobs(data, fused=True)  # the fused AdamW a CUDA run uses
    one = w.train_step(w.ours(0.0).train(), fused=True, ids=torch.cat([b["input_ids"] for b in data.values()]))
    return {JOBS_ONE: ms(one), f"jobs: {JOBS} jobs of 1 x 8, joint step": ms(lambda: jobs.step(data))}


def against(name: str) -> tuple[str, str]:
    """What row `name` is a ratio to: (its label, its row)."""
    if name.startswith("forward"):
        return "base", "forward base"
    return ("one adapter", JOBS_ONE) if name.startswith("jobs") else ("floor", "floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60, help="steps timed per row (the median is kept)")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/host_overhead-cpu.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the no-op launches leave their outputs as allocated: no slow denormal maths
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT on transformers 5
    take_the_cuda_path()
    w = harness.Workload("cpu", TINY)
    ids = w.ids
    base = w.base().train()

    def ms(fn) -> float:
        return w.time_ms(fn, n=args.n, warm=5)

    rows = {"floor": ms(w.floor_step(base))}
    with torch.no_grad():
        rows["forward base"] = ms(lambda: base(input_ids=ids, use_cache=False))
    for p in (0.05, 0.0):
        for name, build in ((f"surgery, dropout {p}", lambda p=p: w.ours(p)),
                            (f"PEFT bf16-style adapters, dropout {p}", lambda p=p: w.peft(p, autocast=False))):
            rows[name] = ms(w.train_step(build().train(), fused=True))  # the fused AdamW a CUDA run uses
    model = w.ours(0.0).eval()
    with torch.no_grad():
        rows["forward surgery unmerged"] = ms(lambda: model(input_ids=ids, use_cache=False))
    rows.update(jobs_rows(w, ms))
    result = {}
    for name, value in rows.items():
        label, row = against(name)
        ratio = value / rows[row]
        result[name] = {"ms": round(value, 2), f"x {label}": round(ratio, 3)}
        print(f"{name:42s} {value:7.2f} ms  {ratio:5.2f} x {label}")
    shapes = {k: v for k, v in TINY.items() if k != "dtype"} | {"dtype": str(TINY["dtype"]), "n": args.n}
    out = harness.write_results("host_overhead", "cpu", {"meta": {"shapes": shapes}, "host_ms": result}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
