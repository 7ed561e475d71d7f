"""Where the host's time goes in surgery's eager LoRA training step on the GPU: each step's host time (the call
returning) and wall time (synchronized) by phase, for the floor and for surgery with dropout 0.05 and 0; then,
with timers around LoRA's functions, each one's calls and inclusive host time per step. The timers add about
1 µs a call, so the timed loop's step is a little slower than the untimed one. GPU only.

    python benchmarks/host_by_function.py            # prints JSON, writes results-cuda-host-by-function.json
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_vs_peft as bench  # noqa: E402
from surgery.host import Host  # noqa: E402
from surgery_plugins import lora_fused, lora_kernels, lora_shared  # noqa: E402

try:
    from surgery_plugins import triton_launch
except ImportError:  # a version before the direct launch (for an A/B of two installs): its kernels are timed instead
    triton_launch = None

totals: dict[str, list] = {}  # name -> [calls, seconds]


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            entry = totals.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - start
    return wrapper


def add_timers() -> None:
    for name in ("dropped_down", "input_grads", "up_grads", "merged_weights", "new_seed"):
        setattr(lora_kernels, name, timed(name, getattr(lora_kernels, name)))
    lora_fused.merged = timed("merged (addmm)", lora_fused.merged)
    lora_shared.merged_all = timed("merged_all (addmm)", lora_shared.merged_all)
    if triton_launch is not None:
        triton_launch.Launch.__call__ = timed("Triton launch", triton_launch.Launch.__call__)
    else:
        for name in ("_down_kernel", "_grads_kernel", "_up_kernel", "_merged_kernel"):
            kernel = getattr(lora_kernels, name)
            kernel.run = timed("Triton launch", kernel.run)
    for cls in (lora_shared.SharedInputLora, lora_fused.LoraLinear):
        for method in ("forward", "backward"):
            setattr(cls, method, staticmethod(timed(f"{cls.__name__}.{method}", getattr(cls, method))))
    lora_shared.SharedInput.output = timed("SharedInput.output", lora_shared.SharedInput.output)
    Host.forward = timed("Host.forward", Host.forward)


def phases(run_forward, opt, sync_each: bool, n: int = 6, warm: int = 3) -> dict:
    """Medians over n steps of forward / backward / optimizer / whole step, ms: host time, or wall time where the
    device is synchronized after each phase."""
    rows = []
    for i in range(warm + n):
        if i == warm:
            totals.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = run_forward()
        if sync_each:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        if sync_each:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        if i >= warm:
            rows.append([t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t0])
    return dict(zip(("forward", "backward", "optimizer", "step"),
                    (round(statistics.median(c) * 1e3, 2) for c in zip(*rows))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results-cuda-host-by-function.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    b = bench.Bench("cuda")
    n = 6
    result = {}
    base = b.base().train()
    floor_forward = b.floor_loss(base)
    result["floor"] = {"host": phases(floor_forward, None, False), "wall": phases(floor_forward, None, True)}
    del base, floor_forward
    b.fresh()
    timers = False
    for p in (0.05, 0.0):
        model = b.ours(p).train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, fused=True)
        forward = b.train_loss(model)
        row = {"host": phases(forward, opt, False), "wall": phases(forward, opt, True)}
        if not timers:
            add_timers()
            timers = True
        row["host, timed"] = phases(forward, opt, False, n=n)
        row["per step: calls, host ms, µs per call"] = {
            name: [calls // n, round(seconds * 1e3 / n, 2), round(seconds * 1e6 / calls, 1)]
            for name, (calls, seconds) in sorted(totals.items())}
        result[f"surgery, dropout {p}"] = row
        del model, opt, forward
        b.fresh()
    result["meta"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
