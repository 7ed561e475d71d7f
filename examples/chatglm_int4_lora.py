"""LoRA on a ChatGLM-style INT4 model, declaratively: what people write by hand for ChatGLM2-6B-int4 today
(HF PEFT refuses its `QuantizedLinear`: "Target module QuantizedLinear() is not supported").

    python examples/chatglm_int4_lora.py [--bits 4|8] [--steps 40] [--out DIR]

1. A small ChatGLM-like model (tests/custom_models.py: fused multi-query `query_key_value`, rotary, SwiGLU with a
   fused `dense_h_to_4h`) has its linears quantized as ChatGLM does, `quantize(model, 4)`. With the real
   checkpoint (THUDM/chatglm2-6b-int4, trust_remote_code=True) the layers come quantized: skip that step.
2. One rule attaches LoRA to every quantized linear; a few training steps; only the LoRA tensors are saved.
3. Merge into the INT4 bytes (requantized, with the error it cost), unmerge, merge into float instead, detach:
   the model's bytes are the original's again.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for the test suite's ChatGLM-like model

import surgery  # noqa: E402
from surgery.rules.schema import parse_ruleset  # noqa: E402
from surgery_plugins.quantized_linear import quantize  # noqa: E402
from tests.custom_models import TinyGLM  # noqa: E402

RULES = """
name: lora-every-quantized-linear
description: LoRA on every quantized linear layer, whole modules (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)
rules:
  - select: {kinds: [quantized_linear]}
    method: lora
    params: {r: 8, alpha: 16}
"""


def batch(vocab: int, generator: torch.Generator, size: int = 8, seq: int = 16) -> torch.Tensor:
    """A learnable toy task: each sequence counts upward from a random start (mod vocab)."""
    return (torch.randint(0, vocab, (size, 1), generator=generator) + torch.arange(seq)) % vocab


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def digest(model: torch.nn.Module) -> str:
    """SHA-256 over every state_dict tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="where to save the LoRA tensors (default: a temp dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyGLM().train()
    converted = quantize(model, args.bits, exclude=["output_layer"])  # ChatGLM keeps its output layer in float
    print(f"quantized to INT{args.bits}: {', '.join(converted[:4])}, ... ({len(converted)} layers)")
    original, before = digest(model), {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    probe = batch(96, generator)
    print(surgery.inspect(model, args=(probe,)), "\n")

    rules = parse_ruleset(yaml.safe_load(RULES), "examples/chatglm_int4_lora.py")
    surgery.attach(model, rules, name="task", args=(probe,))
    print(surgery.trainable_parameters(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for step in range(args.steps):
        loss = lm_loss(model, batch(96, generator))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    out = args.out or Path(tempfile.mkdtemp(prefix="glm-lora-"))
    surgery.save(model, out, name="task")
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print(f"\nsaved only the adapter to {out}: {files}")

    model.eval()
    with torch.no_grad():
        adapted_logits, adapted = model(probe), lm_loss(model, probe).item()
        reports = surgery.merge(model, "task")
        merged_logits, merged = model(probe), lm_loss(model, probe).item()
        print(f"\nmerged into INT{args.bits} (requantized), per site:")
        print(f"{'site':50s} {'rel. weight err':>15s} {'rel. update err':>15s} {'max |dy| probe':>15s}")
        for path, r in reports.items():
            print(f"{path:50s} {r['relative_weight_error']:15.2e} {r['relative_update_error']:15.2e} "
                  f"{r['max_abs_output_change']:15.2e}")
        print(f"probe loss: adapted {adapted:.4f}, merged INT{args.bits} {merged:.4f}; "
              f"max |logit diff| {(merged_logits - adapted_logits).abs().max().item():.3e}")
        surgery.unmerge(model, "task")
        print(f"unmerged: quantized bytes back exactly: {torch.equal(model(probe), adapted_logits)}")
        surgery.merge(model, "task", into="float")
        print(f"merged into float linears instead: max |logit diff| "
              f"{(model(probe) - adapted_logits).abs().max().item():.3e}")
        surgery.detach(model, "task")
        with_base = lm_loss(model, probe).item()
    same = digest(model) == original and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    print(f"detached: probe loss {with_base:.4f} (base); model bytes equal the original: {same} "
          f"(sha256 {original[:16]}...)")
    assert same


if __name__ == "__main__":
    main()
