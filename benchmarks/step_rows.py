"""The floor and surgery's two LoRA training rows (dropout 0.05 and 0) of bench_vs_peft, alone, in one process, with
each row's host issue time: for comparing two versions of surgery on one machine, run alternately from two
installs (the lent GPU machines' hosts differ by up to 40 % between machines, so rows from different calls do not
compare).

    PYTHONPATH=/tmp/old python benchmarks/step_rows.py old; PYTHONPATH=/tmp/new python benchmarks/step_rows.py new
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_vs_peft as bench  # noqa: E402


def main() -> None:
    tag = sys.argv[1] if len(sys.argv) > 1 else "surgery"
    warnings.filterwarnings("ignore", category=FutureWarning)
    b = bench.Bench("cuda")
    b.shape["steps"], b.shape["warm"] = 20, 4
    out = {"floor": b.time_ms(b.floor_step(b.base().train()))}
    b.fresh()
    for p in (0.05, 0.0):
        model = b.ours(p).train()
        step = b.train_step(model)
        out[f"drop{p}"] = b.time_ms(step)
        out[f"drop{p} host"] = b.host_and_wall_ms(step)[0]
        out[f"drop{p} / floor"] = out[f"drop{p}"] / out["floor"]
        del model, step
        b.fresh()
    print(tag, json.dumps({k: round(v, 3) for k, v in out.items()}), flush=True)


if __name__ == "__main__":
    main()
