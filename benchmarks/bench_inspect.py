"""How long `surgery.inspect` takes on 7B- and 70B-shaped Llamas built on the meta device (no weights, no compute).

    python benchmarks/bench_inspect.py [--repeat 3]

First, in a fresh process, torch.export's one-time setup, timed alone on a one-op module. Then for each shape: the
first inspect (the architecture not yet analysed), a second instance of the same architecture (served from the
analysis cache), and re-traces with the cache cleared (median of `--repeat`). A user's very first call costs the
setup plus the first inspect. Writes benchmarks/results/bench_inspect-cpu.json (the trace runs on the CPU whatever
the machine has); figures from a shared machine vary, so compare them within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import harness
import torch

import surgery

# Llama-3-70B's shape.
SEVENTY_B = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256}
SHAPES = {"7b": harness.SEVEN_B, "70b": SEVENTY_B}


class _One(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def seconds(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall seconds of fn(*args, **kwargs), and what it returned."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="re-traces per shape (median)")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/bench_inspect-cpu.json)")
    args = parser.parse_args()
    setup, _ = seconds(torch.export.export, _One(), (torch.ones(2),), strict=False)
    print(f"torch.export's one-time setup: {setup:.2f} s")
    rows = {}
    for name, config in SHAPES.items():
        first_model, second_model = harness.meta_llama(config), harness.meta_llama(config)
        first, report = seconds(surgery.inspect, first_model)
        cached, _ = seconds(surgery.inspect, second_model)
        traced = []
        for _ in range(args.repeat):
            harness.analysis_cache().clear()
            traced.append(seconds(surgery.inspect, harness.meta_llama(config))[0])
        sites, retraced = len(report.sites), statistics.median(traced)
        rows[name] = {"config": config, "sites": sites, "first": round(first, 3), "cached": round(cached, 4),
                      "retraced": round(retraced, 3)}
        print(f"{name}-shaped Llama on meta, {sites} sites: first {first:.2f} s, cached {cached * 1000:.0f} ms, "
              f"re-traced {retraced:.2f} s (median of {args.repeat})")
    out = harness.write_results("bench_inspect", "cpu", {"meta": {"threads": torch.get_num_threads()},
                                                         "export_setup_s": {"one_op": round(setup, 3)},
                                                         "inspect_s": rows}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
