"""QLoRA training steps, surgery against HF PEFT + bitsandbytes in one process: a Llama-shaped model with random
weights (harness.SHAPES: on CUDA the 0.85 B model in bf16, 8 x 1024 tokens) whose linears but the head are NF4
`Linear4bit` (double quantization, uint8 storage, compute dtype the model's: harness.nf4), LoRA r 16, alpha 32 on
every one of them, dropout 0.05 and 0, AdamW, no gradient checkpointing.

    python benchmarks/bench_qlora.py --device cuda [--repeat 3]   # the figures
    python benchmarks/bench_qlora.py --device cuda --profile      # + where one step's GPU time goes
    python benchmarks/bench_qlora.py                              # CPU, a small float32 model: a smoke run

Rows, each on a fresh model, interleaved (with --repeat, the median of the runs is the row's figure):
- floor: the frozen NF4 model, gradients to its input embeddings only (what any adapter adds to);
- peft_default: `get_peft_model` as is: fp32 adapters, inputs cast to fp32 for them (`autocast_adapter_dtype`);
- peft_bf16: `autocast_adapter_dtype=False`: the adapters in the model's dtype;
- surgery: `lora` on every `quantized_linear` site, its branches in the layers' compute dtype.
The model is not passed through `prepare_model_for_kbit_training` (which would cast the norms, embeddings and
head to fp32 and turn on checkpointing): every row trains the same bf16 model. Peak memory is counted from after
the model is built. Results: benchmarks/results/bench_qlora-<device>.json, ratios surgery / PEFT for each.
Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import statistics

import bitsandbytes
import harness
import torch

import surgery

DROPOUTS = (0.05, 0.0)


class Bench(harness.Workload):
    """The workload on an NF4 base, with the training rows; figures go to `results`."""

    def __init__(self, device: str):
        super().__init__(device)
        self.results: dict = {"train": {}}

    def nf4_base(self):
        model = self.base()
        harness.nf4(model, self.shape["dtype"])
        return model

    def surgery_model(self, p: float):
        model = self.nf4_base()
        surgery.attach(model, harness.lora_rules(r=16, dropout=p, kinds=("quantized_linear",)), name="a")
        return model

    def peft_model(self, p: float, autocast: bool):
        """PEFT's LoRA (harness.Workload.peft) on the NF4 base, checked to be its bitsandbytes layer."""
        model = self.peft(p, autocast=autocast, model=self.nf4_base())
        if not any(type(m).__module__ == "peft.tuners.lora.bnb" for m in model.modules()):
            raise RuntimeError("PEFT did not wrap the Linear4bit layers with its bitsandbytes LoRA layer")
        return model

    def measure(self, key: str, build, floor: bool = False) -> None:
        self.fresh()
        model = build().train()
        if self.cuda:  # the peak of the training steps, not of building (bf16 weights before quantizing)
            torch.cuda.reset_peak_memory_stats()
        trainable = [p for p in model.parameters() if p.requires_grad]
        ms = self.time_ms(self.floor_step(model) if floor else self.train_step(model))
        row = self.results["train"].setdefault(key, {"runs_ms": []})
        row["runs_ms"].append(round(ms, 2))
        row.update(step_ms=round(statistics.median(row["runs_ms"]), 2), peak_gib=self.peak_gib(),
                   trainable=sum(p.numel() for p in trainable),
                   adapter_dtype=str(trainable[0].dtype).replace("torch.", "") if trainable else None)
        print(f"  {key:24s} {ms:9.2f} ms  peak {self.peak_gib()} GiB  trainable {row['trainable']} "
              f"({row['adapter_dtype']})", flush=True)
        del model, trainable
        self.fresh()

    def run(self, repeat: int) -> None:
        for _ in range(repeat):
            self.measure("floor", self.nf4_base, floor=True)
            for p in DROPOUTS:
                self.measure(f"peft_default_drop{p}", lambda p=p: self.peft_model(p, autocast=True))
                self.measure(f"peft_bf16_drop{p}", lambda p=p: self.peft_model(p, autocast=False))
                self.measure(f"surgery_drop{p}", lambda p=p: self.surgery_model(p))


    def profile(self, key: str, build, top: int = 12) -> None:
        """One training step of `build()`'s model under torch.profiler (harness.profile; the figures go to
        results['profile'][key])."""
        self.fresh()
        model = build().train()
        step = self.train_step(model)
        found = self.results.setdefault("profile", {})[key] = harness.profile(step, self.device, top)
        harness.print_profile(key, found)
        del model, step
        self.fresh()


def ratios(results: dict) -> list[dict]:
    """surgery / each PEFT row, of step time and of peak memory, per dropout; and surgery / floor."""
    t = results.get("train", {})

    def ratio(a: str, b: str, field: str) -> float | None:
        x, y = t.get(a, {}).get(field), t.get(b, {}).get(field)
        return round(x / y, 3) if x and y else None
    rows = []
    for p in DROPOUTS:
        ours = f"surgery_drop{p}"
        for peft_row, label, target in ((f"peft_default_drop{p}", "PEFT default (fp32 adapters)", "<= 0.80"),
                                        (f"peft_bf16_drop{p}", "PEFT bf16 adapters", "< 1")):
            rows.append({"what": f"drop {p}: step surgery / {label}", "ratio": ratio(ours, peft_row, "step_ms"),
                         "target": target})
            rows.append({"what": f"drop {p}: peak memory surgery / {label}",
                         "ratio": ratio(ours, peft_row, "peak_gib"), "target": "<= 1"})
        rows.append({"what": f"drop {p}: step surgery / floor", "ratio": ratio(ours, "floor", "step_ms"), "target": "-"})
    return [r for r in rows if r["ratio"] is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="measure each row this many times, interleaved")
    parser.add_argument("--out", default=None,
                        help="results file (default: benchmarks/results/bench_qlora-<device>.json)")
    parser.add_argument("--profile", action="store_true", help="also profile one step of surgery and PEFT bf16")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    bench = Bench(args.device)
    shapes = {k: v for k, v in bench.shape.items() if k != "dtype"} | {"dtype": str(bench.shape["dtype"])}
    bench.results["meta"] = harness.run_meta(args.device, shapes=shapes, bitsandbytes=bitsandbytes.__version__,
                                             lora={"r": 16, "alpha": 32, "dropout": list(DROPOUTS)},
                                             quantization="nf4, double quant, uint8 storage, blocksize 64")
    bench.run(args.repeat)
    if args.profile:
        for p in DROPOUTS:
            bench.profile(f"surgery_drop{p}", lambda p=p: bench.surgery_model(p))
            bench.profile(f"peft_bf16_drop{p}", lambda p=p: bench.peft_model(p, autocast=False))
    print("\n| row | ms / step | peak GiB |\n|---|---|---|")
    for key, row in bench.results["train"].items():
        print(f"| {key} | {row['step_ms']} | {row['peak_gib']} |")
    print("\n| ratio | value | target |\n|---|---|---|")
    for r in ratios(bench.results):
        print(f"| {r['what']} | {r['ratio']} | {r['target']} |")
    out = harness.write_results("bench_qlora", args.device, bench.results, args.out,
                                derive=lambda merged: {"ratios": ratios(merged)})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
