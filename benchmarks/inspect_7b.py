"""How long `surgery.inspect` takes on a 7B-shaped Llama built on the meta device (no weights, no compute).

    python benchmarks/inspect_7b.py

Prints the first call in this process (with torch.export's one-time setup), a second instance of the same
architecture (served from the analysis cache), and a re-trace with the cache cleared.
"""
from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import surgery
import surgery.roles

CONFIG = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=32000)


def timed(model) -> tuple[float, int]:
    start = time.perf_counter()
    report = surgery.inspect(model)
    return time.perf_counter() - start, len(report.sites)


def main() -> None:
    def meta_model():
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(**CONFIG))

    first, sites = timed(meta_model())
    cached, _ = timed(meta_model())
    surgery.roles._CACHE.clear()
    traced, _ = timed(meta_model())
    print(f"7B-shaped Llama on meta, {sites} sites: first call {first:.2f} s, cached {cached * 1000:.0f} ms, "
          f"re-traced {traced:.2f} s")


if __name__ == "__main__":
    main()
