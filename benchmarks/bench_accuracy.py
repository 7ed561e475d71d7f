"""bf16 accuracy of a LoRA training step against a float64 reference with the same weights: surgery against HF PEFT
with bf16 adapters, in one process.

    python benchmarks/bench_accuracy.py --device cuda     # a 4-layer Llama (hidden 2048), 4 x 512 tokens, r 16
    python benchmarks/bench_accuracy.py                   # CPU: a small model, a smoke run

One set of weights (base and LoRA, B drawn so that the update is about `--delta` of each weight's norm) is run
three ways: surgery in float64 (the reference), surgery in bf16, and PEFT in bf16 with the same adapter loaded from
surgery's PEFT-format save. Reported: ‖logits - ref‖ / ‖ref‖, and the same for the LoRA gradients (all A and B
gradients concatenated), each with dropout 0. Results: benchmarks/results/bench_accuracy-<device>.json.
"""
from __future__ import annotations

import argparse
import tempfile

import harness
import torch

import surgery


def lora_model(config: dict, device: str, dtype: torch.dtype, state: dict | None, delta: float, r: int,
               seed: int = 0):
    model = harness.llama(config, device, torch.float64 if state is None else dtype)
    surgery.attach(model, harness.lora_rules(r=r), name="a")
    if state is None:  # draw B so that ‖s·B·A‖ is about `delta` of ‖W‖ at each site
        g = torch.Generator(device="cpu").manual_seed(5 + seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * delta * 0.05)
    else:
        model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()})
    return model


def grads_of(model, prefix_map) -> dict[str, torch.Tensor]:
    return {prefix_map(n): p.grad.double().flatten() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def errors(config: dict, device: str, batch: int, seq: int, r: int, delta: float, seed: int = 0
           ) -> dict[str, dict[str, float]]:
    """{"surgery_bf16": ..., "peft_bf16": ...}, each {"logits_rel_err", "lora_grads_rel_err"} against float64; `seed`
    draws the tokens and B (the base's weights are harness.llama's)."""
    ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    ref = lora_model(config, device, torch.float64, None, delta, r, seed).train()
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    out = ref(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    want_logits = out.logits.detach().double()
    want_grads = grads_of(ref, lambda n: n.replace(".branches.a.", "."))
    with tempfile.TemporaryDirectory() as tmp:
        surgery.save(ref, tmp, name="a", format="peft")
        del ref, out

        ours = lora_model(config, device, torch.bfloat16, state, delta, r).train()
        o = ours(input_ids=ids, labels=ids, use_cache=False)
        o.loss.backward()
        got = {"surgery_bf16": (rel(o.logits, want_logits), grads_of(ours, lambda n: n.replace(".branches.a.", ".")))}
        del ours, o

        from peft import PeftModel
        base = harness.llama(config, device, torch.bfloat16)
        base.load_state_dict({k.replace(".base.", "."): v.to(torch.bfloat16) for k, v in state.items()
                              if "branches" not in k}, strict=False)
        peft = PeftModel.from_pretrained(base, tmp, is_trainable=True, autocast_adapter_dtype=False).train()
        peft = peft.to(torch.bfloat16)
        o = peft(input_ids=ids, labels=ids, use_cache=False)
        o.loss.backward()
        got["peft_bf16"] = (rel(o.logits, want_logits), grads_of(
            peft, lambda n: n.replace("base_model.model.", "").replace(".default.weight", "")))

    results = {}
    keys = sorted(want_grads)
    want = torch.cat([want_grads[k] for k in keys])
    for name, (logits_err, grads) in got.items():
        missing = [k for k in keys if k not in grads]
        if missing:
            raise RuntimeError(f"{name}: no gradient for {missing[:3]} ...")
        results[name] = {"logits_rel_err": logits_err,
                         "lora_grads_rel_err": rel(torch.cat([grads[k] for k in keys]), want)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    config = ({"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 32000} if cuda else
              {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 512})
    batch, seq, r = (4, 512, 16) if cuda else (2, 32, 8)
    results = {name: {k: round(v, 5) for k, v in errs.items()}
               for name, errs in errors(config, args.device, batch, seq, r, args.delta).items()}
    for name, errs in results.items():
        print(name, errs, flush=True)
    meta = harness.run_meta(args.device, config=config, batch=batch, seq=seq, r=r, delta=args.delta)
    print(f"wrote {harness.write_results('bench_accuracy', args.device, {'meta': meta, 'errors': results}, args.out)}")


if __name__ == "__main__":
    main()
