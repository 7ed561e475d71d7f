"""Quickstart: LoRA on a tiny random Llama, trained for a few steps, merged, then detached.

    python examples/quickstart.py [--arch llama|gpt2|bert|...] [--rules lora-all-linear] [--steps 30]

Nothing is downloaded: the model is built from a config with random weights (surgery.tiny).
"""
from __future__ import annotations

import argparse

import torch

import surgery
from surgery import tiny


def batch(vocab: int, generator: torch.Generator) -> torch.Tensor:
    """A learnable toy task: each sequence counts upward from a random start (mod vocab)."""
    start = torch.randint(3, vocab, (8, 1), generator=generator)
    return (start + torch.arange(16)) % (vocab - 3) + 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama", choices=sorted(tiny.ARCHITECTURES))
    parser.add_argument("--rules", default="lora-all-linear")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if tiny.config(args.arch).is_encoder_decoder or args.arch == "bert":
        parser.error("the quickstart trains a causal LM: pick a decoder-only architecture")

    model = tiny.build(args.arch).train()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    print(surgery.inspect(model), "\n")
    print(surgery.plan(model, args.rules), "\n")

    surgery.attach(model, args.rules, name="task")
    print(surgery.trainable_parameters(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(args.steps):
        ids = batch(model.config.vocab_size, generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    assert losses[-1] < losses[0], "the loss did not fall"

    model.eval()
    probe = batch(model.config.vocab_size, generator)
    with torch.no_grad():
        adapted = model(input_ids=probe).logits
        surgery.merge(model, "task")
        merged = model(input_ids=probe).logits
        print(f"merged vs unmerged: max |logit diff| = {(merged - adapted).abs().max().item():.2e}")
        surgery.detach(model, "task")
    same = all(torch.equal(v, original[k]) for k, v in model.state_dict().items()) and list(model.state_dict()) == list(original)
    print(f"detached: model bit-identical to the original: {same}")
    assert same


if __name__ == "__main__":
    main()
