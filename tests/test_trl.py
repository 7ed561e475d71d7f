"""An attached model trains with TRL's `SFTTrainer`, unchanged (skipped where `trl` is not installed)."""
from __future__ import annotations

import pytest
import torch

import surgery
from surgery import tiny

trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl): the SFTTrainer test needs it")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (trl needs it)")


def test_sft_trainer_trains_only_the_adapter(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t1", unk_token="t0")
    model = tiny.build("llama", seed=0)
    model.train()
    surgery.attach(model, "lora-qv", name="a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 128, (12,), generator=g).tolist()} for _ in range(8)]
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                           logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(x)) for x in losses)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= adapter, f"non-adapter tensors changed: {sorted(changed - adapter)}"
    assert {n for n in adapter if "lora_B" in n} <= changed
