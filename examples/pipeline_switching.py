"""One base model serving two adapters: switched, mixed per sample in one batch, saved and reloaded.

    python examples/pipeline_switching.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import surgery
from surgery import tiny


def train(model, name: str, target: int, steps: int = 15) -> None:
    """Teach adapter `name` to always answer `target` (a toy task that makes the adapters easy to tell apart)."""
    surgery.set_active(model, [name])
    params = [p for n, p in model.named_parameters() if f".{name}." in n and p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(3, 128, (8, 12), generator=torch.Generator().manual_seed(target))
    labels = torch.full_like(ids, target)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def answer(model, prompts: torch.Tensor) -> list[int]:
    return model.generate(prompts, max_new_tokens=1, do_sample=False, pad_token_id=0)[:, -1].tolist()


def main() -> None:
    model = tiny.build("llama")
    surgery.attach(model, "lora-attention", name="sevens")
    surgery.attach(model, "lora-all-linear", name="nines")
    train(model, "sevens", 7)
    train(model, "nines", 9)
    prompts = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(42))

    for name in ("sevens", "nines"):
        surgery.set_active(model, [name])
        print(f"active {name!r:9}: next tokens {answer(model, prompts)}")
    with surgery.disabled(model):
        print(f"no adapter      : next tokens {answer(model, prompts)}")

    routing = ["sevens", "nines", None, "nines"]
    with surgery.per_sample(model, routing):
        mixed = answer(model, prompts)
    print(f"per sample {routing}: {mixed}")

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("sevens", "nines"):
            surgery.save(model, Path(tmp) / name, name=name)
        served = tiny.build("llama")  # a fresh process would load the same base weights
        for name in ("sevens", "nines"):
            surgery.load(served, Path(tmp) / name)
        with surgery.per_sample(served, routing):
            reloaded = answer(served, prompts)
    print(f"reloaded, same routing: {reloaded}")
    assert reloaded == mixed


if __name__ == "__main__":
    main()
