"""An adapter made with HF PEFT loaded into surgery, and a surgery adapter loaded back into HF PEFT.

    python examples/peft_interop.py
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import surgery
from surgery import tiny


def main() -> None:
    base = tiny.build("gpt2")
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        # 1. made with HF PEFT
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"]))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.02)
        peft_model.save_pretrained(Path(tmp) / "from_peft")
        expected = peft_model(input_ids=ids).logits

        # 2. loaded into surgery
        ours = copy.deepcopy(base)
        surgery.load(ours, Path(tmp) / "from_peft", name="peft")
        print(ours._surgery_ledger.attachments["peft"].plan, "\n")
        got = ours(input_ids=ids).logits
        print(f"PEFT -> surgery: max |logit diff| {(got - expected).abs().max().item():.2e}")

        # 3. a surgery LoRA on the q and v slices of the fused c_attn, written in PEFT's format
        surgery.attach(ours, "lora-qv", name="qv")
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if ".qv." in n and "lora_B" in n:
                    p.normal_(std=0.02)
        surgery.set_active(ours, ["qv"])
        mine = ours(input_ids=ids).logits
        surgery.save(ours, Path(tmp) / "to_peft", name="qv", format="peft")
        back = PeftModel.from_pretrained(copy.deepcopy(base), Path(tmp) / "to_peft")
        theirs = back(input_ids=ids).logits
        print(f"surgery -> PEFT: max |logit diff| {(theirs - mine).abs().max().item():.2e}")
        assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(theirs, mine, atol=1e-5)


if __name__ == "__main__":
    main()
