"""The adapted model stays the user's own object: HF Trainer trains it, through its own loop and optimizer."""
import torch
from transformers import Trainer, TrainingArguments

import surgery
from surgery import tiny
from tests.conftest import assert_bit_identical, gloo_group, ids, snapshot


class Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def test_hf_trainer_trains_only_the_adapter(tmp_path):
    model = tiny.build("llama")
    before = snapshot(model)
    surgery.attach(model, "lora-all-linear", name="a")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3,
                             save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(ids(batch=16, seq=12)))
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] and result.global_step == 6
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if "lora_B" in n)
    surgery.detach(model, "a")
    assert_bit_identical(model, before)


def test_ddp_wrapped_model_trains_and_detaches(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    gloo_group(f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = tiny.build("llama").train()
        before = snapshot(model)
        surgery.attach(model, "lora-qv", name="a")
        wrapped = DistributedDataParallel(model)
        x = ids(batch=2)
        wrapped(input_ids=x, labels=x).loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
        assert grads and all(g is not None for g in grads)
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        assert surgery.active(wrapped) == ["a"]  # the API sees through the wrapper
        surgery.detach(wrapped, "a")
        assert_bit_identical(model, before)
    finally:
        dist.destroy_process_group()
