"""Several LoRA training jobs on one base (surgery.jobs) against one adapter on the same tokens and against the jobs
run one after another, in one process.

    python benchmarks/bench_jobs.py --device cuda      # 0.85 B Llama shape, bf16, 4 jobs of 1 x 512 and of 2 x 1024
    python benchmarks/bench_jobs.py                    # CPU: a small model, a smoke run

Rows per job size: `one` (a single adapter trained on all jobs' samples as one batch), `joint` (the 4 jobs in one
step: one forward and backward, each job's optimizer stepped), `sequential` (each job's step alone, one after
another). On CUDA also `joint_graph` and `one_graph`: the same steps replayed as CUDA graphs (`surgery.jobs(...,
cuda_graph=True)`, capturable AdamW). LoRA r 16 on every linear but the head, no dropout, AdamW. With `--profile`,
also the host's time to issue each step against its wall time (the host is the bound where they meet) and each
step's kernels under torch.profiler. Results: benchmarks/results/bench_jobs-<device>.json.
"""
from __future__ import annotations

import argparse
import inspect

import harness
import torch

import surgery

JOBS = 4
GRAPH_WARM = 8  # steps before timing a graphed step: 2 eager, the capture, 3 timed replays, the graph kept or dropped


def examine(work: harness.Workload, out: dict, key: str, step) -> None:
    """Host issue time against wall time of `step`, and its kernels (harness.profile), into `out`."""
    out[f"{key}_host_ms"], out[f"{key}_wall_ms"] = work.host_and_wall_ms(step)
    out[f"{key}_profile"] = harness.profile(step, work.device)
    harness.print_profile(key, out[f"{key}_profile"])


def rows(work: harness.Workload, per_job: tuple[int, int], profile: bool = False) -> dict:
    data = work.job_batches(JOBS, *per_job)
    ids = torch.cat([b["input_ids"] for b in data.values()])
    work.fresh()
    _, jobs = work.jobs(data)  # jobs holds the model
    out = {"joint_ms": work.time_ms(lambda: jobs.step(data))}
    out["joint_gib"] = work.peak_gib()
    if profile:
        examine(work, out, "joint", lambda: jobs.step(data))

    def sequential():
        for name, batch in data.items():
            jobs.step({name: batch})
    out["sequential_ms"] = work.time_ms(sequential)
    jobs = None  # the model freed before the next one
    work.fresh()
    one = work.train_step(work.ours(0.0, name="one").train(), ids=ids)
    out["one_ms"] = work.time_ms(one)
    out["one_gib"] = work.peak_gib()
    if profile:
        examine(work, out, "one", one)
    one = None  # the step holds the model
    if work.cuda and "cuda_graph" in inspect.signature(surgery.jobs).parameters:  # the same steps as CUDA graphs
        work.fresh()
        _, jobs = work.jobs(data, graph=True)
        out["joint_graph_ms"] = work.time_ms(lambda: jobs.step(data), warm=GRAPH_WARM)
        out["joint_graph_gib"] = work.peak_gib()
        out["joint_graph_eager"] = list(getattr(jobs.graphs, "eager", {}).values())  # graph dropped: why
        if profile:
            examine(work, out, "joint_graph", lambda: jobs.step(data))
        jobs = None
        work.fresh()
        one = work.train_step(work.ours(0.0, name="one").train(), ids=ids, graph=True)
        out["one_graph_ms"] = work.time_ms(one, warm=GRAPH_WARM)
        out["one_graph_gib"] = work.peak_gib()
        out["one_graph_eager"] = list(getattr(one.graphs, "eager", {}).values())
        one = None
    work.fresh()
    out = {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}
    out["joint_x_one"] = round(out["joint_ms"] / out["one_ms"], 3)
    out["throughput_x_sequential"] = round(out["sequential_ms"] / out["joint_ms"], 3)
    if "joint_graph_ms" in out:
        out["joint_graph_x_one"] = round(out["joint_graph_ms"] / out["one_ms"], 3)
        out["joint_graph_x_one_graph"] = round(out["joint_graph_ms"] / out["one_graph_ms"], 3)
        out["joint_graph_throughput_x_sequential"] = round(out["sequential_ms"] / out["joint_graph_ms"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="also host time against wall time, and kernels")
    parser.add_argument("--sizes", nargs="*", type=int, default=None, help="per-job batch and length pairs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = harness.Workload(args.device)
    sizes = [(1, 512), (2, 1024)] if work.cuda else [(1, 32), (2, 64)]
    if args.sizes:
        sizes = list(zip(args.sizes[::2], args.sizes[1::2]))
    results = {}
    for size in sizes:
        key = f"{JOBS} jobs x ({size[0]} x {size[1]})"
        results[key] = rows(work, size, args.profile)
        print(key, results[key], flush=True)
    print(f"wrote {harness.write_results('bench_jobs', args.device, {'jobs': results}, args.out)}")


if __name__ == "__main__":
    main()
