"""bitsandbytes layers through surgery's weight-format hook, on a GPU: LoRA on `Linear4bit` (NF4) and
`Linear8bitLt` (LLM.int8()), merge (requantized), exact unmerge, merge into float, detach.

A tiny random Llama in float16 has every decoder linear replaced by the bitsandbytes layer; nothing is downloaded.
Skipped without CUDA or without bitsandbytes (CPU CI, or a GPU image without it). The CPU counterpart, with HF
PEFT as the reference, is tests/test_qlora.py.
"""
from __future__ import annotations

import pytest
import torch

import surgery
from tests.bnb_models import bnb_model, round_trip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes layers need a CUDA device")


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


@pytest.fixture(params=[4, 8], ids=["nf4", "int8"])
def setup(request, bnb):
    """A float16 bitsandbytes Llama of 4 or 8 bits on the GPU and an input."""
    model = bnb_model("llama", request.param, "cuda", torch.float16)
    x = torch.randint(3, 128, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        model(x)  # one forward first: Linear8bitLt moves its scales into its state on the first call
    return model, x


def test_inspect_finds_the_bitsandbytes_layers(setup):
    report = surgery.inspect(setup[0])
    quantized = [s for s in report.sites if s.kind == "quantized_linear"]
    assert quantized, f"no bitsandbytes site recognised: {sorted(f'{s.path} {s.kind}' for s in report.sites)}"


def test_lora_merge_unmerge_detach_round_trip(setup):
    print(round_trip(*setup))  # the merges' errors, reported: run with -s to see
