"""What the benchmarks share: the models and workloads, the timers, and the results files.

- `Workload`: a Llama-shaped model with random weights at one of `SHAPES` (or a shape of your own), surgery's LoRA
  and HF PEFT's on it, the training step, the floor's step (the frozen base, gradients to its input only), and
  the timers bound to its device;
- `time_ms`, `host_and_wall_ms`, `host_us`: device time (CUDA events, or wall time on the CPU), the host's time to
  issue a call against its wall time, and host µs per call;
- `run_meta`, `write_results`: one results file per benchmark and device, `benchmarks/results/<name>-<device>.json`
  (device: `h100`, `h200`, ... from the GPU's name, or `cpu`), with the date, the device and the versions;
- the few private modules of the engine that some benchmarks need, in one place (`lora_internals`,
  `analysis_cache`, `quantize`): their import paths may move, every such line is marked `# internal`.

The benchmarks import surgery's public API only at module level, so that `PYTHONPATH=<another install>` runs them
against another version of surgery (the A/B recipe in docs/performance.md).
"""
from __future__ import annotations

import gc
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery

RESULTS = Path(__file__).resolve().parent / "results"

# The model of the performance figures (0.85 B parameters, bf16, 8 x 1024 tokens) and a small CPU stand-in.
SHAPES = {
    "cuda": {"config": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                        "max_position_embeddings": 4096},
             "batch": 8, "seq": 1024, "mixed_batch": 32, "mixed_seq": 512, "dtype": torch.bfloat16, "steps": 10,
             "warm": 3},
    "cpu": {"config": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
                       "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 512},
            "batch": 4, "seq": 128, "mixed_batch": 8, "mixed_seq": 64, "dtype": torch.float32, "steps": 5, "warm": 2},
}
# A Llama-2-7B-shaped config, built on the meta device for attach and inspect (no weights), on the GPU for merge.
SEVEN_B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000}


# ---- timers ------------------------------------------------------------------------------------------------------

def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, n: int, warm: int) -> float:
    """Median ms of `n` calls of `fn` after `warm` calls: CUDA events on a GPU, wall time on the CPU."""
    cuda = str(device).startswith("cuda")
    for _ in range(warm):
        fn()
    sync(device)
    times = []
    for _ in range(n):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def device_ms(fn: Callable[[], object], device: str, n: int = 10, warm: int = 3, calls: int = 20) -> float:
    """Median ms of one call of `fn` on the device alone, for calls shorter than the host's work to issue them: on a
    GPU, `calls` calls captured in one CUDA graph (after `warm` calls on a side stream), replayed `n` times; on the
    CPU, `time_ms`. `fn` must be capturable: no copies from the host, no synchronisation."""
    if not str(device).startswith("cuda"):
        return time_ms(fn, device, n, warm)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, device, n, 1) / calls


def host_and_wall_ms(fn: Callable[[], object], device: str, n: int = 8, warm: int = 2) -> tuple[float, float]:
    """Medians of the host's time to issue one call (no wait for the device) and of its wall time: where the first
    reaches the second, the call is bound by the host, not by the GPU's kernels."""
    for _ in range(warm):
        fn()
    sync(device)
    host, wall = [], []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        host.append((time.perf_counter() - start) * 1000)
        sync(device)
        wall.append((time.perf_counter() - start) * 1000)
    return statistics.median(host), statistics.median(wall)


def profile(fn: Callable[[], object], device: str, top: int = 12, warm: int = 2) -> dict:
    """One call of `fn` under torch.profiler, after `warm` calls: the number of kernels, their total time (on the
    CPU: the ops' own time) and the `top` kernels by time, as [name, count, ms]."""
    cuda = str(device).startswith("cuda")
    for _ in range(warm):
        fn()
    sync(device)
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        fn()
        sync(device)
    on = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    spent = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    kernels = sorted([e for e in prof.key_averages() if e.device_type == on], key=spent, reverse=True)
    return {"kernels": sum(e.count for e in kernels), "gpu_ms": round(sum(map(spent, kernels)) / 1e3, 2),
            "top": [[e.key[:90], e.count, round(spent(e) / 1e3, 2)] for e in kernels[:top]]}


def print_profile(key: str, found: dict) -> None:
    print(f"  profile {key}: {found['kernels']} kernels, {found['gpu_ms']} ms of GPU time", flush=True)
    for name, count, ms in found["top"]:
        print(f"    {ms:8.2f} ms  {count:6d} x  {name}", flush=True)


def host_us(fn: Callable[[], object], calls: int, rounds: int, warm: int, pick=statistics.median,
            device: str = "cuda") -> float:
    """Host µs per call of `fn`: `pick` (median, min, ...) over `rounds` runs of `calls` calls, after `warm` calls;
    the device is not waited for inside a run and is drained after each."""
    for _ in range(warm):
        fn()
    sync(device)
    per_run = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_run.append((time.perf_counter() - start) / calls * 1e6)
        sync(device)
    return pick(per_run)


# ---- models and steps --------------------------------------------------------------------------------------------

def llama(config: dict, device: str = "cpu", dtype: torch.dtype = torch.float32, frozen: bool = True,
          attn: str = "sdpa") -> LlamaForCausalLM:
    """A Llama with random weights (seed 0) of `config`, on `device` in `dtype`, its parameters frozen."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**config)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).to(device, dtype)
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def meta_llama(config: dict) -> LlamaForCausalLM:
    """A Llama of `config` on the meta device: the structure and shapes, no weights."""
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**config))


def nf4(model: torch.nn.Module, compute_dtype: torch.dtype, double_quant: bool = True) -> int:
    """Replace, in place, every nn.Linear of `model` but its output head by bitsandbytes' NF4 `Linear4bit` of the
    same weights, quantized on the layer's device (uint8 storage, blocks of 64, `double_quant`: QLoRA's usual
    `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=compute_dtype)`), and mark the model as transformers marks a 4-bit load, so that HF PEFT
    wraps the layers with its bitsandbytes classes. Returns how many layers were replaced."""
    import bitsandbytes as bnb

    head, replaced = model.get_output_embeddings(), 0
    for parent in list(model.modules()):
        for name, linear in list(parent.named_children()):
            if type(linear) is not torch.nn.Linear or linear is head:
                continue
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                                      quant_storage=torch.uint8, device="meta")
            layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=double_quant,
                                             quant_type="nf4", quant_storage=torch.uint8,
                                             module=layer).to(linear.weight.device)
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            replaced += 1
    model.is_loaded_in_4bit = True
    return replaced


def lora_rules(targets: list[str] | None = None, r: int = 16, dropout: float = 0.0,
               exclude_roles: tuple[str, ...] = ("lm_head",), method: str = "lora",
               kinds: tuple[str, ...] = ("linear",)) -> surgery.RuleSet:
    """LoRA (alpha 2r; or `method` "dora" with the same params) on the sites of `targets` (roles), or on every
    site of `kinds` (every linear); the head excluded."""
    select = surgery.Selector(roles=targets) if targets else surgery.Selector(kinds=list(kinds))
    return surgery.RuleSet(name="bench", rules=[surgery.Rule(
        select=select, exclude=surgery.Selector(roles=list(exclude_roles)), method=method,
        params={"r": r, "alpha": 2 * r, "dropout": dropout})])


class Workload:
    """The benchmark model and its batches on one device, with surgery's and HF PEFT's LoRA, the steps, and the
    timers. `shape` is one of `SHAPES` (default: by device) or a dict of the same keys."""

    def __init__(self, device: str, shape: dict | None = None):
        self.device = device
        self.cuda = str(device).startswith("cuda")
        self.shape = dict(shape or SHAPES["cuda" if self.cuda else "cpu"])
        g = torch.Generator().manual_seed(0)
        vocab = self.shape["config"]["vocab_size"]
        self.ids = torch.randint(0, vocab, (self.shape["batch"], self.shape["seq"]), generator=g).to(device)
        self.mixed_ids = torch.randint(0, vocab, (self.shape["mixed_batch"], self.shape["mixed_seq"]),
                                       generator=g).to(device)

    # timers on this device
    def sync(self) -> None:
        sync(self.device)

    def time_ms(self, fn, n: int | None = None, warm: int | None = None) -> float:
        return time_ms(fn, self.device, n or self.shape["steps"], self.shape["warm"] if warm is None else warm)

    def host_and_wall_ms(self, fn, n: int = 8) -> tuple[float, float]:
        return host_and_wall_ms(fn, self.device, n)

    def fresh(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    # models
    def base(self, **overrides) -> LlamaForCausalLM:
        return llama({**self.shape["config"], **overrides}, self.device, self.shape["dtype"])

    def ours(self, dropout: float, r: int = 16, targets=None, name: str = "a", model=None, method: str = "lora"):
        """surgery's LoRA (r, alpha 2r; or DoRA, `method="dora"`) on every linear but the head, or on `targets`
        (roles)."""
        model = model or self.base()
        surgery.attach(model, lora_rules(targets, r, dropout, method=method), name=name)
        return model

    def peft(self, dropout: float, autocast: bool, r: int = 16, targets="all-linear", model=None,
             use_dora: bool = False):
        """HF PEFT's LoRA (or DoRA) of the same shape; `autocast=True` is PEFT's default (fp32 adapters on a bf16
        model)."""
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model or self.base(), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                               target_modules=targets, use_dora=use_dora),
                              autocast_adapter_dtype=autocast)

    # steps
    def train_loss(self, model):
        """The training step's forward: a function giving `model`'s loss on the benchmark's batch."""
        ids = self.ids
        return lambda: model(input_ids=ids, labels=ids, use_cache=False).loss

    def train_step(self, model, fused: bool | None = None, ids: torch.Tensor | None = None, graph: bool = False):
        """One training step of `model` on the benchmark's batch (or on `ids`); AdamW fused where asked (default: on
        CUDA); with `graph`, the step replayed as a CUDA graph (capturable AdamW, the graphs surgery.jobs uses)."""
        params = [p for p in model.parameters() if p.requires_grad]
        fused = self.cuda if fused is None else fused
        opt = torch.optim.AdamW(params, lr=1e-4, fused=fused, capturable=graph) if params else None
        ids = self.ids if ids is None else ids

        def step(inputs=(ids,)):
            loss = model(input_ids=inputs[0], labels=inputs[0], use_cache=False).loss
            loss.backward()
            if opt:
                opt.step()
                opt.zero_grad(set_to_none=True)
            return {"loss": loss.detach()}
        return graphed(step, ids, params) if graph else step

    def job_batches(self, jobs: int, batch: int, seq: int) -> dict[str, dict[str, torch.Tensor]]:
        """`jobs` training jobs' batches of `batch` x `seq` random token ids (seeded), by job name j0, j1, ..."""
        g = torch.Generator().manual_seed(1)
        vocab = self.shape["config"]["vocab_size"]
        return {f"j{i}": {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g).to(self.device)}
                for i in range(jobs)}

    def jobs(self, data: dict, fused: bool | None = None, graph: bool = False):
        """A base with one LoRA attachment (r 16, every linear but the head) per job of `data`, in training, and
        `surgery.jobs` over them, each with its own AdamW (fused where asked; default: on CUDA; capturable and the
        steps CUDA graphs with `graph`): (model, jobs)."""
        model = self.base()
        for name in data:
            surgery.attach(model, lora_rules(r=16), name=name)
        model.train()
        fused = self.cuda if fused is None else fused
        opts = {n: torch.optim.AdamW(surgery.adapter_parameters(model, n), lr=1e-4, fused=fused, capturable=graph)
                for n in data}
        return model, surgery.jobs(model, opts, cuda_graph=True) if graph else surgery.jobs(model, opts)

    def floor_step(self, model, graph: bool = False):
        """The floor's step on the benchmark's batch: `model` frozen, gradients to its input embeddings only; with
        `graph`, replayed as a CUDA graph (as `train_step`'s)."""
        emb = model.get_input_embeddings()

        def step(inputs=(self.ids,)):
            embeds = emb(inputs[0]).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=inputs[0], use_cache=False).loss
            loss.backward()
            return {"loss": loss.detach()}
        return graphed(step, self.ids, []) if graph else step


def graphed(step: Callable, ids: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], dict]:
    """`step((ids,))` replayed as a CUDA graph, by the graphs surgery.jobs uses (the engine's StepGraphs: two eager
    steps, then a capture; a graph slower than the eager step over its first replays is dropped and the step runs
    eagerly from then on). `params`: those whose gradients the step sets. The function returned carries `.graphs`,
    whose `eager` says what ran eagerly, and why."""
    graphs = step_graphs().StepGraphs()

    def run():
        return graphs.run("one", (ids,), step, lambda: params, lambda: None)
    run.graphs = graphs
    return run


# ---- results files -----------------------------------------------------------------------------------------------

def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: str) -> str:
    """`h100`, `h200`, `a100`, ... from the GPU's name; `cpu` on the CPU."""
    if not str(device).startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name()
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (model.group(1) if model else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")).lower()


def run_meta(device: str, **extra) -> dict:
    """Date, device and versions of this run (`extra` added, e.g. the shapes)."""
    meta = {"date": str(date.today()), "device": device_name(device), "torch": torch.__version__,
            "surgery": surgery.__version__, "python": sys.version.split()[0]}
    for package in ("transformers", "peft", "triton"):
        try:
            meta[package] = __import__(package).__version__
        except ImportError:
            pass
    return meta | extra


def results_path(name: str, device: str) -> Path:
    return RESULTS / f"{name}-{device_slug(device)}.json"


def write_results(name: str, device: str, results: dict, out: str | Path | None = None,
                  command: str | None = None, derive: Callable[[dict], dict] | None = None) -> Path:
    """Merge `results` (sections: dicts of rows) into the benchmark's results file for this device (or `out`): a
    section run again replaces those rows, the others stay; `meta` is this run's, and `meta.sources` says for each
    section when and by what command it was last measured. `derive(merged)` may add sections computed from the
    merged file (ratios). Returns the path written."""
    path = Path(out) if out else results_path(name, device)
    old = json.loads(path.read_text()) if path.exists() else {}
    meta = run_meta(device) | dict(results.get("meta", {}))
    sources = dict(old.get("meta", {}).get("sources", {}))
    command = command or " ".join(["python", *sys.argv])
    merged = {k: v for k, v in old.items() if k != "meta"}
    for section, rows in results.items():
        if section == "meta":
            continue
        if isinstance(rows, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **rows}
        else:
            merged[section] = rows
        sources[section] = f"{meta['date']}, surgery {meta['surgery']}, {meta['device']}: {command}"
    meta["sources"] = sources
    if derive is not None:
        derived = derive(merged)
        merged |= derived
        sources |= {k: f"{meta['date']}: computed over this file by the last run" for k in derived}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **merged}, indent=1, default=str) + "\n")
    return path


# ---- the engine's private modules that some benchmarks switch (paths may move: update them here) -----------------

def step_graphs():
    """The engine's CUDA graphs of a training step (what `surgery.jobs(cuda_graph=True)` replays)."""
    from surgery.engine import step_graphs  # internal: path may move
    return step_graphs


def lora_internals() -> SimpleNamespace:
    """LoRA's private modules: the dispatch and its knobs, the kernels, the fused and shared autograd paths, the
    merged-weight switch, and the order of base and update (update_first)."""
    from surgery_plugins.lora import (  # internal: path may move
        dispatch,
        fused,
        kernels,
        merged_weight,
        shared,
        tiles,
        update_first,
    )
    return SimpleNamespace(dispatch=dispatch, fused=fused, kernels=kernels, merged_weight=merged_weight, shared=shared, tiles=tiles,
                           update_first=update_first)


def analysis_cache() -> dict:
    """The analysis cache (architecture key -> facts) that makes a second inspect of one architecture quick."""
    from surgery.analysis.facts import _CACHE  # internal: path may move
    return _CACHE


def quantize(model: torch.nn.Module, bits: int, **kwargs) -> list[str]:
    """The ChatGLM-format INT4/INT8 quantizer of the built-in plugin (`QuantizedLinear` layers, in place)."""
    from surgery_plugins.quantized_linear import quantize as _quantize  # internal: path may move
    return _quantize(model, bits, **kwargs)
