"""surgery against HF PEFT, side by side in one process, on a Llama-shaped model with random weights.

    python benchmarks/bench_vs_peft.py                       # CPU, a small model: a few minutes
    python benchmarks/bench_vs_peft.py --device cuda         # GPU, the shapes of the performance issue (0.85 B, bf16)
    python benchmarks/bench_vs_peft.py --sections train fwd  # a subset: train fwd mixed attach compile profile accuracy
    python benchmarks/bench_vs_peft.py --device cuda --sections train --repeat 3  # each training row 3 times,
                                                             # interleaved, on fresh models: the median is kept

Prints a table of ratios and writes JSON (--out, default benchmarks/results-<device>.json).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery

SHAPES = {
    "cuda": dict(config=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
                 batch=8, seq=1024, mixed_batch=32, mixed_seq=512, dtype=torch.bfloat16, steps=10, warm=3),
    "cpu": dict(config=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512),
                batch=4, seq=128, mixed_batch=8, mixed_seq=64, dtype=torch.float32, steps=5, warm=2),
}
SEVEN_B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000)


class Bench:
    def __init__(self, device: str, repeat: int = 1):
        self.device = device
        self.repeat = repeat  # measurements of each training row
        self.shape = SHAPES["cuda" if device.startswith("cuda") else "cpu"]
        self.cuda = device.startswith("cuda")
        g = torch.Generator().manual_seed(0)
        vocab = self.shape["config"]["vocab_size"]
        self.ids = torch.randint(0, vocab, (self.shape["batch"], self.shape["seq"]), generator=g).to(device)
        self.mixed_ids = torch.randint(0, vocab, (self.shape["mixed_batch"], self.shape["mixed_seq"]), generator=g).to(device)
        self.results: dict = {}

    # ---- helpers ----------------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn, n: int | None = None, warm: int | None = None) -> float:
        n, warm = n or self.shape["steps"], warm if warm is not None else self.shape["warm"]
        for _ in range(warm):
            fn()
        self.sync()
        times = []
        for _ in range(n):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(); fn(); end.record(); torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    def fresh(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def base(self, **overrides) -> LlamaForCausalLM:
        torch.manual_seed(0)
        cfg = LlamaConfig(**{**self.shape["config"], **overrides})
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg).to(self.device, self.shape["dtype"])
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    @staticmethod
    def rules(targets: list[str] | None, r: int, dropout: float) -> surgery.RuleSet:
        select = surgery.Selector(roles=targets) if targets else surgery.Selector(kinds=["linear"])
        return surgery.RuleSet(name="bench", rules=[surgery.Rule(select=select, exclude=surgery.Selector(roles=["lm_head"]),
                                                                 method="lora", params={"r": r, "alpha": 2 * r, "dropout": dropout})])

    def ours(self, dropout: float, r: int = 16, targets=None, name: str = "a", model=None):
        model = model or self.base()
        surgery.attach(model, self.rules(targets, r, dropout), name=name)
        return model

    def peft(self, dropout: float, autocast: bool, r: int = 16, targets="all-linear", model=None):
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model or self.base(), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets),
                              autocast_adapter_dtype=autocast)

    def train_step(self, model, fused: bool | None = None):
        """One training step of `model` on the benchmark's batch; AdamW fused where asked (default: on CUDA)."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=self.cuda if fused is None else fused) if params else None
        loss = self.train_loss(model)

        def step():
            loss().backward()
            if opt:
                opt.step(); opt.zero_grad(set_to_none=True)
        return step

    def train_loss(self, model):
        """The training step's forward: a function giving `model`'s loss on the benchmark's batch."""
        ids = self.ids
        return lambda: model(input_ids=ids, labels=ids, use_cache=False).loss

    def floor_step(self, model):
        """The floor's step on the benchmark's batch: `model` frozen, gradients to its input embeddings only."""
        loss = self.floor_loss(model)
        return lambda: loss().backward()

    def floor_loss(self, model):
        """The floor's forward: a function giving frozen `model`'s loss, its input embeddings requiring gradients."""
        emb = model.get_input_embeddings()
        ids = self.ids
        return lambda: model(inputs_embeds=emb(ids).detach().requires_grad_(True), labels=ids, use_cache=False).loss

    def record(self, key: str, ms: float, **extra) -> None:
        """Keep a training row; with --repeat, every measurement is listed and the median is the row's figure."""
        row = self.results.setdefault("train", {}).setdefault(key, {"runs_ms": []})
        row["runs_ms"].append(round(ms, 2))
        row.update(step_ms=round(statistics.median(row["runs_ms"]), 2), peak_gib=self.peak_gib(), **extra)

    def measure_train(self, key: str, build) -> None:
        self.fresh()
        model = build()
        model.train()
        ms = self.time_ms(self.train_step(model))
        self.record(key, ms, trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
        print(f"  train {key:34s} {ms:9.2f} ms  peak {self.peak_gib()} GiB", flush=True)
        del model
        self.fresh()

    # ---- sections ------------------------------------------------------------------------------------------
    def floor(self) -> None:
        self.fresh()
        model = self.base().train()
        ms = self.time_ms(self.floor_step(model))
        self.record("floor", ms)
        print(f"  train {'floor (frozen, dx only)':34s} {ms:9.2f} ms  peak {self.peak_gib()} GiB", flush=True)
        del model
        self.fresh()

    def section_train(self) -> None:
        for _ in range(self.repeat):
            self.floor()
            for p in (0.05, 0.0):
                self.measure_train(f"peft_default_drop{p}", lambda p=p: self.peft(p, autocast=True))
                self.measure_train(f"peft_bf16_drop{p}", lambda p=p: self.peft(p, autocast=False))
                self.measure_train(f"surgery_drop{p}", lambda p=p: self.ours(p))

    def section_compile(self) -> None:
        for p in (0.05, 0.0):
            def build(p=p):
                torch._dynamo.reset()
                model = self.ours(p)
                compiled = torch.compile(model, fullgraph=True)
                compiled.parameters = model.parameters  # the optimizer sees the same tensors
                return compiled
            self.measure_train(f"surgery_compiled_drop{p}", build)

    def section_fwd(self) -> None:
        ids = self.ids
        with torch.no_grad():
            self.fresh()
            model = self.base().eval()
            res = {"base": self.time_ms(lambda: model(input_ids=ids, use_cache=False))}
            surgery.attach(model, self.rules(None, 16, 0.0), name="a")
            res["surgery_unmerged"] = self.time_ms(lambda: model(input_ids=ids, use_cache=False))
            surgery.merge(model, "a")
            res["surgery_merged"] = self.time_ms(lambda: model(input_ids=ids, use_cache=False))
            surgery.detach(model, "a")
            for autocast in (True, False):
                pm = self.peft(0.0, autocast, model=model).eval()
                res[f"peft_unmerged_{'default' if autocast else 'bf16'}"] = self.time_ms(lambda: pm(input_ids=ids, use_cache=False))
                model = pm.unload()
            del model
        self.results["fwd_ms"] = {k: round(v, 2) for k, v in res.items()}
        print("  fwd", self.results["fwd_ms"], flush=True)
        self.fresh()

    def section_accuracy(self) -> None:
        """Logits of the unmerged LoRA forward in the benchmark's dtype against a float32 run of the same weights,
        for surgery's default form (on CUDA, from as many tokens as inputs: the merged weight built per call), its
        separate form (x @ A.T @ B.T added to the output), and HF PEFT with adapters in the same dtype. B is drawn
        so that ‖s·B·A‖ is 1 % or 10 % of ‖W‖ per layer (std 0.02 weights). Errors are relative to the float32
        logits and to the adapter's effect on them (float32 logits with minus without the adapter)."""
        from surgery_plugins import lora_merged_weight

        ids, out = self.ids, {}
        kaiming_std = (1 / (3 * self.shape["config"]["hidden_size"])) ** 0.5  # of A; s = 2, r = 16
        for label, relative in (("delta_1pct", 0.01), ("delta_10pct", 0.10)):
            self.fresh()
            model = self.ours(0.0).eval()
            g = torch.Generator(device=self.device).manual_seed(1)
            b_std = relative * 0.02 / (2 * (16 ** 0.5) * kaiming_std)
            pairs = {}
            with torch.no_grad():
                for name, module in model.named_modules():
                    if isinstance(module, surgery.Host):
                        branch = module.branches["a"]
                        branch.lora_B.normal_(std=b_std, generator=g)
                        pairs[name] = (branch.lora_A.clone(), branch.lora_B.clone())

                def run(forms: set[str]) -> torch.Tensor:
                    real = lora_merged_weight.DEVICES
                    lora_merged_weight.DEVICES = forms
                    try:
                        return model(input_ids=ids, use_cache=False).logits.float()
                    finally:
                        lora_merged_weight.DEVICES = real
                got = {"surgery_default": run(lora_merged_weight.DEVICES), "surgery_separate": run(set())}
                model.float()
                ref = run(set())
                with surgery.disabled(model):
                    effect = (ref - model(input_ids=ids, use_cache=False).logits.float()).norm()
                surgery.detach(model, "a")
                model.to(self.shape["dtype"])
                pm = self.peft(0.0, autocast=False, model=model).eval()
                for name, module in pm.base_model.model.named_modules():
                    if name in pairs:
                        module.lora_A["default"].weight.copy_(pairs[name][0])
                        module.lora_B["default"].weight.copy_(pairs[name][1])
                got["peft_bf16_adapters"] = pm(input_ids=ids, use_cache=False).logits.float()
            out[label] = {k: {"error_vs_logits": float((v - ref).norm() / ref.norm()),
                              "error_vs_adapter_effect": float((v - ref).norm() / effect)} for k, v in got.items()}
            out[label]["adapter_effect_vs_logits"] = float(effect / ref.norm())
            print(f"  accuracy {label}: {out[label]}", flush=True)
            del model, pm, got, ref
        self.results["accuracy"] = out
        self.fresh()

    def section_mixed(self) -> None:
        from peft import LoraConfig, get_peft_model

        ids, n = self.mixed_ids, 8
        names = [f"a{i % n}" for i in range(ids.shape[0])]
        targets = ["attention.query", "attention.key", "attention.value", "attention.output"]
        res = {}
        with torch.no_grad():
            self.fresh()
            model = self.base().eval()
            for i in range(n):
                self.ours(0.0, targets=targets, name=f"a{i}", model=model)
            for name_, p in model.named_parameters():
                if "lora_B" in name_:
                    torch.nn.init.normal_(p, std=0.01)
            with surgery.disabled(model):
                res["surgery_no_adapter"] = self.time_ms(lambda: model(input_ids=ids, use_cache=False))
            surgery.set_active(model, ["a0"])
            res["surgery_one_adapter"] = self.time_ms(lambda: model(input_ids=ids, use_cache=False))
            with surgery.per_sample(model, names):
                res["surgery_8_mixed"] = self.time_ms(lambda: model(input_ids=ids, use_cache=False))
            for i in range(n):
                surgery.detach(model, f"a{i}")
            cfg = lambda: LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])  # noqa: E731
            pm = get_peft_model(model, cfg(), adapter_name="a0", autocast_adapter_dtype=False)
            for i in range(1, n):
                pm.add_adapter(f"a{i}", cfg(), autocast_adapter_dtype=False)
            for name_, p in pm.named_parameters():
                if "lora_B" in name_:
                    torch.nn.init.normal_(p, std=0.01)
            pm.eval()
            pm.set_adapter("a0")
            res["peft_one_adapter"] = self.time_ms(lambda: pm(input_ids=ids, use_cache=False))
            res["peft_8_mixed"] = self.time_ms(lambda: pm(input_ids=ids, use_cache=False, adapter_names=names))
            with pm.disable_adapter():
                res["peft_no_adapter"] = self.time_ms(lambda: pm(input_ids=ids, use_cache=False))
            del pm, model
        self.results["mixed_ms"] = {k: round(v, 2) for k, v in res.items()}
        print("  mixed", self.results["mixed_ms"], flush=True)
        self.fresh()

    def section_attach(self) -> None:
        from peft import LoraConfig, get_peft_model

        cfg = LlamaConfig(**SEVEN_B)
        res = {}
        rules = self.rules(None, 16, 0.0)
        for attempt in ("cold", "warm"):
            with torch.device("meta"):
                meta = LlamaForCausalLM(cfg)
            t = time.perf_counter()
            surgery.attach(meta, rules, name="a")
            res[f"surgery_attach_meta_{attempt}_s"] = time.perf_counter() - t
        with torch.device("meta"):
            meta = LlamaForCausalLM(cfg)
        t = time.perf_counter()
        get_peft_model(meta, LoraConfig(r=16, target_modules="all-linear"))
        res["peft_attach_meta_s"] = time.perf_counter() - t
        del meta
        if self.cuda:  # merging real 7B-shaped weights on the GPU
            for who in ("surgery", "surgery_exact_off", "surgery_bake", "peft"):
                self.fresh()
                with torch.device(self.device):
                    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
                if who == "peft":
                    pm = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
                    for n_, p in pm.named_parameters():
                        if "lora_B" in n_:
                            torch.nn.init.normal_(p, std=0.01)
                    self.sync(); t = time.perf_counter(); pm.merge_and_unload(); self.sync()
                    res["peft_merge_and_unload_s"] = time.perf_counter() - t
                    del pm
                else:
                    surgery.attach(model, rules, name="a")
                    for n_, p in model.named_parameters():
                        if "lora_B" in n_:
                            torch.nn.init.normal_(p, std=0.01)
                    self.sync(); t = time.perf_counter()
                    if who == "surgery_bake":  # merge for good and remove the branches: what merge_and_unload does
                        surgery.bake(model, "a")
                    else:
                        surgery.merge(model, "a", exact=who == "surgery")
                    self.sync()
                    res[f"{who}_merge_s"] = time.perf_counter() - t
                    if who == "surgery":
                        kept = sum(m.record.nbytes() for m in model._surgery_ledger.attachments["a"].merged)
                        res["surgery_merge_exact_kept_mib"] = kept / 2**20
                del model
            self.fresh()
        self.results["attach_7b"] = {k: round(v, 3) for k, v in res.items()}
        print("  7b", self.results["attach_7b"], flush=True)

    def host_and_wall_ms(self, step, n: int = 8) -> tuple[float, float]:
        """Medians of the host's time to issue one step (no wait for the device) and of the step's wall time: where
        the first reaches the second, the step is bound by the host, not by the GPU's kernels."""
        for _ in range(2):
            step()
        self.sync()
        host, wall = [], []
        for _ in range(n):
            start = time.perf_counter()
            step()
            host.append((time.perf_counter() - start) * 1000)
            self.sync()
            wall.append((time.perf_counter() - start) * 1000)
        return statistics.median(host), statistics.median(wall)

    def section_profile(self) -> None:
        """Kernel counts and CUDA time of one training step, by kind of kernel, and the host's time to issue it:
        where the time goes."""
        from torch.profiler import ProfilerActivity, profile

        out = {}
        for key, build in (("floor", None), ("peft_bf16_drop0.05", lambda: self.peft(0.05, autocast=False)),
                           ("surgery_drop0.05", lambda: self.ours(0.05)), ("surgery_drop0.0", lambda: self.ours(0.0))):
            self.fresh()
            model = (build or self.base)().train()
            step = self.train_step(model) if build else self.floor_step(model)
            host_ms, wall_ms = self.host_and_wall_ms(step)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            with profile(activities=activities) as prof:
                step(); self.sync()
            kernels: dict[str, list[float]] = {}
            by_name: dict[str, list[float]] = {}
            for e in prof.events():
                if self.cuda and e.device_type == torch.autograd.DeviceType.CUDA:
                    kind = ("gemm" if any(s in e.name.lower() for s in ("gemm", "cutlass", "sm90", "xmma", "ampere_", "cublas"))
                            else "attention" if "flash" in e.name.lower() or "fmha" in e.name.lower() or "attention" in e.name.lower()
                            else "elementwise/other")
                    us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                    kernels.setdefault(kind, []).append(us)
                    by_name.setdefault(e.name[:90], []).append(us)
            out[key] = {k: {"kernels": len(v), "ms": round(sum(v) / 1000, 2)} for k, v in kernels.items()}
            top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
            out[key]["top"] = [{"kernel": n, "count": len(v), "ms": round(sum(v) / 1000, 2)} for n, v in top]
            out[key]["total_kernels"] = sum(len(v) for v in kernels.values())
            out[key]["kernel_ms"] = round(sum(sum(v) for v in kernels.values()) / 1000, 2)
            out[key]["host_issue_ms"], out[key]["wall_ms"] = round(host_ms, 2), round(wall_ms, 2)
            print(f"  profile {key}: " + str({k: v for k, v in out[key].items() if k != "top"}), flush=True)
            for row in out[key]["top"]:
                print(f"      {row['ms']:8.2f} ms {row['count']:5d}x  {row['kernel']}", flush=True)
            del model
            self.fresh()
        self.results["profile"] = out


def host_us(fn, calls: int, rounds: int, warm: int, pick=statistics.median) -> float:
    """Host µs per call of `fn` (CUDA): `pick` (median, min, ...) over `rounds` runs of `calls` calls, after `warm`
    calls; the device is not waited for inside a run and is drained after each."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    per_run = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_run.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return pick(per_run)


def ratios(r: dict) -> list[tuple[str, float | None, str]]:
    rows = []
    t = r.get("train", {})

    def ratio(a, b, field="step_ms"):
        return round(t[a][field] / t[b][field], 3) if a in t and b in t and t[a].get(field) and t[b].get(field) else None
    for p in ("0.05", "0.0"):
        rows.append((f"train drop {p}: surgery / floor", ratio(f"surgery_drop{p}", "floor"), "<= 1.10"))
        rows.append((f"train drop {p}: surgery / PEFT default", ratio(f"surgery_drop{p}", f"peft_default_drop{p}"), "<= 0.60"))
        rows.append((f"train drop {p}: surgery / PEFT bf16 adapters", ratio(f"surgery_drop{p}", f"peft_bf16_drop{p}"), "< 1"))
        rows.append((f"train drop {p}: peak memory surgery / floor", ratio(f"surgery_drop{p}", "floor", "peak_gib"), "<= 1.15"))
        rows.append((f"train drop {p}: compiled surgery / floor", ratio(f"surgery_compiled_drop{p}", "floor"), "<= 1.10"))
    f = r.get("fwd_ms", {})
    if f:
        rows.append(("forward: surgery unmerged / base", round(f["surgery_unmerged"] / f["base"], 3), "<= 1.05"))
        rows.append(("forward: surgery unmerged / PEFT bf16 unmerged", round(f["surgery_unmerged"] / f["peft_unmerged_bf16"], 3), "< 1"))
    m = r.get("mixed_ms", {})
    if m:
        rows.append(("mixed 8 adapters / one adapter (surgery)", round(m["surgery_8_mixed"] / m["surgery_one_adapter"], 3), "<= 1.15"))
        rows.append(("mixed 8 adapters: surgery / PEFT", round(m["surgery_8_mixed"] / m["peft_8_mixed"], 3), "< 1"))
    a = r.get("attach_7b", {})
    if a:
        rows.append(("7B attach on meta (warm): surgery / PEFT", round(a["surgery_attach_meta_warm_s"] / a["peft_attach_meta_s"], 3), "<= 1"))
        rows.append(("7B attach on meta (cold): surgery / PEFT", round(a["surgery_attach_meta_cold_s"] / a["peft_attach_meta_s"], 3), "<= 1"))
        if "peft_merge_and_unload_s" in a:
            rows.append(("7B merge on GPU (exact unmerge kept): surgery / PEFT", round(a["surgery_merge_s"] / a["peft_merge_and_unload_s"], 3), "<= 1"))
            rows.append(("7B merge on GPU (exact=False): surgery / PEFT", round(a["surgery_exact_off_merge_s"] / a["peft_merge_and_unload_s"], 3), "<= 1"))
            rows.append(("7B bake (≙ merge_and_unload) on GPU: surgery / PEFT", round(a["surgery_bake_merge_s"] / a["peft_merge_and_unload_s"], 3), "<= 1"))
    return [row for row in rows if row[1] is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sections", nargs="*", default=["train", "fwd", "mixed", "attach"],
                        choices=["train", "compile", "fwd", "mixed", "attach", "profile", "accuracy"])
    parser.add_argument("--repeat", type=int, default=1, help="measure each training row this many times")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    import peft
    import transformers

    bench = Bench(args.device, args.repeat)
    bench.results["meta"] = {"date": str(date.today()), "device": torch.cuda.get_device_name() if bench.cuda else platform.processor() or "cpu",
                             "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                             "surgery": surgery.__version__, "python": sys.version.split()[0],
                             "shapes": {k: v for k, v in bench.shape.items() if k != "dtype"} | {"dtype": str(bench.shape["dtype"])}}
    for section in args.sections:
        print(f"[{section}]", flush=True)
        getattr(bench, f"section_{section}")()
    bench.results["ratios"] = [{"what": w, "ratio": v, "target": t} for w, v, t in ratios(bench.results)]
    print("\n| ratio | value | target |\n|---|---|---|")
    for w, v, t in ratios(bench.results):
        print(f"| {w} | {v} | {t} |")
    out = args.out or os.path.join(os.path.dirname(__file__), f"results-{'cuda' if bench.cuda else 'cpu'}.json")
    with open(out, "w") as f:
        json.dump(bench.results, f, indent=1, default=str)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
