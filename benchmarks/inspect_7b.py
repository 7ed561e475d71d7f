"""How long `surgery.inspect` takes on a 7B-shaped Llama built on the meta device (no weights, no compute).

    python benchmarks/inspect_7b.py

Prints the first call in this process (with torch.export's one-time setup), a second instance of the same
architecture (served from the analysis cache), and a re-trace with the cache cleared. Writes
benchmarks/results/inspect_7b-cpu.json (the trace runs on the CPU whatever the machine has).
"""
from __future__ import annotations

import argparse
import time

import harness

import surgery


def timed(model) -> tuple[float, int]:
    start = time.perf_counter()
    report = surgery.inspect(model)
    return time.perf_counter() - start, len(report.sites)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/inspect_7b-cpu.json)")
    args = parser.parse_args()
    first, sites = timed(harness.meta_llama(harness.SEVEN_B))
    cached, _ = timed(harness.meta_llama(harness.SEVEN_B))
    harness.analysis_cache().clear()
    traced, _ = timed(harness.meta_llama(harness.SEVEN_B))
    print(f"7B-shaped Llama on meta, {sites} sites: first call {first:.2f} s, cached {cached * 1000:.0f} ms, "
          f"re-traced {traced:.2f} s")
    out = harness.write_results("inspect_7b", "cpu", {"meta": {"config": harness.SEVEN_B}, "inspect_s": {
        "sites": sites, "first": round(first, 3), "cached": round(cached, 4), "retraced": round(traced, 3)}}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
