"""Host time per call of the LoRA kernels' wrappers (one decoder layer's q/k/v group, 8 x 1024 tokens, r = 16),
with the compiled kernels launched directly (plugins/triton_launch.py) and through Triton's launcher, in one
process, beside two torch ops for scale. GPU only.

    python benchmarks/launch_host_cost.py        # prints a table, writes results-cuda-launch-host.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from surgery_plugins import lora_kernels as K
from surgery_plugins import triton_launch

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_peft import host_us  # noqa: E402


def calls() -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16) * scale

    tokens, width, outs = 8192, 2048, (2048, 512, 512)
    x, dx, a = rand(tokens, width), rand(tokens, width), rand(48, width, scale=0.01)
    h, dh = rand(tokens, 48), rand(tokens, 48)
    dys, b_s, ws = [rand(tokens, n) for n in outs], [rand(n, 16) for n in outs], [rand(n, width) for n in outs]
    return {
        "dropped_down (forward, dropout)": lambda: K.dropped_down(x, a, 3, 0.05, 1234),
        "input_grads (backward, dropout)": lambda: K.input_grads((x,), h, a, 3, 0.05, 1234, dx),
        "up_grads (backward)": lambda: K.up_grads(dys, b_s, h, [0, 16, 32], dh, [2.0] * 3, [1.0] * 3),
        "merged_weights (inference)": lambda: K.merged_weights(ws, list(a.split(16)), b_s, [2.0] * 3),
        "torch: dx.add_(0)": lambda: dx.add_(0),
        "torch: addmm(W, B, A)": lambda: torch.addmm(ws[0], b_s[0], a[:16], alpha=2.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results-cuda-launch-host.json"))
    args = parser.parse_args()
    rows = {name: {} for name in calls()}
    for direct in (True, False, True):  # direct twice, around the launcher, to show the drift of the host
        triton_launch.DIRECT = direct
        for name, fn in calls().items():
            us = round(host_us(fn, calls=200, rounds=5, warm=10), 1)
            rows[name].setdefault("direct" if direct else "triton launcher", []).append(us)
    triton_launch.DIRECT = True
    print(f"{'call (q/k/v group)':36s} {'direct µs':>16s} {'Triton launcher µs':>20s}")
    for name, row in rows.items():
        print(f"{name:36s} {' / '.join(map(str, row['direct'])):>16s} {row['triton launcher'][0]:>20}")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__}
    out = Path(args.out)
    out.write_text(json.dumps({"meta": meta, "host_us": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
