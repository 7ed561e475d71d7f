"""Decoding with many adapters: `generate()` with the KV cache, each sample of the batch on its own LoRA adapter
(`surgery.per_sample`), against the same batch on one adapter and against HF PEFT's `adapter_names`, in one process.

    python benchmarks/bench_decode.py --device cuda      # 0.85 B Llama shape, bf16, batch 32, 128 new tokens
    python benchmarks/bench_decode.py                    # CPU: a small model, a smoke run

LoRA r 16 on q/k/v/o, greedy decoding of a fixed number of tokens (no early stop). Rows: tokens per second for one
adapter, and for 8 and 64 distinct adapters spread over the batch. With `--repeat N` the rows are measured N times,
interleaved (one, 8, 64, one, 8, 64, ...), and each figure is the median: decode steps are bound by the host's
issue time, which drifts within a run. Results: benchmarks/results/bench_decode-<device>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import harness
import torch

import surgery

ROLES = ["attention.query", "attention.key", "attention.value", "attention.output"]


def tokens_per_s(work: harness.Workload, fn, new: int, batch: int, warm: bool = True) -> float:
    if warm:
        fn()  # warm-up (and the first call's set-up)
    work.sync()
    start = time.perf_counter()
    fn()
    work.sync()
    return round(batch * new / (time.perf_counter() - start), 1)


def interleaved(work: harness.Workload, runs: dict, new: int, batch: int, repeat: int) -> dict:
    """Tokens per second of each of `runs` (name -> call): each warmed once, then measured `repeat` times in
    turn; the median of each."""
    for fn in runs.values():
        fn()
    seen: dict = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            seen[name].append(tokens_per_s(work, fn, new, batch, warm=False))
    return {name: statistics.median(v) for name, v in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--adapters", nargs="*", type=int, default=[8, 64])
    parser.add_argument("--peft", action="store_true", help="also PEFT's adapter_names (slow: a loop per adapter)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each row N times, interleaved; medians")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = harness.Workload(args.device)
    batch, prompt, new = (32, 64, 128) if work.cuda else (8, 8, 8)
    vocab = work.shape["config"]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(args.device)
    gen = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    model = work.base().eval()
    most = max(args.adapters)
    g = torch.Generator().manual_seed(1)
    for i in range(most):
        surgery.attach(model, harness.lora_rules(ROLES, r=16), name=f"a{i}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.01)
    results = {}
    with torch.no_grad():
        surgery.set_active(model, ["a0"])
        runs = {"one_adapter_tok_s": lambda: model.generate(ids, **gen)}
        for n in args.adapters:
            names = [f"a{i % n}" for i in range(batch)]

            def routed(names=names):
                with surgery.per_sample(model, names):
                    return model.generate(ids, **gen)
            runs[f"{n}_adapters_tok_s"] = routed
        results |= interleaved(work, runs, new, batch, args.repeat)
        results["repeat"] = args.repeat
        for n in args.adapters:
            results[f"{n}_adapters_x_one"] = round(results[f"{n}_adapters_tok_s"] / results["one_adapter_tok_s"], 3)
        print(results, flush=True)
        if args.peft:
            import tempfile

            from peft import PeftModel
            with tempfile.TemporaryDirectory() as tmp:
                for i in range(most):
                    surgery.save(model, f"{tmp}/a{i}", name=f"a{i}", format="peft")
                for i in range(most):
                    surgery.detach(model, f"a{i}")
                pm = PeftModel.from_pretrained(model, f"{tmp}/a0", adapter_name="a0")
                for i in range(1, most):
                    pm.load_adapter(f"{tmp}/a{i}", adapter_name=f"a{i}")
                pm.eval()
                for n in args.adapters:
                    names = [f"a{i % n}" for i in range(batch)]
                    results[f"peft_{n}_adapters_tok_s"] = tokens_per_s(
                        work, lambda names=names: pm.generate(input_ids=ids, adapter_names=names, **gen), new, batch)
                    results[f"{n}_adapters_x_peft"] = round(
                        results[f"{n}_adapters_tok_s"] / results[f"peft_{n}_adapters_tok_s"], 3)
    print(results, flush=True)
    print(f"wrote {harness.write_results('bench_decode', args.device, {'decode': results}, args.out)}")


if __name__ == "__main__":
    main()
