"""surgery against HF PEFT, side by side in one process, on a Llama-shaped model with random weights; ratios printed,
every figure written to benchmarks/results/bench_vs_peft-<device>.json (see docs/performance.md).

    python benchmarks/bench_vs_peft.py                       # CPU, a small model: a smoke run of the same code paths
    python benchmarks/bench_vs_peft.py --device cuda         # GPU, the shapes of the performance figures (0.85 B, bf16)
    python benchmarks/bench_vs_peft.py --device cuda --sections train --repeat 3  # each training row 3 times,
                                                             # interleaved, on fresh models: the median is kept
    python benchmarks/bench_vs_peft.py --device cuda --sections profile   # kernels and host time by kind
    PYTHONPATH=/tmp/old python benchmarks/bench_vs_peft.py --device cuda --sections rows --tag old  # A/B, see docs

Sections: train (floor, PEFT default and bf16 adapters, surgery; dropout 0.05 and 0), dora (the same rows for DoRA:
PEFT's `use_dora` against surgery's `dora` method, same r, alpha, dropout and sites), compile (surgery under
torch.compile), fwd (inference forward), mixed (8 adapters in one batch), attach (7B-shaped attach on meta; on CUDA
merge of real 7B weights), profile (kernel counts and time by kind, host issue time), accuracy (bf16 logits against
float32), rows (the floor and surgery's two rows alone, for an A/B of two versions).

The results file keeps one entry per section: a run replaces the rows of the sections it ran (meta.sources says when
and by what command each was measured) and the ratios are recomputed over the file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import harness
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery

SECTIONS = ["train", "dora", "compile", "fwd", "mixed", "attach", "profile", "accuracy", "rows"]


class Bench(harness.Workload):
    """The workload (harness.Workload) with the sections that measure it; figures go to `results`."""

    def __init__(self, device: str, repeat: int = 1, tag: str = "surgery"):
        super().__init__(device)
        self.repeat = repeat  # measurements of each training row
        self.tag = tag  # the label of the rows section's line
        self.results: dict = {}

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

    def section_dora(self) -> None:
        """DoRA training steps (every linear but the head, r 16, alpha 32), PEFT's and surgery's, beside the floor."""
        for _ in range(self.repeat):
            if "floor" not in self.results.get("train", {}):
                self.floor()
            for p in (0.05, 0.0):
                self.measure_train(f"peft_dora_default_drop{p}", lambda p=p: self.peft(p, autocast=True, use_dora=True))
                self.measure_train(f"peft_dora_bf16_drop{p}", lambda p=p: self.peft(p, autocast=False, use_dora=True))
                self.measure_train(f"surgery_dora_drop{p}", lambda p=p: self.ours(p, method="dora"))

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
            surgery.attach(model, harness.lora_rules(), name="a")
            res["surgery_unmerged"] = self.time_ms(lambda: model(input_ids=ids, use_cache=False))
            surgery.merge(model, "a")
            res["surgery_merged"] = self.time_ms(lambda: model(input_ids=ids, use_cache=False))
            surgery.detach(model, "a")
            for autocast in (True, False):
                pm = self.peft(0.0, autocast, model=model).eval()
                res[f"peft_unmerged_{'default' if autocast else 'bf16'}"] = self.time_ms(
                    lambda pm=pm: pm(input_ids=ids, use_cache=False))
                model = pm.unload()
            model = pm = None  # freed before the next section
        self.results["fwd_ms"] = {k: round(v, 2) for k, v in res.items()}
        print("  fwd", self.results["fwd_ms"], flush=True)
        self.fresh()

    def section_accuracy(self) -> None:
        """Logits of the unmerged LoRA forward in the benchmark's dtype against a float32 run of the same weights,
        for surgery's default form (on CUDA, from as many tokens as inputs: the merged weight built per call), its
        separate form (x @ A.T @ B.T added to the output), and HF PEFT with adapters in the same dtype. B is drawn
        so that ‖s·B·A‖ is 1 % or 10 % of ‖W‖ per layer (std 0.02 weights). Errors are relative to the float32
        logits and to the adapter's effect on them (float32 logits with minus without the adapter)."""
        dispatch = harness.lora_internals().dispatch  # its MERGED_DEVICES switches the merged form on and off
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

                def run(forms: set[str], model=model) -> torch.Tensor:
                    real = dispatch.MERGED_DEVICES
                    dispatch.MERGED_DEVICES = forms
                    try:
                        return model(input_ids=ids, use_cache=False).logits.float()
                    finally:
                        dispatch.MERGED_DEVICES = real
                got = {"surgery_default": run(dispatch.MERGED_DEVICES), "surgery_separate": run(set())}
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
            model = pm = got = ref = None  # freed before the next size
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
            runs: dict[str, list[float]] = {}
            for _ in range(self.repeat):  # the three rows interleaved, each the median of its repeats
                with surgery.disabled(model):
                    runs.setdefault("surgery_no_adapter", []).append(
                        self.time_ms(lambda: model(input_ids=ids, use_cache=False)))
                surgery.set_active(model, ["a0"])
                runs.setdefault("surgery_one_adapter", []).append(
                    self.time_ms(lambda: model(input_ids=ids, use_cache=False)))
                with surgery.per_sample(model, names):
                    runs.setdefault("surgery_8_mixed", []).append(
                        self.time_ms(lambda: model(input_ids=ids, use_cache=False)))
            res.update({k: statistics.median(v) for k, v in runs.items()})
            if self.repeat > 1:
                self.results["mixed_ms_runs"] = {k: [round(t, 2) for t in v] for k, v in runs.items()}
            for i in range(n):
                surgery.detach(model, f"a{i}")
            cfg = lambda: LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
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
            pm = model = None  # freed before the next section
        self.results["mixed_ms"] = {k: round(v, 2) for k, v in res.items()}
        print("  mixed", self.results["mixed_ms"], flush=True)
        self.fresh()

    def section_attach(self) -> None:
        from peft import LoraConfig, get_peft_model

        from surgery import plugin

        cfg = LlamaConfig(**harness.SEVEN_B)
        res = {}
        rules = harness.lora_rules()
        for attempt in ("cold", "warm"):
            meta = harness.meta_llama(harness.SEVEN_B)
            t = time.perf_counter()
            surgery.attach(meta, rules, name="a")
            res[f"surgery_attach_meta_{attempt}_s"] = time.perf_counter() - t
        meta = harness.meta_llama(harness.SEVEN_B)
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
                        kept = sum(m.record.nbytes() for m in plugin.attachment(model, "a").merged)
                        res["surgery_merge_exact_kept_mib"] = kept / 2**20
                del model
            self.fresh()
        self.results["attach_7b"] = {k: round(v, 3) for k, v in res.items()}
        print("  7b", self.results["attach_7b"], flush=True)

    def section_rows(self) -> None:
        """The floor and surgery's two LoRA training rows alone (20 steps after 4), with each row's host issue time:
        for comparing two versions of surgery on one machine, run alternately from two installs through PYTHONPATH
        (docs/performance.md, "Comparing two versions"). Printed as one line starting with --tag."""
        n, warm = 20, 4
        self.fresh()
        out = {"floor": self.time_ms(self.floor_step(self.base().train()), n=n, warm=warm)}
        self.fresh()
        for p in (0.05, 0.0):
            model = self.ours(p).train()
            step = self.train_step(model)
            out[f"drop{p}"] = self.time_ms(step, n=n, warm=warm)
            out[f"drop{p} host"] = self.host_and_wall_ms(step)[0]
            out[f"drop{p} / floor"] = out[f"drop{p}"] / out["floor"]
            del model, step
            self.fresh()
        out = {k: round(v, 3) for k, v in out.items()}
        print(self.tag, json.dumps(out), flush=True)
        plugins = sys.modules.get("surgery_plugins")  # which install ran: the A/B must not mix them
        self.results.setdefault("rows", {})[self.tag] = out | {
            "surgery": surgery.__version__, "surgery_path": os.path.dirname(surgery.__file__),
            "plugins_path": next(iter(plugins.__path__), None) if plugins else None}


    def section_profile(self) -> None:
        """Kernel counts and CUDA time of one training step, by kind of kernel, and the host's time to issue it:
        where the time goes."""
        from torch.profiler import ProfilerActivity, profile

        out = {}
        for key, build in (("floor", None), ("peft_bf16_drop0.05", lambda: self.peft(0.05, autocast=False)),
                           ("surgery_drop0.05", lambda: self.ours(0.05)), ("surgery_drop0.0", lambda: self.ours(0.0)),
                           ("peft_dora_bf16_drop0.0", lambda: self.peft(0.0, autocast=False, use_dora=True)),
                           ("surgery_dora_drop0.0", lambda: self.ours(0.0, method="dora"))):
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



def ratios(r: dict) -> list[tuple[str, float | None, str]]:
    rows = []
    t = r.get("train", {})

    def ratio(a, b, field="step_ms"):
        return round(t[a][field] / t[b][field], 3) if a in t and b in t and t[a].get(field) and t[b].get(field) else None
    for p in ("0.05", "0.0"):
        rows.append((f"train drop {p}: surgery / floor", ratio(f"surgery_drop{p}", "floor"), "<= 1.10"))
        rows.append((f"train drop {p}: surgery / PEFT default", ratio(f"surgery_drop{p}", f"peft_default_drop{p}"), "<= 0.60"))
        rows.append((f"train drop {p}: surgery / PEFT bf16 adapters", ratio(f"surgery_drop{p}", f"peft_bf16_drop{p}"), "< 1"))
        rows.append((f"train drop {p}: peak memory surgery / floor", ratio(f"surgery_drop{p}", "floor", "peak_gib"), "<= 1.10"))
        rows.append((f"train drop {p}: compiled surgery / floor", ratio(f"surgery_compiled_drop{p}", "floor"), "<= 1.10"))
        rows.append((f"DoRA train drop {p}: surgery / PEFT default", ratio(f"surgery_dora_drop{p}", f"peft_dora_default_drop{p}"), "<= 1"))
        rows.append((f"DoRA train drop {p}: surgery / PEFT bf16 adapters", ratio(f"surgery_dora_drop{p}", f"peft_dora_bf16_drop{p}"), "<= 1"))
        rows.append((f"DoRA train drop {p}: peak memory surgery / PEFT bf16 adapters", ratio(f"surgery_dora_drop{p}", f"peft_dora_bf16_drop{p}", "peak_gib"), "<= 1"))
    f = r.get("fwd_ms", {})
    if f:
        rows.append(("forward: surgery unmerged / base", round(f["surgery_unmerged"] / f["base"], 3), "<= 1.05"))
        rows.append(("forward: surgery unmerged / PEFT bf16 unmerged", round(f["surgery_unmerged"] / f["peft_unmerged_bf16"], 3), "< 1"))
    m = r.get("mixed_ms", {})
    if m:
        rows.append(("mixed 8 adapters / one adapter (surgery)", round(m["surgery_8_mixed"] / m["surgery_one_adapter"], 3), "<= 1.05"))
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
    parser.add_argument("--sections", nargs="*", default=["train", "dora", "fwd", "mixed", "attach"], choices=SECTIONS)
    parser.add_argument("--repeat", type=int, default=1, help="measure each training row (and the mixed rows) this many times")
    parser.add_argument("--tag", default="surgery", help="the rows section's label (e.g. old / new in an A/B)")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/bench_vs_peft-<device>.json)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    bench = Bench(args.device, args.repeat, args.tag)
    shapes = {k: v for k, v in bench.shape.items() if k != "dtype"} | {"dtype": str(bench.shape["dtype"])}
    bench.results["meta"] = harness.run_meta(args.device, shapes=shapes)
    for section in args.sections:
        print(f"[{section}]", flush=True)
        getattr(bench, f"section_{section}")()
    print("\n| ratio | value | target |\n|---|---|---|")
    for w, v, t in ratios(bench.results):
        print(f"| {w} | {v} | {t} |")
    out = harness.write_results("bench_vs_peft", args.device, bench.results, args.out, derive=lambda merged: {
        "ratios": [{"what": w, "ratio": v, "target": t} for w, v, t in ratios(merged)]})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
