"""The host CPU's share of a LoRA step, measured where nothing else is: on the CPU, with a tiny Llama (16 layers,
width 64, 8 tokens), so that every op costs about what it costs the host to issue it on a GPU, side by side with
HF PEFT. The Triton launches are replaced by no-ops (their outputs are not used: this is a timing, not a result),
so the LoRA path is the one a CUDA run takes.

    python benchmarks/host_overhead.py            # ms per step and ratios to the floor, median of 60

On the lent H100s the eager LoRA step is bound by the host (see benchmarks/README.md); this is the quick way to
see what a change does to that, without a GPU.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_vs_peft as bench  # noqa: E402
from surgery_plugins import lora_fused, lora_kernels, lora_shared  # noqa: E402

TINY = dict(config=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=16, num_attention_heads=4,
                        num_key_value_heads=1, vocab_size=128, max_position_embeddings=64),
            batch=1, seq=8, mixed_batch=2, mixed_seq=8, dtype=torch.float32, steps=60, warm=5)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def take_the_cuda_path() -> None:
    """Make the CPU take the kernels' path (float32 allowed), with launches that do nothing, and the merged-weight
    form that a CUDA run takes at the benchmark's 8192 tokens."""
    lora_kernels.DEVICES, lora_kernels.DTYPES = {"cpu"}, {torch.float32}
    lora_kernels._down_kernel = lora_kernels._grads_kernel = lora_kernels._merged_kernel = _NoLaunch()
    lora_kernels._up_kernel = _NoLaunch()
    for module in (lora_fused, lora_shared):
        module.pays = lambda tokens, weight: True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the no-op launches leave their outputs as allocated: no slow denormal maths
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT on transformers 5
    take_the_cuda_path()
    bench.SHAPES["cpu"] = TINY
    b = bench.Bench("cpu")
    ids = b.ids
    base = b.base().train()

    def ms(fn) -> float:
        return b.time_ms(fn, n=args.n, warm=5)

    rows = {"floor": ms(b.floor_step(base))}
    with torch.no_grad():
        rows["forward base"] = ms(lambda: base(input_ids=ids, use_cache=False))
    for p in (0.05, 0.0):
        for name, build in ((f"surgery, dropout {p}", lambda p=p: b.ours(p)),
                            (f"PEFT bf16-style adapters, dropout {p}", lambda p=p: b.peft(p, autocast=False))):
            rows[name] = ms(b.train_step(build().train(), fused=True))  # the fused AdamW a CUDA run uses
    model = b.ours(0.0).eval()
    with torch.no_grad():
        rows["forward surgery unmerged"] = ms(lambda: model(input_ids=ids, use_cache=False))
    for name, value in rows.items():
        against = rows["forward base"] if name.startswith("forward") else rows["floor"]
        print(f"{name:42s} {value:7.2f} ms  {value / against:5.2f} x {'base' if name.startswith('forward') else 'floor'}")


if __name__ == "__main__":
    main()
